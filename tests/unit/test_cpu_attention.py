"""parallel.sdpa.CpuAttention: compiled CPU training's attention (bf16: flash forward, blocked backward; fp32 causal:
blocked both ways, the probabilities kept) vs float64.

The reference is softmax(q k^T / sqrt(hd) + mask) v written out in float64 with the kv heads repeated
(transformers' repeat_kv), differentiated by autograd. T = 200 with 64-query blocks gives four blocks, the last a
partial one; grouped heads (4 query heads over 2 kv heads); causal, and documents with a sliding window.

- The formulas in fp32 (eager: the same Python ops inductor compiles), to 1e-5: the fp32 causal form; the
  recomputing backward after torch's flash forward, causal (bf16's form) and with documents.
- Its precision in bf16 with sharp attention (logits of standard deviation about 9, where scores rounded to bf16
  before the exp were 8x less accurate): the gradients must be within 2x of the error of torch's own bf16 SDPA on
  the same inputs.
- A compiled fp32 model with activation checkpointing against the same model eager (torch's SDPA), to 1e-5,
  and no flash kernel ran in it.
- The model as the trainer's bf16 runs it (fp32 weights under bf16 autocast, where RoPE leaves q and k fp32),
  compiled (train.compile) with packed documents and activation checkpointing, against the same model eager (torch's
  SDPA): the loss and every attention weight's gradient agree to bf16's tolerance.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import parallel.sdpa as sdpa_mod
from modeling.compile import compile_layers
from modeling.config import ModelConfig
from modeling.llama import LlamaForCausalLM, document_causal_mask
from parallel.layers import cpu_has_native_bf16

B, HQ, HKV, T, HD = 2, 4, 2, 200, 16
DOCS = torch.tensor([[0] * 50 + [1] * 150, [3] * 120 + [4] * 80])
FLASH_BACKWARD = "aten::_scaled_dot_product_flash_attention_for_cpu_backward"


def _inputs(dtype: torch.dtype, sharpness: float = 1.0, shape=(B, HQ, HKV, T, HD)):
    b, hq, hkv, t, hd = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, t, hd, generator=g) for h in (hq, hkv, hkv))
    q, k = q * sharpness, k * sharpness
    grad_out = torch.randn(b, hq, t, hd, generator=g).to(dtype)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], grad_out


def _float64(q, k, v, mask, grad_out):
    """Output and (dq, dk, dv) of masked softmax attention in float64 (mask True = attend; None = causal)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    t, hd = q.shape[2:]
    mask = torch.ones(t, t, dtype=torch.bool).tril() if mask is None else mask
    r = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(r, dim=1).transpose(-1, -2) / hd**0.5
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.repeat_interleave(r, dim=1)
    out.backward(grad_out.double())
    return [out.detach(), q.grad, k.grad, v.grad]


def _errors(got, want) -> list[float]:
    return [((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, want, strict=True)]


def _run(fn, q, k, v, mask, grad_out):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v, mask)
    out.backward(grad_out)
    return [out, q.grad, k.grad, v.grad]


def _recomputing(q, k, v, mask):
    """torch's flash forward and attention_backward recomputing the probabilities (CpuAttention's bf16 form)."""

    class Recomputing(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            q, k, v, out, lse = ctx.saved_tensors
            return sdpa_mod.attention_backward(q, k, v, out, lse, grad_out, None)

    assert mask is None
    return Recomputing.apply(q, k, v)


@pytest.mark.parametrize("form", ["fp32 causal", "recomputing causal", "recomputing documents"])
def test_formulas_equal_float64(monkeypatch, form):
    monkeypatch.setattr(sdpa_mod, "BACKWARD_BLOCK", 64)
    assert sdpa_mod.PROBS_BLOCK == 64
    (q, k, v), grad_out = _inputs(torch.float32)
    mask = document_causal_mask(DOCS, 40) if form.endswith("documents") else None  # (B, 1, T, T), window 40
    fn = _recomputing if form == "recomputing causal" else sdpa_mod.CpuAttention.apply
    got = _run(fn, q, k, v, mask, grad_out)
    for name, err in zip(("out", "dq", "dk", "dv"), _errors(got, _float64(q, k, v, mask, grad_out)), strict=True):
        assert err < 1e-5, (name, err)


@pytest.mark.parametrize("shape", [(1, 2, 2, 1, 16), (3, 4, 4, 63, 16), (1, 8, 2, 65, 32)], ids=str)
def test_fp32_causal_form_at_other_shapes(shape):
    """One query; a block short of full, one over; no grouping and 4 query heads per kv head; B 1 and 3."""
    (q, k, v), grad_out = _inputs(torch.float32, shape=shape)
    got = _run(sdpa_mod.CpuAttention.apply, q, k, v, None, grad_out)
    want = _float64(q, k, v, None, grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        err = ((a.double() - b).norm() / b.norm().clamp_min(1.0)).item()  # dq, dk of one query are 0
        assert err < 1e-5, (name, err)


def _eager_and_compiled(autocast: bool, docs: torch.Tensor | None = None):
    """A tiny model's (loss, gradients) eager and compiled (train.compile), with activation checkpointing, under bf16
    autocast or in fp32, and the names of the ops the compiled run called. 160 queries: fp32 blocks of 64, 64, 32."""
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    eager = LlamaForCausalLM(cfg)
    compiled = copy.deepcopy(eager)
    compile_layers(compiled)
    ids = torch.randint(0, 128, (2, 161))

    def run(model):
        model.activation_checkpointing = True
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids[:, :-1], targets=ids[:, 1:], document_ids=docs).loss
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters()}  # bf16 q/k/v, gate/up: CpuBf16Matmul

    want = run(eager)
    with torch.profiler.profile() as prof:
        got = run(compiled)
    return want, got, {e.name for e in prof.events()}


