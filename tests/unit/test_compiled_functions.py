"""The autograd functions that train.compile traces change no tensor in place in their forward.

torch 2.11's dynamo routes the gradient of an autograd.Function output that an in-place op made to the wrong slot
(pytorch/pytorch#180642, fixed in 2.12): compiled training then silently gets zero gradients for the norms and
gate/up and wrong ones elsewhere. CI's torch does not have the bug, so this checks the cause instead: the model
runs forward and backward with its compiled functions traced by dynamo into a backend that records the graphs, and
no forward body of an autograd function (dynamo's `fwd_body_*` subgraphs) may hold an in-place op. Reverting
modeling.norm's or modeling.mlp's forward to `mul_` fails it.

On a GPU (bench/gpu_check.sh runs this file first) the compiled model's loss and gradients are also checked against
the eager model's, FlexAttention's document masks included. (On the CPU, tests/integration/test_compile.py and
tests/unit/test_cpu_attention.py compare them; under torch 2.11 before the fix they failed, every norm's and gate/up's
gradient off by 100%.) The tensor-parallel collectives' autograd functions are not traced here (tp = 1): dynamo
rewrites their in-place collectives into functional ones copied into the output, and test_compile.py's tp=2
scenarios agree with eager under torch 2.11.
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
# x += y and friends, x[i] = y: operator's in-place functions as dynamo records them
IN_PLACE_FUNCTIONS = {
    getattr(operator, n) for n in dir(operator) if n[0] == "i" and {n[1:], n[1:] + "_"} & set(dir(operator))
}
IN_PLACE_FUNCTIONS |= {operator.setitem}
IN_PLACE_METHODS = {f"__{f.__name__}__" for f in IN_PLACE_FUNCTIONS}  # x.__iadd__(y), x.__setitem__(i, y)
OPERATOR_FUNCTIONS = {f for f in vars(operator).values() if callable(f)}  # and_, or_, not_: not in place


def _in_place(node: torch.fx.Node) -> bool:
    """Whether a dynamo graph node changes a tensor in place: `x.mul_(y)`, `x += y`, `x[i] = y`, `inplace=True`, an
    out= or a mutable aten op."""
    if node.kwargs.get("inplace") or "out" in node.kwargs:
        return True
    if node.op == "call_method":
        name = node.target  # x.mul_(y), x.__iadd__(y), x.__setitem__(i, y)
        if name.startswith("__") and name.endswith("__"):
            return name in IN_PLACE_METHODS
        return name.endswith("_")
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    name = getattr(target, "__name__", "")
    if target in OPERATOR_FUNCTIONS:
        return target in IN_PLACE_FUNCTIONS
    return name.endswith("_") and not name.startswith("__")


@pytest.fixture
def traced(monkeypatch):
    """compile_layers with dynamo's graphs recorded and run as traced (no inductor).

    Yields {forward body: (its in-place ops, its call nodes)}, filled as the model runs.
    """
    found: dict[str, tuple[list[str], list[torch.fx.Node]]] = {}

    def record(gm: torch.fx.GraphModule, example_inputs):
        for name, sub in gm.named_modules():
            if name.startswith("fwd_body") and isinstance(sub, torch.fx.GraphModule):
                nodes = [n for n in sub.graph.nodes if n.op in ("call_function", "call_method")]
                found[f"{len(found)}:{name}"] = [str(n.target) for n in nodes if _in_place(n)], nodes
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
    calls = [str(getattr(n.target, "__name__", n.target)) for _, nodes in traced.values() for n in nodes]
    assert "linalg_vector_norm" in calls and "silu" in calls, calls  # RMSNorm's and SwiGLU's forwards were traced
    assert {name: ops for name, (ops, _) in traced.items() if ops} == {}


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
