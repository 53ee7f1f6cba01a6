"""The autograd functions that train.compile traces change no tensor in place in their forward.

torch 2.11's dynamo routes the gradient of an autograd.Function output that an in-place op made to the wrong slot
(pytorch/pytorch#180642, fixed in 2.12): compiled training then silently gets zero gradients for the norms and
gate/up and wrong ones elsewhere. CI's torch does not have the bug, so this checks the cause instead: the model
runs forward and backward with its compiled functions traced by dynamo into a backend that records the graphs, and
no forward body of an autograd function (dynamo's `fwd_body_*` subgraphs) may hold an in-place op. Reverting
modeling.norm's or modeling.mlp's forward to `mul_` fails it.

On a GPU (bench/gpu_check.sh runs this file first) the compiled model's loss and gradients are also checked against
the eager model's, FlexAttention's document masks included; under torch 2.11 before the fix that check failed on
the CPU too (every norm's and gate/up's gradient error 1.0).
"""

import operator

import pytest
import torch
import torch._dynamo

import modeling.compile as mc
from modeling.config import ModelConfig
from modeling.llama import LlamaForCausalLM

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
IN_PLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _in_place(node: torch.fx.Node) -> bool:
    """Whether a dynamo graph node changes a tensor in place: `x.mul_(y)`, `x += y`, an out= or mutable aten op."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    name = getattr(target, "__name__", "")
    return target in IN_PLACE_FUNCTIONS or "out" in node.kwargs or (name.endswith("_") and not name.startswith("_"))


@pytest.fixture
def traced(monkeypatch):
    """compile_layers with dynamo's graphs recorded and run as traced (no inductor): {forward body: in-place ops}."""
    found: dict[str, list[str]] = {}

    def record(gm: torch.fx.GraphModule, example_inputs):
        for name, sub in gm.named_modules():
            if name.startswith("fwd_body") and isinstance(sub, torch.fx.GraphModule):
                found[f"{len(found)}:{name}"] = [str(n.target) for n in sub.graph.nodes if _in_place(n)]
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(mc, "_compiled_layer_forward", torch.compile(mc._layer_forward, backend=record))
    monkeypatch.setattr(mc, "_compiled_head_loss", torch.compile(mc._head_loss, backend=record))
    yield found
    torch._dynamo.reset()  # the next test compiles with inductor afresh


@pytest.mark.parametrize("case", ["fp32", "bf16-autocast-documents", "bf16"])
def test_compiled_forwards_change_nothing_in_place(traced, case):
    torch.manual_seed(0)
    model = LlamaForCausalLM(CFG)
    if case == "bf16":
        model = model.to(torch.bfloat16)
    mc.compile_layers(model)
    ids = torch.randint(0, CFG.vocab_size, (2, 33))
    docs = torch.tensor([[0] * 10 + [1] * 22, [0] * 32]) if "documents" in case else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled="autocast" in case):
        loss = model(ids[:, :-1], targets=ids[:, 1:], document_ids=docs).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    # RMSNorm, SwiGLU, attention and the head's loss at least (the linears' function where bf16 takes it)
    assert len(traced) >= 4, sorted(traced)
    assert {name: ops for name, ops in traced.items() if ops} == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("documents", [False, True], ids=["causal", "documents"])
def test_compiled_model_equals_eager_on_the_gpu(documents, monkeypatch):
    """On CUDA, train.compile's loss and every gradient equal eager's: fp32 with TF32 off, activation checkpointing,
    documents through FlexAttention's block mask (train.attention=auto). On the CPU the compiled paths are checked
    against eager by tests/unit/test_cpu_attention.py and tests/integration/test_compile.py."""
    cfg = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # exact fp32, as train.tf32=false
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch._dynamo.reset()
    torch.manual_seed(0)
    device = torch.device("cuda")
    eager = LlamaForCausalLM(cfg, device=device)
    compiled = LlamaForCausalLM(cfg, device=device)
    compiled.load_state_dict(eager.state_dict())
    mc.compile_layers(compiled)
    ids = torch.randint(0, cfg.vocab_size, (2, 257), device=device)
    docs = None
    if documents:  # three documents in row 0 (cut inside and at FlexAttention's 128-token blocks), one in row 1
        docs = torch.zeros(2, 256, dtype=torch.long, device=device)
        docs[0, 100:] = 1
        docs[0, 128:] = 2

    def run(model):
        model.activation_checkpointing = True
        loss = model(ids[:, :-1], targets=ids[:, 1:], document_ids=docs).loss
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters()}

    (want_loss, want), (loss, got) = run(eager), run(compiled)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    errors = {n: ((got[n] - want[n]).norm() / want[n].norm()).item() for n in want}
    assert max(errors.values()) < 1e-4, sorted(errors.items(), key=lambda e: -e[1])[:4]
