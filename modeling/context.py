"""Context parallelism in the model: each sequence of a batch is split over the cp ranks for the whole decoder.

    ids (B, T) -> this rank's tokens (B, T/cp): chunks r and 2cp-1-r of 2cp (parallel.context.shard_sequence)
    embedding, norms, MLP (or MoE) and the head see only these tokens; positions and RoPE use the global indices;
    attention runs over the whole sequence through parallel.context.context_attention (ulysses or ring)

The loss is the mean over the whole sequence's valid targets, not a mean of chunk means: rank r's share is
sum_r / N with N the valid targets of all chunks; the shares add up to the mean. Gradients are averaged over
dp x cp by the engines (parallel.engine), so the objective a rank backpropagates is cp x its share: the average
over the cp ranks then sums the shares, as Megatron-LM scales its context-parallel loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.context import context_attention, gather_sequence, sequence_index, shard_sequence
from parallel.cross_entropy import IGNORE_INDEX
from parallel.mappings import group_size
from parallel.state import ParallelState


@dataclass(frozen=True)
class ContextMask:
    """What attention needs under context parallelism in place of a mask.

    The local tokens' global indices, their documents and the window; attention reads the rest of the sequence
    from the other cp ranks.
    """

    index: torch.Tensor  # (T/cp,) global sequence indices of this rank's tokens
    document_ids: torch.Tensor | None  # (B, T/cp) or None
    window: int | None
    kind: str
    group: object

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, Hq, T/cp, hd) queries over the whole sequence's keys and values -> (B, Hq, T/cp, hd)."""
        return context_attention(
            q, k, v, kind=self.kind, group=self.group, index=self.index, document_ids=self.document_ids,
            window=self.window,
        )  # fmt: skip


def active(state: ParallelState) -> bool:
    """Whether sequences are split over a context group (cp > 1, and not switched off for generation)."""
    return state.context_parallel and state.cp_size > 1


def shard(state: ParallelState, x: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's tokens of a (B, T, ...) tensor (None stays None)."""
    return None if x is None else shard_sequence(x, state.cp_rank, state.cp_size, dim=1)


def context_mask(state: ParallelState, seq_len: int, device: torch.device, document_ids, window) -> ContextMask:
    """The ContextMask of this rank's tokens of a sequence of `seq_len` (document ids already sharded)."""
    index = sequence_index(seq_len, state.cp_rank, state.cp_size, device)
    return ContextMask(index, document_ids, window, state.cp_attention, state.cp_group)


def gather_logits(state: ParallelState, logits: torch.Tensor) -> torch.Tensor:
    """(B, T/cp, V) logits of this rank's tokens -> (B, T, V) in sequence order, on every cp rank."""
    return gather_sequence(logits.contiguous(), state.cp_group, dim=1)


def loss_share(
    state: ParallelState, ce: torch.Tensor, targets: torch.Tensor, *, aux: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective to backpropagate, whole-sequence mean cross-entropy) from this rank's mean `ce` over its targets.

    share = ce x n_local / N (+ `aux`, this chunk's shares of the MoE aux losses); the objective is cp x share (see
    the module docstring); the logged mean is the sum of the cross-entropy shares over the cp group.
    """
    n_local = (targets != IGNORE_INDEX).sum().to(torch.float32)
    n_all = n_local.clone()
    cp_group = state.cp_group
    if group_size(cp_group) > 1:
        dist.all_reduce(n_all, group=cp_group)
    share = ce * (n_local / n_all.clamp(min=1))
    mean = share.detach().clone()
    if group_size(cp_group) > 1:
        dist.all_reduce(mean, group=cp_group)
    if aux is not None:
        share = share + aux
    return share * state.cp_size, mean
