"""Expert-parallel dispatch and combine: token assignments go to the ranks that hold their experts and come back.

The E experts are split over the expert group in rank order: ep rank r holds experts [r E/ep, (r+1) E/ep).
Each of N tokens is assigned to k experts, (N, k) indices; assignment a = n k + j is token n's j-th choice.

    dispatch   sort the N k assignments by expert (stable, so a token's order is kept within an expert)
               exchange the per-expert counts: all_to_all_single of the (E,) count vector, E/ep entries per rank
               read the sent and received counts on the host, together: the one host-device synchronisation of
               a layer's forward (all_to_all_single takes its split sizes as host integers)
               all_to_all (uneven splits) of the token rows: rank r receives, from every source rank in rank
               order, the rows for its experts, each source's block sorted by expert
               regroup the received rows by local expert (source order kept within an expert)
    combine    the exact inverse: ungroup, all_to_all back (the splits swapped), unsort into assignment order

At group size 1 nothing needs the counts on the host unless the caller asks (`host_counts`, for a per-expert
loop): the counts and the sorted rows stay on the device, no synchronisation. Dropped assignments then stay in the
sorted rows, after every expert's rows ("spare" rows): the caller computes them with any expert (a grouped GEMM
whose last group reaches the end of the rows) and combine discards their outputs. The rows travel in `dtype` (the
compute dtype: bf16 under autocast), cast after the gather, so the backward's sum over a token's k assignments
stays in the tokens' dtype.

    all_to_all      fwd: all-to-all / bwd: all-to-all (output and input splits swapped)

An expert index of -1 marks a dropped assignment (over capacity): it is sent nowhere and combine returns a zero row
for it. At group size 1 (group None) nothing is communicated: dispatch and combine are a pure permutation.

    dispatch_padded   under a capacity C (at most C assignments per expert on each rank, the rest dropped), every
                      rank sends every expert exactly C rows, its unused slots zero rows: the split sizes are known
                      without reading the counts, so nothing synchronises (parallel.moe_pad_to_capacity; Megatron's
                      moe_pad_expert_input_to_capacity). Each local expert computes ep C rows; combine discards the
                      padding's outputs. The price: E C rows sent and computed where dispatch sends the kept ones.

Collectives are looked up as `dist.<name>` at call time, so tests and benchmarks can count them by patching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.mappings import Group, group_size
from parallel.state import ParallelConfigError


def _all_to_all(x: torch.Tensor, group: Group, output_splits: list[int], input_splits: list[int]) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(output_splits), *x.shape[1:]))  # (rows received, ...)
    dist.all_to_all_single(out, x, output_split_sizes=output_splits, input_split_sizes=input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """fwd: all-to-all / bwd: all-to-all (splits swapped)."""

    @staticmethod
    def forward(ctx, x, group, output_splits, input_splits):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        return _all_to_all(x, group, output_splits, input_splits)

    @staticmethod
    def backward(ctx, grad):
        # the gradient of each received row goes back to the rank that sent it: the same exchange, reversed
        return _all_to_all(grad, ctx.group, ctx.input_splits, ctx.output_splits), None, None, None


def all_to_all(
    x: torch.Tensor, group: Group, output_split_sizes: list[int], input_split_sizes: list[int]
) -> torch.Tensor:
    """fwd: all-to-all / bwd: all-to-all (splits swapped). Rows of x along dim 0, uneven splits allowed.

    Rank r sends rows [sum(input_split_sizes[:s]), ... + input_split_sizes[s]) to rank s and receives
    output_split_sizes[s] rows from rank s, stacked in rank order.
    """
    return x if group_size(group) == 1 else _AllToAll.apply(x, group, output_split_sizes, input_split_sizes)


@dataclass(frozen=True)
class DispatchPlan:
    """What combine needs to undo a dispatch.

    order: (n_sent,) the assignment ids (n k + j) of the rows of the send buffer, sorted by expert: row i of the
        send buffer is assignment order[i]. Dropped assignments (index -1) are not in it, except at group size 1
        without host counts, where order holds all N k assignments, the dropped ones last.
    num_assignments: N k, the rows combine returns.
    kept: (N k,) bool, False for a dropped assignment, where order includes dropped ones that can occur; else None.
    send_splits / recv_splits: rows sent to / received from each ep rank (None at group size 1).
    local_perm: (n_recv,) grouped row i is received row local_perm[i]; None at group size 1 (already grouped).
    group: the expert group.
    """

    order: torch.Tensor
    num_assignments: int
    kept: torch.Tensor | None
    send_splits: list[int] | None
    recv_splits: list[int] | None
    local_perm: torch.Tensor | None
    group: Group


@dataclass(frozen=True)
class PaddedPlan:
    """What combine needs to undo a dispatch_padded.

    slot: (N k,) the send buffer's row of each assignment (expert e's slots are rows [e C, (e + 1) C)); E C, a row
        past the buffer, for a dropped one.
    capacity: C, the slots per expert and rank.
    group: the expert group.
    """

    slot: torch.Tensor
    capacity: int
    group: Group


def _split_experts(num_experts: int, group: Group) -> tuple[int, int]:
    """(ep, E/ep): the expert group's size and the experts each of its ranks holds."""
    ep = group_size(group)
    if num_experts % ep:
        raise ParallelConfigError(
            f"model.num_local_experts={num_experts} is not divisible by parallel.ep={ep}; choose an ep that divides it"
        )
    return ep, num_experts // ep


