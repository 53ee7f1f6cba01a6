"""Vocab-parallel cross-entropy: the loss over logits whose vocabulary is split over the tensor group.

Rank r holds logits z[..., v] for v in its slice V_r. With m = max_v z_v (all-reduce MAX),

    loss = log sum_v exp(z_v - m) - (z_t - m)

where both the sum over v and the target logit z_t (held by exactly one rank) are all-reduced (SUM) as one
stacked tensor. The gradient is softmax(z) - onehot(t), computed on each rank for its own slice only: the
full-vocabulary logits are never gathered. Tokens whose target is `ignore_index` contribute nothing; the loss is
the mean over the other tokens, as F.cross_entropy(reduction="mean").

`reduction="none"` returns the per-token negative log-likelihood instead, the (N,) fp32 vector

    nll_n = (log sum_v exp(z_nv - m_n) - (z_nt - m_n)) * valid_n = -log p(t_n | x_n)    (0 where t_n is ignored)

from the same two all-reduces (every rank ends with the whole vector; the vocabulary is still never gathered), as
F.cross_entropy(reduction="none"). Its backward takes an (N,) upstream gradient g and gives, on each rank's slice,
dL/dz_n = (softmax(z_n) - onehot(t_n)) * valid_n * g_n: the mean's gradient with g_n in place of g / n_valid.
Sequence log-probabilities (preference losses, training.dpo_loss) are sums of -nll_n over a response's tokens.

A vocabulary padded to a multiple of tp (parallel.layers.padded_size) passes its real size as `vocab_size`: the
logits of the padding columns are set to -inf before the max, so they add exp(-inf) = 0 to the sum and get a zero
gradient: the loss is the one over the real vocabulary.

`vocab_parallel_linear_cross_entropy` fuses the output head's matmul into the same function: the local logits
z = X W_r^T become exp(z - m) in place and that one (N, V/tp) fp32 buffer turns into the gradient dL/dz in
backward (the softmax's normalisation is applied there), from which dX_r = dz W_r and dW_r = dz^T X. Head and loss
then allocate one logits-sized fp32 tensor per step instead of four (logits, log-softmax, and the two gradients of
the unfused backward), the largest activations of a small model; the collectives are the same.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.mappings import Group, group_rank, group_size
from parallel.token_ids import check_token_ids

IGNORE_INDEX = -100  # a target the loss skips (PyTorch's and transformers' convention; dataset.packing pads with it)


def _exp_and_loss(
    chunks: list[torch.Tensor], target: torch.Tensor, group: Group, ignore_index: int, vocab_size: int, reduction: str
):
    """Row chunks of the (N, V'/tp) fp32 logits z, overwritten with exp(z - m) -> loss, what backward needs.

    The loss is the mean over valid tokens, or with reduction="none" the (N,) per-token loss (0 where ignored).
    Columns at or past `vocab_size` (the padding of a vocabulary tp does not divide) are masked to -inf first.
    """
    sizes = [z.shape[0] for z in chunks]
    v_local = chunks[0].shape[-1]
    start = group_rank(group) * v_local
    real = max(0, min(v_local, vocab_size - start))  # this rank's real (unpadded) columns
    if real < v_local:
        for z in chunks:
            z[:, real:] = float("-inf")
    m = torch.cat([z.amax(dim=-1) for z in chunks])  # (N,); -inf only on a rank of padding alone
    if group_size(group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)

    valid = target != ignore_index
    t_local = target - start
    mine = valid & (t_local >= 0) & (t_local < v_local)
    t_local = t_local.clamp(0, v_local - 1)
    z_t, sum_exp = [], []
    for z, m_c, t_c in zip(chunks, m.split(sizes), t_local.split(sizes), strict=True):
        z.sub_(m_c.unsqueeze(-1))
        z_t.append(z.gather(-1, t_c.unsqueeze(-1)).squeeze(-1))  # (n,)
        sum_exp.append(z.exp_().sum(dim=-1))  # (n,)
    z_t = torch.where(mine, torch.cat(z_t), 0.0)  # not z_t * mine: a clamped index may read a -inf padding column
    stats = torch.stack([z_t, torch.cat(sum_exp)])  # (2, N): one all-reduce for both
    if group_size(group) > 1:
        dist.all_reduce(stats, group=group)
    z_t, sum_exp = stats

    # no valid target (a context-parallel chunk of prompt tokens, say) is a loss of 0 with zero gradients, not 0/0
    n_valid = valid.sum().clamp(min=1)
    nll = (sum_exp.log() - z_t) * valid  # (N,); sum_exp >= 1 (the max's own term), so ignored rows are exactly 0
    loss = nll if reduction == "none" else nll.sum() / n_valid
    return loss, (sum_exp, t_local, mine, valid, n_valid, *chunks)


def _logits_grad(
    grad_loss: torch.Tensor, reduction: str, reuse: bool, sum_exp, t_local, mine, valid, n_valid, *chunks
) -> list[torch.Tensor]:
    """dL/dz = (e / sum_e - onehot(t)) * valid * g, from the saved e = exp(z - m) chunks.

    g = grad_loss / n_valid for the mean (a scalar grad_loss), g = grad_loss for reduction="none" (an (N,) one).
    With `reuse` it is written over the chunks (no second logits-sized buffer); without, into copies: a graph
    whose backward runs twice (the zero-bubble schedules' split into input and weight gradients) needs them again.
    """
    if not reuse:
        chunks = tuple(e.clone() for e in chunks)
    per_token = grad_loss if reduction == "none" else grad_loss / n_valid  # (N,) or a scalar
    scale = valid.to(sum_exp.dtype) * per_token  # (N,)
    sizes = [e.shape[0] for e in chunks]
    for e, a, b, t_c, mine_c in zip(chunks, (scale / sum_exp).split(sizes), scale.split(sizes), t_local.split(sizes),
                                    mine.split(sizes), strict=True):  # fmt: skip
        e.mul_(a.unsqueeze(-1))  # saved for this backward only (or a copy): modified in place
        rows = torch.arange(e.shape[0], device=e.device)
        e[rows, t_c] -= b * mine_c
    return chunks


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """fwd: mean (or per-token) loss from vocab-sharded logits (2 all-reduces) / bwd: softmax - onehot, local shard."""

    @staticmethod
    def forward(
        ctx, logits, target, group: Group, ignore_index: int, vocab_size: int, reuse: bool, reduction: str = "mean"
    ):
        z = logits.to(torch.float32, copy=True)  # (N, V'/tp), becomes exp(z - m)
        loss, saved = _exp_and_loss([z], target, group, ignore_index, vocab_size, reduction)
        ctx.save_for_backward(*saved)
        ctx.logits_dtype, ctx.reuse, ctx.reduction = logits.dtype, reuse, reduction
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = _logits_grad(grad_loss, ctx.reduction, ctx.reuse, *ctx.saved_tensors)
        return grad.to(ctx.logits_dtype), None, None, None, None, None, None


# fp32 copies of bf16 logits are made on the CPU in row chunks of at most this many bytes: CPU allocators serve
# blocks of this size from memory they already hold, where one logits-sized block is mapped (and page-faulted)
# anew each step
_CHUNK_BYTES = 16 << 20


def fp32_chunk_rows(z: torch.Tensor) -> int:
    """Rows per fp32 chunk of the (N, V/tp) low-precision logits z: 16 MiB chunks on the CPU, all N elsewhere.

    The chunks are all kept for backward, so they hold as much memory as one copy: chunking only lets the CPU's
    allocator reuse blocks it holds. CUDA's caching allocator reuses a freed logits-sized block as well, so there
    one copy is made, and the loss's max, gather, exp, sum and gradient run as one kernel each instead of once
    per chunk (an (8192, 32000) bf16 head would otherwise be 63 chunks, each its own handful of launches).
    """
    if z.device.type != "cpu":
        return z.shape[0]
    return max(1, _CHUNK_BYTES // (4 * z.shape[-1]))


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """fwd: z = X W_r^T, mean or per-token loss (2 all-reduces) / bwd: dz = softmax - onehot, dX_r, dW_r from dz.

    dX_r is this rank's partial sum: the caller's copy_to_region (or sequence all-gather) reduces it. The matmuls
    run in `matmul_dtype`, the dtype of the forward's product (bf16 under autocast), as autograd would. A bf16 z is
    kept as the buffer of the bf16 dz; its fp32 copy is made in row chunks on the CPU (fp32_chunk_rows).
    """

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        target,
        group: Group,
        ignore_index: int,
        vocab_size: int,
        matmul_dtype: torch.dtype,
        reuse: bool,
        reduction: str = "mean",
    ):
        x2 = x.reshape(-1, x.shape[-1])  # (N, H)
        with torch.autocast(x.device.type, enabled=False):  # matmul_dtype decides (autocast would cast fp32 back)
            z = x2.to(matmul_dtype) @ weight.to(matmul_dtype).t()  # (N, V/tp)
        if z.dtype == torch.float32:
            chunks, kept = [z], None
        else:
            chunks, kept = [c.float() for c in z.split(fp32_chunk_rows(z))], z
        loss, saved = _exp_and_loss(chunks, target, group, ignore_index, vocab_size, reduction)
        ctx.save_for_backward(x, weight, kept, *saved)
        ctx.reuse, ctx.reduction = reuse, reduction
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        x, weight, z, *saved = ctx.saved_tensors
        chunks = _logits_grad(grad_loss, ctx.reduction, ctx.reuse, *saved)  # fp32
        if z is None:
            (dz,) = chunks  # (N, V/tp)
        else:
            dz = z if ctx.reuse else torch.empty_like(z)  # (N, V/tp) in the matmul dtype
            for dst, src in zip(z.split(chunks[0].shape[0]), chunks, strict=True):
                dst.copy_(src)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = (dz @ weight.to(dz.dtype)).to(x.dtype).view_as(x)  # (..., H)
        if ctx.needs_input_grad[1]:
            dw = (dz.t() @ x.reshape(-1, x.shape[-1]).to(dz.dtype)).to(weight.dtype)  # (V/tp, H)
        return dx, dw, None, None, None, None, None, None, None


REDUCTIONS = ("mean", "none")


def _check_reduction(reduction: str) -> None:
    """ValueError unless `reduction` is one the loss knows (REDUCTIONS)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: the vocab-parallel cross-entropy knows {REDUCTIONS}")


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    group: Group = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    vocab_size: int | None = None,
    reuse_buffers: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean cross-entropy of (..., V'/tp) vocab-sharded logits against (...) full-vocabulary target ids.

    `reduction="none"`: the (N,) fp32 per-token loss -log p(target) over the flattened tokens, 0 where ignored.
    `vocab_size` is the real vocabulary when V' is padded (default: all V' columns are real); TokenIdError for a
    target outside it. At group size 1 this is F.cross_entropy on the fp32 logits of the real vocabulary.
    `reuse_buffers=False` keeps the saved buffers intact through backward, for a graph whose backward runs twice.
    """
    _check_reduction(reduction)
    logits = logits.reshape(-1, logits.shape[-1])  # (N, V'/tp)
    target = target.reshape(-1)  # (N,)
    vocab_size = logits.shape[-1] * group_size(group) if vocab_size is None else vocab_size
    target = check_token_ids(target, vocab_size, "target", ignore_index=ignore_index)
    if group_size(group) == 1:
        z = logits[:, :vocab_size].float()
        return F.cross_entropy(z, target, ignore_index=ignore_index, reduction=reduction)
    args = (ignore_index, vocab_size, reuse_buffers, reduction)
    return _VocabParallelCrossEntropy.apply(logits, target, group, *args)


def vocab_parallel_linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    group: Group = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    vocab_size: int | None = None,
    matmul_dtype: torch.dtype | None = None,
    reuse_buffers: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean cross-entropy of the logits x W_r^T ((..., H) x, (V'/tp, H) vocabulary shard W_r) against (...) ids.

    Equals vocab_parallel_cross_entropy(F.linear(x, weight), target, group, vocab_size=vocab_size) up to rounding,
    without keeping the logits, the log-softmax and their gradients as separate tensors. `matmul_dtype` defaults
    to the dtype F.linear(x, weight) would multiply in (the autocast dtype when autocast is on).
    `reuse_buffers=False`: backward leaves what forward saved intact (it may run twice over one graph).
    `reduction="none"`: the (N,) fp32 per-token loss over the flattened tokens, 0 where the target is ignored.
    """
    _check_reduction(reduction)
    if matmul_dtype is None:
        device = x.device.type
        matmul_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    vocab_size = weight.shape[0] * group_size(group) if vocab_size is None else vocab_size
    target = check_token_ids(target, vocab_size, "target", ignore_index=ignore_index).reshape(-1)  # (N,)
    args = (ignore_index, vocab_size, matmul_dtype, reuse_buffers, reduction)
    return _VocabParallelLinearCrossEntropy.apply(x, weight, target, group, *args)
