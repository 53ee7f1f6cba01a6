"""Vocab-parallel cross-entropy: the loss over logits whose vocabulary is split over the tensor group.

Rank r holds logits z[..., v] for v in its slice V_r. With m = max_v z_v (all-reduce MAX),

    loss = log sum_v exp(z_v - m) - (z_t - m)

where both the sum over v and the target logit z_t (held by exactly one rank) are all-reduced (SUM) as one
stacked tensor. The gradient is softmax(z) - onehot(t), computed on each rank for its own slice only: the
full-vocabulary logits are never gathered. Tokens whose target is `ignore_index` contribute nothing; the loss is
the mean over the other tokens, as F.cross_entropy(reduction="mean").
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.mappings import Group, group_rank, group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """fwd: mean loss from vocab-sharded logits (2 all-reduces) / bwd: softmax - onehot on the local shard."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group: Group, ignore_index: int):
        z = logits.float()  # (N, V/tp)
        m = z.max(dim=-1).values  # (N,)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        z = z - m.unsqueeze(-1)

        v_local = z.shape[-1]
        start = group_rank(group) * v_local
        valid = target != ignore_index
        t_local = target - start
        mine = valid & (t_local >= 0) & (t_local < v_local)
        t_local = t_local.clamp(0, v_local - 1)
        z_t = z.gather(-1, t_local.unsqueeze(-1)).squeeze(-1) * mine  # (N,)

        e = z.exp_()  # (N, V/tp), reused for the softmax below
        stats = torch.stack([z_t, e.sum(dim=-1)])  # (2, N): one all-reduce for both
        dist.all_reduce(stats, group=group)
        z_t, sum_exp = stats

        n_valid = valid.sum()
        loss = ((sum_exp.log() - z_t) * valid).sum() / n_valid
        e.div_(sum_exp.unsqueeze(-1))  # softmax over the full vocabulary, local slice
        ctx.save_for_backward(e, t_local, mine, valid, n_valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, t_local, mine, valid, n_valid = ctx.saved_tensors
        grad = softmax  # saved for this backward only: modified in place
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, t_local] -= mine.to(grad.dtype)
        grad.mul_((valid.to(grad.dtype) * (grad_loss / n_valid)).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, group: Group = None, *, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy of (..., V/tp) vocab-sharded logits against (...) full-vocabulary target ids.

    At group size 1 this is F.cross_entropy on fp32 logits.
    """
    logits = logits.reshape(-1, logits.shape[-1])  # (N, V/tp)
    target = target.reshape(-1)  # (N,)
    if group_size(group) == 1:
        return F.cross_entropy(logits.float(), target, ignore_index=ignore_index)
    return _VocabParallelCrossEntropy.apply(logits, target, group, ignore_index)