def bincount(x: torch.Tensor, n: int) -> torch.Tensor:
    """torch.bincount(x, minlength=n) for x in [0, n), without its host sync (CUDA's bincount reads x's range)."""
    return torch.zeros(n, dtype=torch.long, device=x.device).scatter_add_(0, x, torch.ones_like(x))


def position_in_expert(key: torch.Tensor, order: torch.Tensor, bins: int) -> torch.Tensor:
    """(M,) each assignment's position among its expert's assignments, counted in `order`.

    key: (M,) the expert of each assignment, in [0, bins); order: (M,) the assignment ids grouped by expert in
    ascending order (a stable argsort of key, or a stable argsort by expert of any other order of the assignments).
    """
    counts = bincount(key, bins)
    first = torch.cumsum(counts, 0) - counts  # (bins,) where each expert's assignments start in order
    position = torch.arange(key.numel(), device=key.device) - first[key[order]]
    return torch.empty_like(key).index_copy_(0, order, position)


def dispatch(
    tokens: torch.Tensor,
    expert_indices: torch.Tensor,
    num_experts: int,
    group: Group,
    *,
    host_counts: bool = False,
    may_drop: bool = True,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[int] | None, DispatchPlan]:
    """Send each token's rows to the ranks of its experts; return them grouped by this rank's local experts.

    Args:
        tokens: (N, H) token rows.
        expert_indices: (N, k) global expert of each assignment in [0, num_experts), or -1 for a dropped one.
        num_experts: E, divisible by the size of `group`.
        group: the expert-parallel group (None: one member).
        host_counts: also return the counts on the host (one synchronisation at group size 1; free otherwise).
        may_drop: whether expert_indices can hold -1 (False: dropless routing, nothing to mask in combine).
        dtype: the dtype the rows travel and are returned in (None: the tokens').

    Returns:
        (rows, counts, host, plan): rows (M, H) grouped by local expert (local expert 0's rows first, each expert's
        rows in source-rank order, then assignment order), then M - sum(counts) spare rows whose outputs combine
        discards (only at group size 1 without host counts); counts (E/ep,) long on the device, the rows of each
        local expert (zeros allowed); host, the same as a list of ints or None; the plan for `combine`.
    """
    ep, local = _split_experts(num_experts, group)
    n, k = expert_indices.shape
    flat = expert_indices.reshape(-1)  # (N k,)
    key = torch.where(flat < 0, num_experts, flat) if may_drop else flat  # dropped assignments sort last, bin E
    order = torch.argsort(key, stable=True)  # (N k,) assignment ids, grouped by expert
    counts = bincount(key, num_experts + 1)[:num_experts]  # (E,) rows for each global expert
    if ep == 1:
        host = counts.tolist() if host_counts else None  # the host sync, only when asked for
        kept = None
        if host is not None:
            order = order[: sum(host)]
        elif may_drop:
            kept = flat >= 0  # (N k,) the spare rows at the end of order are the dropped assignments
        rows = tokens.index_select(0, order // k).to(dtype or tokens.dtype)  # (M, H), once per assignment
        return rows, counts, host, DispatchPlan(order, n * k, kept, None, None, None, group)

    # recv_counts[s, j]: rows source rank s sends to this rank's local expert j
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    both = torch.cat([counts, recv_counts]).tolist()  # the one host sync: split sizes are host integers
    counts_list, recv_flat = both[:num_experts], both[num_experts:]
    recv_list = [recv_flat[s * local : (s + 1) * local] for s in range(ep)]  # (ep, E/ep) on the host
    n_sent = sum(counts_list)
    order = order[:n_sent]
    rows = tokens.index_select(0, order // k).to(dtype or tokens.dtype)  # (n_sent, H)
    send_splits = [sum(counts_list[s * local : (s + 1) * local]) for s in range(ep)]
    recv_splits = [sum(row) for row in recv_list]
    received = all_to_all(rows, group, recv_splits, send_splits)  # (n_recv, H), by source rank, then expert
    expert_of_row = torch.arange(local, device=counts.device).repeat(ep)  # (ep E/ep,) local expert of each block
    expert_of_row = expert_of_row.repeat_interleave(recv_counts, output_size=sum(recv_splits))  # (n_recv,)
    local_perm = torch.argsort(expert_of_row, stable=True)  # (n_recv,) source order kept within an expert
    host = [sum(row[j] for row in recv_list) for j in range(local)]
    local_counts = recv_counts.view(ep, local).sum(0)  # (E/ep,)
    plan = DispatchPlan(order, n * k, None, send_splits, recv_splits, local_perm, group)
    return received.index_select(0, local_perm), local_counts, host, plan


def dispatch_padded(
    tokens: torch.Tensor,
    expert_indices: torch.Tensor,
    num_experts: int,
    capacity: int,
    group: Group,
    *,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[int], PaddedPlan]:
    """Dispatch with every expert's rows padded to `capacity` from every rank: fixed split sizes, no host sync.

    expert_indices: (N, k) with at most `capacity` assignments of each expert (-1 for the others: the MoE layer's
    drop_over_capacity), and the same `capacity` on every rank of the group (else the exchange's sizes disagree: an
    error on gloo, a hang on NCCL). Returns (rows, counts, host, plan) as dispatch does, rows (E/ep ep C, H): local
    expert j's ep C rows, from each source rank in rank order its C slots, its assignments in assignment order
    first, then zero rows. counts and host say ep C for every expert.
    """
    ep, local = _split_experts(num_experts, group)
    n, k = expert_indices.shape
    flat = expert_indices.reshape(-1)  # (N k,)
    key = torch.where(flat < 0, num_experts, flat)  # dropped assignments in bin E
    order = torch.argsort(key, stable=True)  # (N k,) assignment ids, grouped by expert
    rank = position_in_expert(key, order, num_experts + 1)  # (N k,) below capacity where kept
    slot = torch.where(flat >= 0, flat * capacity + rank, num_experts * capacity)  # (N k,)
    rows = tokens.repeat_interleave(k, dim=0, output_size=n * k).to(dtype or tokens.dtype)  # (N k, H)
    # the dropped assignments all land in the extra last row, which is cut off (its gradient is zero)
    send = rows.new_zeros((num_experts * capacity + 1, rows.shape[1])).index_copy(0, slot, rows)[:-1]  # (E C, H)
    splits = [local * capacity] * ep
    received = all_to_all(send, group, splits, splits)  # (ep E/ep C, H): by source rank, then local expert
    grouped = received.view(ep, local, capacity, -1).transpose(0, 1).reshape(local * ep * capacity, -1)
    host = [ep * capacity] * local
    counts = torch.full((local,), ep * capacity, dtype=torch.long, device=tokens.device)
    return grouped, counts, host, PaddedPlan(slot, capacity, group)


def combine(expert_rows: torch.Tensor, plan: DispatchPlan | PaddedPlan) -> torch.Tensor:
    """Inverse of dispatch or dispatch_padded: (M, H) rows grouped by local expert -> (N k, H) by assignment n k + j.

    Rows of dropped assignments are zero.
    """
    if isinstance(plan, PaddedPlan):
        ep, c = group_size(plan.group), plan.capacity
        local = expert_rows.shape[0] // (ep * c)
        rows = expert_rows.view(local, ep, c, -1).transpose(0, 1).reshape(ep * local * c, -1)  # by source rank
        rows = all_to_all(rows, plan.group, [local * c] * ep, [local * c] * ep)  # (E C, H) in this rank's slots
        return torch.cat([rows, rows.new_zeros((1, rows.shape[1]))]).index_select(0, plan.slot)  # (N k, H)
    rows = expert_rows
    if plan.local_perm is not None:
        rows = rows.new_empty(rows.shape).index_copy(0, plan.local_perm, rows)  # (n_recv, H) by source rank
        rows = all_to_all(rows, plan.group, plan.send_splits, plan.recv_splits)  # (n_sent, H) sorted by expert
    out = rows.new_zeros((plan.num_assignments, *rows.shape[1:]))  # (N k, H)
    out = out.index_copy(0, plan.order, rows)
    if plan.kept is not None:  # the spare rows' outputs (dropped assignments) are discarded
        out = torch.where(plan.kept.unsqueeze(-1), out, 0)
    return out
