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

So grouped heads fall to the math kernel on CUDA wherever flash is out: with an explicit mask (document masks,
sliding windows, the KV cache), in fp32 (flash takes fp16 and bf16 only) and on GPUs before sm80 (no flash kernel):
a (B, Hq, T, T) matrix per layer.
`sdpa` repeats k and v up to the query heads first in exactly those cases, which makes the memory-efficient kernel
eligible; the copies are (B, Hq, S, hd), T / hd times smaller than the scores they avoid. Causal attention in bf16
or fp16 (the dtype SDPA computes in: autocast's where it applies) keeps enable_gqa (flash takes it, no copies), and
so does the CPU, whose flash kernel takes a mask with grouped heads (torch._fused_sdp_choice picks it there in torch
2.13).

Compiled CPU training (train.compile) runs `CpuAttention` instead, in two forms (`cpu_attention_block`):

    bf16, any mask, up to MAX_BLOCKS x BACKWARD_BLOCK = 2048 tokens: the same flash kernel forward, and a backward
        written as plain ops that inductor fuses. torch's CPU flash backward is slow in bf16 (for one layer of
        bench/throughput.py's model on 2 Xeon cores with AMX, 5.6x its own forward). The backward recomputes the
        probabilities from the forward's log-sum-exp one block of BACKWARD_BLOCK queries at a time, so it holds
        (B, Hq, block, S) scores, never (B, Hq, T, S).
    fp32, causal, up to MAX_BLOCKS x PROBS_BLOCK = 1024 tokens: the forward too is plain ops over blocks of
        PROBS_BLOCK queries, and it keeps each block's probabilities for the backward, which then skips the
        recomputation (a product and an exp per block). That costs memory: (T + PROBS_BLOCK) / 2 fp32 values per
        query and head, (T + 64) / (2 hd) times q's size (4.5x for bench/throughput.py's T = 512, hd = 64), where
        the flash kernel keeps one log-sum-exp. In fp32 the recomputing form is only level with torch's kernels
        (causal) or slower (documents), so fp32 with a mask keeps SDPA.

Under the causal mask a block multiplies only with the keys up to its last query (5/8 of the work of full blocks at
T = 4 blocks). `python bench/cpu_attention.py` measures forward + backward against torch's SDPA. Longer sequences
keep torch's flash kernels: the loop is unrolled into the compiled graph, and its blocks' scores grow with S. The
loop's length makes T part of the graph: each sequence length compiles its own (training's rows all have seq_len
tokens; a run that keeps changing T would reach dynamo's recompile_limit and run its layers eagerly). Both forms run
only where there is a backward: grad mode on and q, k or v requiring grad.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from parallel.mappings import compute_dtype

BACKWARD_BLOCK = 128  # queries per block of CpuAttention's bf16 backward
PROBS_BLOCK = 64  # queries per block of CpuAttention's fp32 causal forward and backward (it keeps the probabilities)
MAX_BLOCKS = 16  # blocks at most (the loop is unrolled into the compiled graph): longer sequences keep SDPA


def repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, Hkv, S, hd) -> (B, n_heads, S, hd): kv head g serves query heads g r .. g r + r - 1 (r = n_heads / Hkv).

    The grouping of SDPA's enable_gqa and Hugging Face's repeat_kv (repeat_interleave over the head dim).
    """
    B, n_kv, S, hd = x.shape
    if n_kv == n_heads:
        return x
    r = n_heads // n_kv
    return x[:, :, None].expand(B, n_kv, r, S, hd).reshape(B, n_heads, S, hd)  # (B, Hkv, r, S, hd) -> (B, Hq, S, hd)


def expands_kv(device: torch.device, dtype: torch.dtype, n_heads: int, n_kv_heads: int, masked: bool) -> bool:
    """Whether `sdpa` repeats k and v to the query heads: grouped heads on CUDA where flash is out (module docstring).

    Flash is out with an explicit mask, in a `dtype` it does not take (fp32), and on GPUs older than sm80 (V100, T4:
    torch's check_flash_attention_hardware_support).
    """
    if device.type != "cuda" or n_heads == n_kv_heads:
        return False
    flash = dtype in (torch.float16, torch.bfloat16) and torch.cuda.get_device_properties(device).major >= 8
    return masked or not flash


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of q (B, Hq, T, hd) over k, v (B, Hkv, S, hd), Hq a multiple of Hkv -> (B, Hq, T, hd) in q's dtype.

    `mask` (B or 1, 1, T, S) bool, True = attend; None = causal (T == S). Query head j uses kv head j // (Hq / Hkv).
    """
    dtype = q.dtype
    compiled_cpu = q.device.type == "cpu" and torch.compiler.is_compiling() and torch.is_grad_enabled()
    compiled_cpu = compiled_cpu and (q.requires_grad or k.requires_grad or v.requires_grad)  # a backward to run
    if compiled_cpu and torch.is_autocast_enabled("cpu"):  # autocast's cast of SDPA (CpuAttention's kernel has none)
        q, k, v = (t.to(torch.get_autocast_dtype("cpu")) for t in (q, k, v))
    if compiled_cpu and k.dtype == v.dtype == q.dtype and cpu_attention_block(q, mask):
        return CpuAttention.apply(q, k, v, mask).to(dtype)
    n_heads = q.shape[1]
    if expands_kv(q.device, compute_dtype(q), n_heads, k.shape[1], mask is not None):
        # the memory-efficient kernel takes a mask and fp32 but not grouped heads (module docstring): without the
        # copies SDPA would run the math kernel and build (B, Hq, T, S) scores
        k, v = repeat_kv(k, n_heads), repeat_kv(v, n_heads)  # (B, Hq, S, hd)
    y = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=n_heads != k.shape[1]
    )
    return y.to(dtype)


