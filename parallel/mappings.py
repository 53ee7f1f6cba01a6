"""Autograd collectives, in conjugate pairs: what one does in forward, its partner does in backward.

    copy_to_region            fwd: identity        / bwd: all-reduce
    reduce_from_region        fwd: all-reduce      / bwd: identity
    split_to_region           fwd: split (dim)     / bwd: all-gather (dim)
    gather_from_region        fwd: all-gather (dim)/ bwd: split (dim)
    reduce_scatter_to_region  fwd: reduce-scatter  / bwd: all-gather       (sequence parallel, after a row linear)
    all_gather_from_region    fwd: all-gather      / bwd: reduce-scatter   (sequence parallel, before a column linear)

Every function returns its input untouched when the group has one member (group None means one member), so the
world-size-1 model is the plain model. Collectives are looked up as `dist.<name>` at call time, which lets tests
count them by patching `torch.distributed`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None


def group_size(group: Group) -> int:
    """Members of a group; None is the one-member group."""
    return 1 if group is None else dist.get_world_size(group)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast multiplies x in (autocast on for its device, x floating but not fp64), else None."""
    device = x.device.type
    eligible = x.is_floating_point() and x.dtype != torch.float64  # autocast leaves fp64 alone
    # compiled code runs on a device with autocast; torch 2.11's dynamo cannot trace is_autocast_available and
    # broke the compiled layer's graph at every call (2.13 traces it)
    available = torch.compiler.is_compiling() or torch.amp.is_autocast_available(device)
    if eligible and available and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x multiplies in: the autocast dtype where autocast applies to x, else x's dtype.

    A tensor bound for a collective and then a matmul travels in this dtype: under bf16 autocast an fp32 activation
    would otherwise cross the wire at twice the bytes and be rounded to bf16 on arrival anyway.
    """
    return autocast_dtype(x) or x.dtype


def group_rank(group: Group) -> int:
    """This process's index in a group; 0 in the one-member group."""
    return 0 if group is None else dist.get_rank(group)


def comm_device(group: Group) -> torch.device:
    """The device a tensor must be on for `group`'s collectives: this rank's CUDA device under NCCL, else the CPU.

    For buffers made to communicate with, whatever this rank holds: NCCL takes CUDA tensors only, gloo any.
    """
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    n = group_size(group)
    if x.shape[dim] % n:
        raise ValueError(f"cannot split dimension {dim} of size {x.shape[dim]} evenly over {n} ranks")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    n = group_size(group)
    x = x.movedim(dim, 0).contiguous()  # gather along dim 0 so every rank's chunk is one contiguous block
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(
        out, x, group=group
    )  # new name, torch>=2.13
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    n = group_size(group)
    if x.shape[dim] % n:
        raise ValueError(f"cannot reduce-scatter dimension {dim} of size {x.shape[dim]} over {n} ranks")
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((x.shape[0] // n, *x.shape[1:]))
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, x, group=group)
    return out.movedim(0, dim)


class _CopyToRegion(torch.autograd.Function):
    """fwd: identity / bwd: all-reduce."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None  # never sum into the caller's gradient tensor


class _ReduceFromRegion(torch.autograd.Function):
    """fwd: all-reduce / bwd: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SplitToRegion(torch.autograd.Function):
    """fwd: split / bwd: all-gather."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


class _GatherFromRegion(torch.autograd.Function):
    """fwd: all-gather / bwd: split."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.group, ctx.dim), None, None


class _ReduceScatterToRegion(torch.autograd.Function):
    """fwd: reduce-scatter / bwd: all-gather."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


class _AllGatherFromRegion(torch.autograd.Function):
    """fwd: all-gather / bwd: reduce-scatter."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group, ctx.dim), None, None


def copy_to_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """fwd: identity / bwd: all-reduce. Enters a tensor-parallel region with a replicated input."""
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """fwd: all-reduce / bwd: identity. Leaves a region whose ranks hold partial sums."""
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def split_to_region(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    """fwd: split along `dim`, keep this rank's chunk / bwd: all-gather along `dim`."""
    return x if group_size(group) == 1 else _SplitToRegion.apply(x, group, dim)


def gather_from_region(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    """fwd: all-gather along `dim` / bwd: split along `dim`. Leaves a region whose ranks hold chunks."""
    return x if group_size(group) == 1 else _GatherFromRegion.apply(x, group, dim)


def reduce_scatter_to_region(x: torch.Tensor, group: Group, dim: int = 1) -> torch.Tensor:
    """fwd: reduce-scatter along `dim` / bwd: all-gather along `dim`. Partial sums -> summed sequence chunks."""
    return x if group_size(group) == 1 else _ReduceScatterToRegion.apply(x, group, dim)


def all_gather_from_region(x: torch.Tensor, group: Group, dim: int = 1) -> torch.Tensor:
    """fwd: all-gather along `dim` / bwd: reduce-scatter along `dim`. Sequence chunks -> full sequence input."""
    return x if group_size(group) == 1 else _AllGatherFromRegion.apply(x, group, dim)
