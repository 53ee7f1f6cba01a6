"""parallel.sdpa.CpuAttention: compiled bf16 CPU training's attention (flash forward, blocked backward) vs float64.

The reference is softmax(q k^T / sqrt(hd) + mask) v written out in float64 with the kv heads repeated
(transformers' repeat_kv), differentiated by autograd. T = 200 with 64-query blocks gives four blocks, the last a
partial one; grouped heads (4 query heads over 2 kv heads); causal, and documents with a sliding window. In fp32
CpuAttention is called directly (compiled), which checks the backward's formulas to 1e-5; bf16, and fp32 inputs
under bf16 autocast (the trainer's bf16, where RoPE leaves q and k fp32 and v bf16), go through `sdpa` as the
compiled layer calls it, and a spy checks that they took `attention_backward` (the reference alone would also pass
on SDPA's own backward).
"""

import pytest
import torch

import parallel.sdpa as sdpa_mod
from modeling.llama import document_causal_mask

B, HQ, HKV, T, HD = 2, 4, 2, 200, 16
DOCS = torch.tensor([[0] * 50 + [1] * 150, [3] * 120 + [4] * 80])


def _reference_grads(q, k, v, mask, grad_out):
    """Output and (dq, dk, dv) of masked softmax attention in float64 (mask True = attend)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    r = HQ // HKV
    scores = q @ k.repeat_interleave(r, dim=1).transpose(-1, -2) / HD**0.5
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.repeat_interleave(r, dim=1)
    out.backward(grad_out.double())
    return out.detach(), (q.grad, k.grad, v.grad)


@pytest.mark.parametrize(
    ("dtype", "masked", "autocast", "tol"),
    [
        (torch.float32, False, False, 1e-5),
        (torch.float32, True, False, 1e-5),
        (torch.bfloat16, False, False, 2e-2),
        (torch.float32, True, True, 2e-2),
    ],
)
def test_compiled_cpu_attention_equals_float64(monkeypatch, dtype, masked, autocast, tol):
    fn = sdpa_mod.sdpa if dtype == torch.bfloat16 or autocast else sdpa_mod.CpuAttention.apply
    monkeypatch.setattr(sdpa_mod, "BACKWARD_BLOCK", 64)
    traced = []
    real = sdpa_mod.attention_backward
    monkeypatch.setattr(sdpa_mod, "attention_backward", lambda *a: traced.append(1) or real(*a))
    torch._dynamo.reset()  # a fresh trace: the patched block size and spy are read while tracing
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, T, HD, generator=g, dtype=dtype).requires_grad_() for h in (HQ, HKV, HKV))
    grad_out = torch.randn(B, HQ, T, HD, generator=g, dtype=dtype)
    mask = document_causal_mask(DOCS, 40) if masked else None  # (B, 1, T, T): documents, window 40
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = torch.compile(fn)(q, k, v.to(torch.bfloat16) if autocast else v, mask)
    out.backward(grad_out)
    want_mask = mask if masked else torch.ones(T, T, dtype=torch.bool).tril()
    want, want_grads = _reference_grads(q, k, v, want_mask, grad_out)
    assert traced, "the compiled function did not run CpuAttention's backward"
    results = (out, q.grad, k.grad, v.grad)
    for name, got, ref in zip(("out", "dq", "dk", "dv"), results, (want, *want_grads), strict=True):
        err = ((got.double() - ref).norm() / ref.norm()).item()
        assert err < tol, (name, err)


def test_eager_and_no_grad_keep_sdpa(monkeypatch):
    """Outside a compiled region (eval, generation, eager training) `sdpa` stays torch's SDPA."""
    monkeypatch.setattr(sdpa_mod.CpuAttention, "apply", lambda *a: pytest.fail("CpuAttention ran eagerly"))
    q, k, v = torch.randn(1, HQ, 8, HD), torch.randn(1, HKV, 8, HD), torch.randn(1, HKV, 8, HD)
    sdpa_mod.sdpa(q.requires_grad_(), k, v, None).sum().backward()
    with torch.no_grad():
        sdpa_mod.sdpa(q, k, v, None)
