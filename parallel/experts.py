"""Expert-parallel dispatch and combine: token assignments go to the ranks that hold their experts and come back.

The E experts are split over the expert group in rank order: ep rank r holds experts [r E/ep, (r+1) E/ep).
Each of N tokens is assigned to k experts, (N, k) indices; assignment a = n k + j is token n's j-th choice.

    dispatch   sort the N k assignments by expert (stable, so a token's order is kept within an expert)
               exchange the per-expert counts: all_to_all_single of the (E,) count vector, E/ep entries per rank
               all_to_all (uneven splits) of the token rows: rank r receives, from every source rank in rank
               order, the rows for its experts, each source's block sorted by expert
               regroup the received rows by local expert (source order kept within an expert)
    combine    the exact inverse: ungroup, all_to_all back (the splits swapped), unsort into assignment order

    all_to_all      fwd: all-to-all / bwd: all-to-all (output and input splits swapped)

An expert index of -1 marks a dropped assignment (over capacity): it is sent nowhere and combine returns a zero row
for it. At group size 1 (group None) nothing is communicated: dispatch and combine are a pure permutation.
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

    order: (n_sent,) the assignment ids (n k + j) of the routed assignments, sorted by expert: row i of the send
        buffer is assignment order[i]. Dropped assignments (index -1) are not in it.
    num_assignments: N k, the rows combine returns.
    send_splits / recv_splits: rows sent to / received from each ep rank.
    local_perm: (n_recv,) grouped row i is received row local_perm[i]; None at group size 1 (already grouped).
    group: the expert group.
    """

    order: torch.Tensor
    num_assignments: int
    send_splits: list[int]
    recv_splits: list[int]
    local_perm: torch.Tensor | None
    group: Group


def dispatch(
    tokens: torch.Tensor, expert_indices: torch.Tensor, num_experts: int, group: Group
) -> tuple[torch.Tensor, list[int], DispatchPlan]:
    """Send each token's rows to the ranks of its experts; return them grouped by this rank's local experts.

    Args:
        tokens: (N, H) token rows.
        expert_indices: (N, k) global expert of each assignment in [0, num_experts), or -1 for a dropped one.
        num_experts: E, divisible by the size of `group`.
        group: the expert-parallel group (None: one member).

    Returns:
        (rows, tokens_per_expert, plan): rows (M, H) grouped by local expert (local expert 0's rows first, each
        expert's rows in source-rank order, then assignment order); tokens_per_expert, M split over the E/ep local
        experts (zeros allowed); the plan for `combine`.
    """
    ep = group_size(group)
    if num_experts % ep:
        raise ParallelConfigError(
            f"model.num_local_experts={num_experts} is not divisible by parallel.ep={ep}; choose an ep that divides it"
        )
    n, k = expert_indices.shape
    local = num_experts // ep
    flat = expert_indices.reshape(-1)  # (N k,)
    key = torch.where(flat < 0, num_experts, flat)  # dropped assignments sort last, into bin E
    order = torch.argsort(key, stable=True)  # (N k,) assignment ids, grouped by expert
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]  # (E,) rows for each global expert
    counts_list = counts.tolist()  # the one host sync of the sending side: split sizes are host integers
    n_sent = sum(counts_list)
    order = order[:n_sent]
    rows = tokens.index_select(0, order // k)  # (n_sent, H): a token appears once per routed assignment
    if ep == 1:
        return rows, counts_list, DispatchPlan(order, n * k, [n_sent], [n_sent], None, group)

    # recv_counts[s, j]: rows source rank s sends to this rank's local expert j
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    recv_list = recv_counts.view(ep, local).tolist()  # (ep, E/ep) on the host
    send_splits = [sum(counts_list[s * local : (s + 1) * local]) for s in range(ep)]
    recv_splits = [sum(row) for row in recv_list]
    received = all_to_all(rows, group, recv_splits, send_splits)  # (n_recv, H), by source rank, then expert
    expert_of_row = torch.arange(local, device=counts.device).repeat(ep)  # (ep E/ep,) local expert of each block
    expert_of_row = expert_of_row.repeat_interleave(recv_counts, output_size=sum(recv_splits))  # (n_recv,)
    local_perm = torch.argsort(expert_of_row, stable=True)  # (n_recv,) source order kept within an expert
    tokens_per_expert = [sum(row[j] for row in recv_list) for j in range(local)]
    plan = DispatchPlan(order, n * k, send_splits, recv_splits, local_perm, group)
    return received.index_select(0, local_perm), tokens_per_expert, plan


def combine(expert_rows: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Inverse of dispatch: (M, H) rows grouped by local expert -> (N k, H) in assignment order (n k + j).

    Rows of dropped assignments are zero.
    """
    rows = expert_rows
    if plan.local_perm is not None:
        rows = rows.new_empty(rows.shape).index_copy(0, plan.local_perm, rows)  # (n_recv, H) by source rank
        rows = all_to_all(rows, plan.group, plan.send_splits, plan.recv_splits)  # (n_sent, H) sorted by expert
    out = rows.new_zeros((plan.num_assignments, *rows.shape[1:]))  # (N k, H)
    return out.index_copy(0, plan.order, rows)
