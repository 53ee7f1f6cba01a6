"""The hand-written autograd functions (RMSNorm, RoPE, SwiGLU) against the plain formulas autograd differentiates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling.config import ModelConfig
from modeling.mlp import swiglu
from modeling.norm import rms_norm
from modeling.rope import RotaryEmbedding, apply_rotary
from tests.host_syncs import HostSyncs


def plain_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward (statistics in fp32, fp64 kept for gradcheck)."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def plain_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x cos + rotate_half(x) sin as transformers writes it, for x (B, T, heads, d) and (B, T, d) tables."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.unsqueeze(2) + torch.cat((-x2, x1), dim=-1) * sin.unsqueeze(2)


def rotary_tables(B: int, T: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, d) cos/sin of random angles in the rotate-half layout [angles, angles]."""
    angles = torch.rand(B, T, d // 2, dtype=torch.float64) * 10
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], seed: int = 1) -> tuple[torch.Tensor, ...]:
    """Gradients of <out, r> for a fixed random r."""
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, inputs, r)


def test_rms_norm_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-6), (x, w))
    torch.testing.assert_close(rms_norm(x, w, 1e-6), plain_rms_norm(x, w, 1e-6), atol=1e-12, rtol=0)


def test_rms_norm_fp32_equals_plain_formula_and_its_gradients():
    torch.manual_seed(0)
    x = (torch.randn(4, 16, 64) * 3).requires_grad_()
    w = (1 + torch.randn(64) * 0.1).requires_grad_()
    ours, ref = rms_norm(x, w, 1e-5), plain_rms_norm(x, w, 1e-5)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    for a, b in zip(grads(ours, (x, w)), grads(ref, (x, w)), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_rms_norm_single_input_gradients():
    """Only x, or only the weight, requires grad (frozen norms, or a detached input)."""
    x, w = torch.randn(3, 8), torch.randn(8)
    (dx,) = grads(rms_norm(x.requires_grad_(), w, 1e-6), (x,))
    (dx_ref,) = grads(plain_rms_norm(x, w, 1e-6), (x,))
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)
    x.requires_grad_(False)
    (dw,) = grads(rms_norm(x, w.requires_grad_(), 1e-6), (w,))
    (dw_ref,) = grads(plain_rms_norm(x, w, 1e-6), (w,))
    torch.testing.assert_close(dw, dw_ref, atol=1e-5, rtol=1e-5)