def cpu_attention_block(q: torch.Tensor, mask: torch.Tensor | None) -> int | None:
    """Queries per block of CpuAttention for q (B, Hq, T, hd) under `mask`, or None where SDPA stays (module docstring).

    bf16: BACKWARD_BLOCK (flash forward, blocked backward); fp32 and causal: PROBS_BLOCK (blocked both ways, the
    probabilities kept); either up to MAX_BLOCKS blocks.
    """
    if q.dtype == torch.bfloat16:
        block = BACKWARD_BLOCK
    elif q.dtype == torch.float32 and mask is None:
        block = PROBS_BLOCK
    else:
        return None
    return block if q.shape[2] <= MAX_BLOCKS * block else None


def _causal(i: int, n_q: int, n_k: int, device: torch.device) -> torch.Tensor:
    """(n_q, n_k) bool: query i + a attends to key b <= i + a (a block of the causal mask)."""
    return torch.arange(i, i + n_q, device=device)[:, None] >= torch.arange(n_k, device=device)


class CpuAttention(torch.autograd.Function):
    """`sdpa` on the CPU in a compiled layer, in plain ops that inductor fuses (the two forms: module docstring).

    Same arguments and result as `sdpa` (grouped heads, `mask` (B or 1, 1, T, S) bool or None = causal). bf16
    (and fp32 with a mask, which `sdpa` leaves to SDPA; bench/cpu_attention.py and the tests call it directly):
    torch's flash kernel forward, which keeps its output and log-sum-exp as SDPA's own backward does, and
    `attention_backward` recomputes the probabilities. fp32 causal (S == T): `causal_attention_probs` forward, whose
    probabilities `attention_backward` reuses. The length limits are `sdpa`'s (`cpu_attention_block`).
    """

    @staticmethod
    def forward(ctx, q, k, v, mask):
        """(B, Hq, T, hd) q, (B, Hkv, S, hd) k, v -> (B, Hq, T, hd)."""
        if q.dtype == torch.float32 and mask is None:
            out, probs = causal_attention_probs(q, k, v)
            ctx.save_for_backward(q, k, v, out, None, None, *probs)
            return out
        additive = None  # the kernel takes an additive mask in q's dtype
        if mask is not None:
            additive = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, -math.inf)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, mask is None, attn_mask=additive
        )
        ctx.save_for_backward(q, k, v, out, lse, mask)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        """Gradients of q, k and v (and none for the mask) from `attention_backward`, its dtypes its own.

        A backward called inside an autocast region would otherwise run its fp32 products in bf16.
        """
        q, k, v, out, lse, mask, *probs = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            return (*attention_backward(q, k, v, out, lse, grad_out.to(q.dtype), mask, probs or None), None)


