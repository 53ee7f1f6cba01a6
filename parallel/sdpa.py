"""Scaled dot-product attention with grouped key/value heads, arranged so that CUDA's fused kernels accept it.

torch's SDPA picks its kernel per call (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, select_sdp_backend:
flash, then memory-efficient, then math; cuDNN first on some Hopper builds). Its rules that matter here:

    flash             no attn_mask at all (check_for_attn_mask); grouped kv heads accepted with enable_gqa
    memory-efficient  an attn_mask is accepted (a bool mask becomes an additive bias); in torch 2.13 q, k and v
                      must have the same number of heads (check_batch_size_and_num_heads_dense<false>; the
                      docstring of F.scaled_dot_product_attention: "GQA ... currently works only for
                      Flash_attention and math kernel on CUDA tensor")
    math              anything, by materialising the (B, Hq, Tq, S) scores and probabilities in the forward and
                      keeping them for the backward

So grouped heads with an explicit mask (document masks, sliding windows, the KV cache) fall to the math kernel on
CUDA: a (B, Hq, T, T) matrix per layer. `sdpa` repeats k and v up to the query heads first in exactly that case,
which makes the memory-efficient kernel eligible; the copies are (B, Hq, S, hd), T / hd times smaller than the
scores they avoid. Causal attention without a mask keeps enable_gqa (flash takes it, no copies), and so does the
CPU, whose flash kernel takes a mask with grouped heads (torch._fused_sdp_choice picks it there in torch 2.13).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from parallel.layers import cpu_has_native_bf16


def repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, Hkv, S, hd) -> (B, n_heads, S, hd): kv head g serves query heads g r .. g r + r - 1 (r = n_heads / Hkv).

    The grouping of SDPA's enable_gqa and Hugging Face's repeat_kv (repeat_interleave over the head dim).
    """
    B, n_kv, S, hd = x.shape
    if n_kv == n_heads:
        return x
    r = n_heads // n_kv
    return x[:, :, None].expand(B, n_kv, r, S, hd).reshape(B, n_heads, S, hd)  # (B, Hkv, r, S, hd) -> (B, Hq, S, hd)


def expands_kv(device: torch.device, n_heads: int, n_kv_heads: int, masked: bool) -> bool:
    """Whether `sdpa` repeats k and v to the query heads: grouped heads with an explicit mask on CUDA (see above)."""
    return device.type == "cuda" and masked and n_heads != n_kv_heads


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of q (B, Hq, T, hd) over k, v (B, Hkv, S, hd), Hq a multiple of Hkv -> (B, Hq, T, hd) in q's dtype.

    `mask` (B or 1, 1, T, S) bool, True = attend; None = causal (T == S). Query head j uses kv head j // (Hq / Hkv).
    """
    dtype = q.dtype
    if q.device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        # without bf16 hardware torch's CPU attention kernels run bf16 several times slower than fp32
        q, k, v = q.float(), k.float(), v.float()
    n_heads = q.shape[1]
    if expands_kv(q.device, n_heads, k.shape[1], mask is not None):
        # the memory-efficient kernel takes the mask but not grouped heads (module docstring): without the copies
        # SDPA would run the math kernel and build (B, Hq, T, S) scores
        k, v = repeat_kv(k, n_heads), repeat_kv(v, n_heads)  # (B, Hq, S, hd)
    y = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=n_heads != k.shape[1]
    )
    return y.to(dtype)