def test_rms_norm_bf16_keeps_dtype_and_matches_the_fp32_reference():
    torch.manual_seed(0)
    x = (torch.randn(2, 8, 64) * 4).bfloat16().requires_grad_()
    w = (1 + torch.randn(64) * 0.1).bfloat16().requires_grad_()
    ours, ref = rms_norm(x, w, 1e-6), plain_rms_norm(x, w, 1e-6)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, atol=0, rtol=1e-2)  # one bf16 rounding apart at most
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    for a, b in zip(grads(ours, (x, w)), grads(plain_rms_norm(x32, w32, 1e-6), (x32, w32)), strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("batch_tables", [True, False], ids=["per-row tables", "tables expanded over the batch"])
def test_rotary_gradcheck_float64(batch_tables):
    torch.manual_seed(0)
    cos, sin = rotary_tables(2 if batch_tables else 1, 5, 8, torch.float64)
    cos, sin = cos.expand(2, -1, -1), sin.expand(2, -1, -1)
    packed = torch.randn(2, 5, 3 * 8, dtype=torch.float64, requires_grad=True)

    def rotate_middle_heads(packed):  # strided (B, T, 2, d) view of a packed projection, as attention passes it
        return apply_rotary(packed[..., 8:].view(2, 5, 2, 8), cos, sin)

    assert torch.autograd.gradcheck(rotate_middle_heads, (packed,))
    ref = plain_rotary(packed[..., 8:].view(2, 5, 2, 8), cos, sin)
    torch.testing.assert_close(rotate_middle_heads(packed), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_equals_rotate_half_formula(dtype):
    torch.manual_seed(0)
    cos, sin = rotary_tables(3, 16, 32, dtype)
    x = torch.randn(3, 16, 4, 32, dtype=dtype, requires_grad=True)
    ours, ref = apply_rotary(x, cos, sin), plain_rotary(x, cos, sin)
    assert ours.dtype == dtype and ours.is_contiguous()
    tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
    torch.testing.assert_close(ours, ref, **tol)
    torch.testing.assert_close(grads(ours, (x,))[0], grads(ref, (x,))[0], **tol)


def test_rotary_keeps_bf16_with_fp32_tables_eagerly_and_compiled():
    """Under bf16 autocast q, k are bf16 and the tables fp32 (the residual stream's dtype): both forms return bf16
    (compiled, the products would promote q, k to fp32 and attention and the all-to-alls after it with them)."""
    torch.manual_seed(0)
    cos, sin = rotary_tables(2, 16, 32, torch.float32)
    x = torch.randn(2, 16, 4, 32).bfloat16()
    ref = plain_rotary(x.float(), cos, sin)
    compiled = torch.compile(apply_rotary, backend="eager", fullgraph=True)  # traced: the is_compiling() form
    for y in (apply_rotary(x, cos, sin), compiled(x, cos, sin)):
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.02)


def test_rotary_tables_for_batch_shared_positions_equal_per_row_positions():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    rope = RotaryEmbedding(cfg)
    shared = torch.arange(7).expand(3, 7)  # one row expanded: computed once, returned with a stride-0 batch
    cos, sin = rope(shared, torch.float32)
    cos_ref, sin_ref = rope(shared.contiguous(), torch.float32)
    assert cos.shape == cos_ref.shape == (3, 7, cfg.head_dim) and cos.stride(0) == 0 and cos_ref.stride(0) != 0
    torch.testing.assert_close(cos, cos_ref, atol=0, rtol=0)
    torch.testing.assert_close(sin, sin_ref, atol=0, rtol=0)


@pytest.mark.parametrize("longest", [5, 8, 40])
def test_dynamic_rope_reads_nothing_on_the_host_and_scales_past_max_positions(longest):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      max_position_embeddings=8, rope_scaling={"rope_type": "dynamic", "factor": 2.0})  # fmt: skip
    positions = torch.arange(longest).expand(2, longest)
    with HostSyncs() as syncs:  # on a GPU a read of the length would wait for the queue every forward
        cos, sin = RotaryEmbedding(cfg)(positions, torch.float32)
    assert syncs.count == 0, syncs.calls
    d, theta = cfg.head_dim, cfg.rope_theta  # dynamic NTK (transformers' formula) in float64 on the host
    if longest > 8:
        theta *= (2.0 * longest / 8 - 1.0) ** (d / (d - 2))
    angles = torch.arange(longest, dtype=torch.float64)[:, None] / theta ** (torch.arange(0, d, 2.0).double() / d)
    torch.testing.assert_close(cos[1], angles.repeat(1, 2).cos().float(), atol=2e-5, rtol=0)
    torch.testing.assert_close(sin[1], angles.repeat(1, 2).sin().float(), atol=2e-5, rtol=0)


def test_swiglu_gradcheck_float64():
    torch.manual_seed(0)
    gate_up = torch.randn(2, 3, 2 * 6, dtype=torch.float64, requires_grad=True)

    def fused(gate_up):  # strided halves of one packed matmul output, as the MLP passes them
        gate, up = gate_up.split(6, dim=-1)
        return swiglu(gate, up)

    assert torch.autograd.gradcheck(fused, (gate_up,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_equals_silu_times_up(dtype):
    torch.manual_seed(0)
    gate = (torch.randn(4, 16, 48) * 3).to(dtype).requires_grad_()
    up = torch.randn(4, 16, 48).to(dtype).requires_grad_()
    ours, ref = swiglu(gate, up), F.silu(gate) * up
    assert ours.dtype == dtype
    tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 0.02, "rtol": 0.02}
    torch.testing.assert_close(ours, ref, **tol)
    for a, b in zip(grads(ours, (gate, up)), grads(ref, (gate, up)), strict=True):
        torch.testing.assert_close(a, b, **tol)