def _assert_close(want, got, rel: float) -> None:
    (want_loss, want_grads), (loss, grads) = want, got
    assert loss == pytest.approx(want_loss, rel=rel / 10)
    for name, grad in grads.items():
        err = ((grad - want_grads[name]).norm() / want_grads[name].norm()).item()
        assert err < rel, (name, err)


def test_compiled_fp32_model_with_checkpointing_matches_eager():
    want, got, ran = _eager_and_compiled(autocast=False)
    assert not {n for n in ran if "flash_attention" in n}, "the compiled fp32 model ran torch's flash kernels"
    _assert_close(want, got, 1e-5)


def test_which_form_runs():
    """fp32 takes the blocked form only causal and up to MAX_BLOCKS x PROBS_BLOCK tokens, bf16 up to 2048."""

    def block(dtype, T, masked=False):
        q = torch.empty(1, 1, T, HD, dtype=dtype)
        return sdpa_mod.cpu_attention_block(q, torch.ones(1, 1, T, T, dtype=torch.bool) if masked else None)

    assert (block(torch.float32, 1024), block(torch.float32, 1025), block(torch.float32, 64, True)) == (64, None, None)
    assert (block(torch.bfloat16, 2048), block(torch.bfloat16, 2049), block(torch.bfloat16, 64, True)) == (
        128,
        None,
        128,
    )
    assert block(torch.float16, 64) is None


def test_bf16_backward_is_as_accurate_as_torch_under_sharp_attention(monkeypatch):
    monkeypatch.setattr(sdpa_mod, "BACKWARD_BLOCK", 64)
    (q, k, v), grad_out = _inputs(torch.bfloat16, sharpness=3.0)
    want = _float64(q, k, v, None, grad_out)

    def torch_sdpa(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)

    theirs = _errors(_run(torch_sdpa, q, k, v, None, grad_out), want)
    ours = _errors(_run(sdpa_mod.CpuAttention.apply, q, k, v, None, grad_out), want)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, theirs, strict=True):
        assert a < 2 * b + 1e-4, (name, a, b)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="without bf16 hardware, bf16 attention runs in fp32 (SDPA)")
def test_compiled_bf16_model_with_documents_and_checkpointing_matches_eager():
    docs = torch.tensor([[0] * 60 + [1] * 100, [2] * 160])
    want, got, ran = _eager_and_compiled(autocast=True, docs=docs)
    assert FLASH_BACKWARD not in ran, "the compiled model ran torch's flash backward, not CpuAttention's"
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ran
    _assert_close(want, got, 3e-2)


def test_eager_and_no_grad_keep_sdpa(monkeypatch):
    """Outside a compiled region (eval, generation, eager training) `sdpa` stays torch's SDPA, bf16 included."""
    monkeypatch.setattr(sdpa_mod.CpuAttention, "apply", lambda *a: pytest.fail("CpuAttention ran eagerly"))
    q, k, v = (torch.randn(1, h, 8, HD, dtype=torch.bfloat16) for h in (HQ, HKV, HKV))
    sdpa_mod.sdpa(q.requires_grad_(), k, v, None).sum().backward()
    with torch.no_grad():
        sdpa_mod.sdpa(q, k, v, None)


def test_compiled_without_a_backward_keeps_sdpa():
    """Compiled fp32 attention whose inputs need no gradient runs torch's kernel, not the slower blocked forward."""
    q, k, v = (torch.randn(1, h, 8, HD) for h in (HQ, HKV, HKV))
    with torch.profiler.profile() as prof:
        torch.compile(sdpa_mod.sdpa)(q, k, v, None)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in {e.name for e in prof.events()}