def causal_attention_probs(q, k, v) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Causal softmax(q k^T / sqrt(hd)) v for (B, Hq, T, hd) q over (B, Hkv, T, hd) k, v, and its probabilities.

    Per block of PROBS_BLOCK queries, over the keys up to the block's last query: a kv head's r query heads stacked
    into one matrix as in `attention_backward`, whose `probs` the returned (B, Hkv, r, n_q, n_k) blocks are.
    """
    B, Hq, T, hd = q.shape
    Hkv = k.shape[1]
    r = Hq // Hkv
    q5 = q.reshape(B, Hkv, r, T, hd)
    out, probs = [], []
    for i in range(0, T, PROBS_BLOCK):
        n_q = min(PROBS_BLOCK, T - i)
        n_k = i + n_q
        qb = q5[:, :, :, i : i + n_q].reshape(B, Hkv, r * n_q, hd)
        scores = (qb @ k[:, :, :n_k].transpose(-1, -2)).view(B, Hkv, r, n_q, n_k) * hd**-0.5
        p = scores.masked_fill(~_causal(i, n_q, n_k, q.device), -math.inf).softmax(-1)
        probs.append(p)
        out.append((p.view(B, Hkv, r * n_q, n_k) @ v[:, :, :n_k]).view(B, Hkv, r, n_q, hd))
    return torch.cat(out, dim=3).view(B, Hq, T, hd), probs


def attention_backward(q, k, v, out, lse, grad_out, mask, probs=None):
    """dq, dk, dv of softmax(q k^T / sqrt(hd) + mask) v, given its output and (B, Hq, T) log-sum-exp (fp32).

    Query head j uses kv head j // r (r = Hq / Hkv): a kv head's r query heads are stacked into one matrix, so the
    sums over them are the matmuls' own. Per block of queries: P = exp(q k^T / sqrt(hd) - lse) where attended,
    dV += P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO * O)) / sqrt(hd), dQ = dS K, dK += dS^T Q. The
    scores are recomputed in fp32 (from bf16 they would carry |s| 2^-8 absolute error into exp(s - lse), which grows
    with sharp attention); the probabilities and dS are rounded to q's dtype for their matmuls, as flash kernels
    do; each block's dk and dv products, in q's dtype, are summed in fp32: as one sum of the blocks' products
    zero-padded to all S keys, which inductor fuses into one masked pass (adding each into a slice of a running
    total chained the slices' masks into a kernel that took 2.6 ms per layer of bench/throughput.py's model, 1.5
    with the sum; the blocks' products, T / block / 2 + 1/2 times dk's size in all under the causal mask, are then
    alive together).

    `probs`, the forward's probabilities (`causal_attention_probs`, fp32, causal): P per block of PROBS_BLOCK
    queries is taken from them instead of recomputed (`lse` is then unused).
    """
    B, Hq, T, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    assert mask is None or mask.shape[1] == 1, f"mask {tuple(mask.shape)}: one mask for all heads, (B or 1, 1, T, S)"
    r, scale = Hq // Hkv, hd**-0.5
    delta = (grad_out.float() * out.float()).sum(-1).view(B, Hkv, r, T, 1)  # rowsum(dO * O)
    q5, do5 = q.reshape(B, Hkv, r, T, hd), grad_out.reshape(B, Hkv, r, T, hd)
    block = BACKWARD_BLOCK if probs is None else PROBS_BLOCK
    dq, dk, dv = [], [], []  # per block: (B, Hkv, r, n_q, hd) dq; fp32 dk and dv padded to S keys
    for j, i in enumerate(range(0, T, block)):
        n_q = min(block, T - i)
        n_k = min(i + n_q, S) if mask is None else S  # causal: no key after the block's last query
        qb = q5[:, :, :, i : i + n_q].reshape(B, Hkv, r * n_q, hd)
        dob = do5[:, :, :, i : i + n_q].reshape(B, Hkv, r * n_q, hd)
        kb, vb = k[:, :, :n_k], v[:, :, :n_k]
        if probs is not None:
            p = probs[j]
        else:
            attend = _causal(i, n_q, n_k, q.device) if mask is None else mask[:, :, i : i + n_q].unsqueeze(2)
            scores = (qb.float() @ kb.float().transpose(-1, -2)).view(B, Hkv, r, n_q, n_k)  # fp32 (see above)
            lse_b = lse.view(B, Hkv, r, T, 1)[:, :, :, i : i + n_q]
            p = torch.where(attend, torch.exp(scores * scale - lse_b), 0.0)
        dp = (dob @ vb.transpose(-1, -2)).view(B, Hkv, r, n_q, n_k).float()
        ds = (p * (dp - delta[:, :, :, i : i + n_q]) * scale).to(q.dtype).view(B, Hkv, r * n_q, n_k)
        pad = (0, 0, 0, S - n_k)  # keys n_k .. S - 1 get nothing from this block
        dv.append(F.pad((p.to(q.dtype).view(B, Hkv, r * n_q, n_k).transpose(-1, -2) @ dob).float(), pad))
        dk.append(F.pad((ds.transpose(-1, -2) @ qb).float(), pad))
        dq.append((ds @ kb).view(B, Hkv, r, n_q, hd))
    return torch.cat(dq, dim=3).view(B, Hq, T, hd), sum(dk).to(k.dtype), sum(dv).to(v.dtype)
