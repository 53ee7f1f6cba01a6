"""ParallelState: how the world is laid out into pipeline-, data-, context-, tensor- and expert-parallel groups.

Rank layout: the ranks form a mesh with one axis per kind of parallelism, `ParallelDims.AXES` outermost first and
tensor innermost (as in Megatron-LM and DeepSpeed, so that a tensor group sits on one node's fast links and a
pipeline stage may span nodes: only activations cross between stages):

    global_rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank

Expert parallelism is carved out of the data-parallel dimension (as DeepSpeed-MoE and Megatron do): the dp ranks
that share a tp_rank are cut into blocks of `ep` consecutive dp ranks. Experts are split over a block (the expert
group); the same expert shard is replicated across blocks (the expert-data-parallel group, size dp // ep).

Example, 8 ranks, tp=2, ep=2 -> dp=4, edp=2:
    tp groups   [0,1] [2,3] [4,5] [6,7]
    dp groups   [0,2,4,6] [1,3,5,7]
    ep groups   [0,2] [4,6] [1,3] [5,7]
    edp groups  [0,4] [2,6] [1,5] [3,7]

Pipeline parallelism adds, per (dp_rank, tp_rank): the pipeline group (the pp ranks holding the stages of one model
replica), the embedding group (its first and last pipeline rank: a tied embedding's two copies reduce their
gradients over it, as in Megatron-LM; unused where one rank holds both ends, the zbv schedule's V) and, per dp_rank,
the model-parallel group tp x pp (the global gradient norm sums over it). At pp=1 none of them is created.
Context parallelism adds the context group (the cp ranks holding the chunks of the same sequences) and the dp x cp
group over which gradients of non-expert weights are averaged; at cp=1 neither is created (dp x cp is dp).

The default `ParallelState()` is world size 1 and needs no `init_process_group`: every group is None and every
collective in `parallel.mappings` returns early, so the model runs in a notebook.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch.distributed as dist


class ParallelConfigError(ValueError):
    """A parallel layout that cannot work with the given world size or model shape."""


@dataclass(frozen=True)
class ParallelDims:
    """The degrees of parallelism, the rank mesh they span and their validation, independent of any process group.

    The mesh axes are `AXES`, outermost first; `dp` is derived (the world over the other axes), every other axis is
    a degree field of the same name. Ranks are numbered row-major over the mesh, so coords() and group_ranks()
    follow from AXES alone: adding an axis (pp outermost, cp between dp and tp) is its degree field and its place
    in AXES. Experts are not a mesh axis: ep and edp cut each data-parallel group.
    """

    AXES: ClassVar[tuple[str, ...]] = ("pp", "dp", "cp", "tp")

    world_size: int = 1
    tp: int = 1
    ep: int = 1
    pp: int = 1
    cp: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ParallelConfigError(f"parallel.{f.name} must be >= 1, got {getattr(self, f.name)}")
        given_axes = self._given_axes()
        replica = math.prod(getattr(self, a) for a in given_axes)  # ranks holding one copy of the model
        if self.world_size % replica:
            named = [a for a in given_axes if getattr(self, a) > 1]
            degrees = " x ".join(f"parallel.{a}={getattr(self, a)}" for a in named)
            if len(named) > 1:
                degrees += f" = {replica}"
            raise ParallelConfigError(
                f"{degrees} does not divide the world size {self.world_size}: launch {' x '.join(reversed(self.AXES))} "
                f"processes (torchrun --nproc_per_node {replica * max(1, self.world_size // replica)}); "
                f"{self._degrees()}"
            )
        if self.dp % self.ep:
            over = " / ".join(f"{a} {getattr(self, a)}" for a in given_axes)
            raise ParallelConfigError(
                f"parallel.ep={self.ep} does not divide the data-parallel degree {self.dp} (world {self.world_size} "
                f"/ {over}): experts are split over data-parallel ranks; {self._degrees()}"
            )

    def _given_axes(self) -> list[str]:
        # every mesh axis but dp has a degree field; dp takes the rest of the world
        return [a for a in self.AXES if a != "dp"]

    def _degrees(self) -> str:
        return "degrees: " + ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))

    @property
    def dp(self) -> int:
        """Data-parallel degree: the world over every other mesh axis."""
        return self.world_size // math.prod(getattr(self, a) for a in self._given_axes())

    @property
    def edp(self) -> int:
        """Expert-data-parallel degree: replicas of one expert shard."""
        return self.dp // self.ep

    @property
    def tp_enabled(self) -> bool:
        """Whether weights are split over tensor ranks."""
        return self.tp > 1

    @property
    def dp_enabled(self) -> bool:
        """Whether there are data-parallel replicas whose gradients are reduced."""
        return self.dp > 1

    @property
    def ep_enabled(self) -> bool:
        """Whether experts are split over expert ranks."""
        return self.ep > 1

    def _strides(self) -> dict[str, int]:
        # row-major: the innermost axis has stride 1, each axis outward the product of the degrees inside it
        strides, step = {}, 1
        for axis in reversed(self.AXES):
            strides[axis] = step
            step *= getattr(self, axis)
        return strides

    def coords(self, rank: int) -> dict[str, int]:
        """A global rank's index along every mesh axis (innermost first), then in its expert and edp groups."""
        coords = {}
        for axis in reversed(self.AXES):
            rank, coords[axis] = divmod(rank, getattr(self, axis))
        coords["ep"], coords["edp"] = coords["dp"] % self.ep, coords["dp"] // self.ep
        return coords

    def _axis_groups(self, *axes: str) -> list[list[int]]:
        # the ranks that differ only along `axes`, one group per combination of the other coordinates (row-major)
        strides, others = self._strides(), [a for a in self.AXES if a not in axes]
        groups = []
        for fixed in itertools.product(*(range(getattr(self, a)) for a in others)):
            base = sum(i * strides[a] for a, i in zip(others, fixed, strict=True))
            inner = itertools.product(*(range(getattr(self, a)) for a in axes))
            groups.append(sorted(base + sum(i * strides[a] for a, i in zip(axes, idx, strict=True)) for idx in inner))
        return groups

    def group_ranks(self) -> dict[str, list[list[int]]]:
        """Every group of every kind as lists of global ranks, in a fixed order (all ranks must agree on it)."""
        groups = {axis: self._axis_groups(axis) for axis in reversed(self.AXES)}
        # experts cut each data-parallel group: blocks of ep consecutive dp ranks, and the ranks ep apart
        ep = self.ep
        groups["ep"] = [g[b * ep : (b + 1) * ep] for g in groups["dp"] for b in range(self.edp)]
        groups["edp"] = [g[e::ep] for g in groups["dp"] for e in range(ep)]
        # a replica's first and last stage (one rank at pp=1); the tp x pp ranks that hold one copy of the model
        groups["embed"] = [sorted({g[0], g[-1]}) for g in groups["pp"]]
        groups["mp"] = self._axis_groups("pp", "tp")
        # the ranks whose gradients of one weight shard are averaged: data-parallel replicas and sequence chunks
        groups["dp_cp"] = self._axis_groups("dp", "cp")
        return groups


@dataclass(frozen=True)
class ParallelState:
    """Process groups and this rank's coordinates; built once and passed to every parallel layer.

    `sequence_parallel` turns on Megatron-style sequence parallelism: activations outside the tensor-parallel
    matmuls (norms, residual stream) are split along the sequence dimension over the tensor group.
    `context_parallel` (on when cp > 1) splits each sequence over the context group for the whole decoder, with
    attention of kind `cp_attention` (parallel.context); generation turns it off (whole sequences on every rank).
    """

    dims: ParallelDims = field(default_factory=ParallelDims)
    rank: int = 0
    sequence_parallel: bool = False
    context_parallel: bool = False
    cp_attention: str = "ulysses"
    moe_pad_to_capacity: bool = False  # parallel.experts.dispatch_padded in training forwards under a capacity
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    ep_group: dist.ProcessGroup | None = None
    edp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    embed_group: dist.ProcessGroup | None = None
    mp_group: dist.ProcessGroup | None = None
    cp_group: dist.ProcessGroup | None = None
    dp_cp_group: dist.ProcessGroup | None = None  # gradients of non-expert weights are averaged over it

    def __post_init__(self) -> None:
        if self.dp_cp_group is None and self.dims.cp == 1:  # without context parallelism it is the dp group
            object.__setattr__(self, "dp_cp_group", self.dp_group)

    @classmethod
    def build(
        cls,
        *,
        tp: int = 1,
        ep: int = 1,
        pp: int = 1,
        cp: int = 1,
        sequence_parallel: bool = False,
        cp_attention: str = "ulysses",
        moe_pad_to_capacity: bool = False,
    ) -> ParallelState:
        """Create all groups over the initialised default process group (every rank must call this)."""
        if not dist.is_initialized():
            if tp == 1 and ep == 1 and pp == 1 and cp == 1:
                return cls(sequence_parallel=False, moe_pad_to_capacity=moe_pad_to_capacity)
            raise ParallelConfigError(
                f"parallel.tp={tp}, parallel.ep={ep}, parallel.pp={pp}, parallel.cp={cp} need torch.distributed: "
                f"launch with torchrun (torchrun --nproc_per_node N ...) so that the process group can be initialised"
            )
        dims = ParallelDims(world_size=dist.get_world_size(), tp=tp, ep=ep, pp=pp, cp=cp)
        rank = dist.get_rank()
        mine: dict[str, dist.ProcessGroup | None] = {}
        for kind, all_groups in dims.group_ranks().items():
            if (kind in ("pp", "embed", "mp") and dims.pp == 1) or (kind in ("cp", "dp_cp") and dims.cp == 1):
                continue  # no pipeline (context) parallelism: none of its groups (each new_group is a world barrier)
            if kind == "embed" and dims.pp == 2:
                mine["embed"] = mine["pp"]  # the first and the last stage are the whole pipeline
                continue
            for ranks in all_groups:
                group = dist.new_group(ranks)  # every rank creates every group, in the same order
                if rank in ranks:
                    mine[kind] = group
        return cls(
            dims=dims,
            rank=rank,
            sequence_parallel=sequence_parallel and dims.tp_enabled,
            tp_group=mine["tp"],
            dp_group=mine["dp"],
            ep_group=mine["ep"],
            edp_group=mine["edp"],
            pp_group=mine.get("pp"),
            embed_group=mine.get("embed"),  # None on the middle stages of pp > 2
            mp_group=mine.get("mp"),
            cp_group=mine.get("cp"),
            dp_cp_group=mine.get("dp_cp"),
            context_parallel=dims.cp > 1,
            cp_attention=cp_attention,
            moe_pad_to_capacity=moe_pad_to_capacity,
        )

    def require_groups(self) -> None:
        """Raise unless the groups this layout needs exist (a state built by hand has none)."""
        if self.dims.world_size > 1 and self.tp_group is None:
            raise ParallelConfigError(
                f"ParallelState with world size {self.dims.world_size} has no process groups: create it with "
                f"ParallelState.build(tp=..., ep=..., pp=...) after torch.distributed is initialised (torchrun)"
            )

    @property
    def tp_size(self) -> int:
        """Tensor-parallel degree."""
        return self.dims.tp

    @property
    def tp_rank(self) -> int:
        """This rank's index in its tensor group."""
        return self.dims.coords(self.rank)["tp"]

    @property
    def dp_size(self) -> int:
        """Data-parallel degree."""
        return self.dims.dp

    @property
    def dp_rank(self) -> int:
        """This rank's index in its data-parallel group."""
        return self.dims.coords(self.rank)["dp"]

    @property
    def ep_size(self) -> int:
        """Expert-parallel degree."""
        return self.dims.ep

    @property
    def ep_rank(self) -> int:
        """This rank's index in its expert group."""
        return self.dims.coords(self.rank)["ep"]

    def sequence_groups(self) -> list[dist.ProcessGroup]:
        """The groups whose ranks hold other chunks of the same sequences; whole-sequence statistics sum over them.

        The tensor group under sequence parallelism, the context group under context parallelism.
        """
        groups = []
        if self.sequence_parallel and self.dims.tp > 1:
            groups.append(self.tp_group)
        if self.context_parallel and self.dims.cp > 1:
            groups.append(self.cp_group)
        return groups

    @property
    def dp_cp_size(self) -> int:
        """Ranks over which a weight shard's gradients are averaged: data-parallel replicas x context chunks."""
        return self.dims.dp * self.dims.cp

    @property
    def dp_cp_rank(self) -> int:
        """This rank's index in its dp x cp group."""
        c = self.dims.coords(self.rank)
        return c["dp"] * self.dims.cp + c["cp"]

    @property
    def cp_size(self) -> int:
        """Context-parallel degree."""
        return self.dims.cp

    @property
    def cp_rank(self) -> int:
        """This rank's index in its context group (which chunks of each sequence it holds)."""
        return self.dims.coords(self.rank)["cp"]

    @property
    def pp_size(self) -> int:
        """Pipeline-parallel degree."""
        return self.dims.pp

    @property
    def pp_rank(self) -> int:
        """This rank's index in its pipeline group."""
        return self.dims.coords(self.rank)["pp"]

    def describe(self) -> str:
        """One line for logs: the degrees and this rank's coordinates."""
        c = self.dims.coords(self.rank)
        return (
            f"rank {self.rank}/{self.dims.world_size}: pp {c['pp']}/{self.dims.pp} tp {c['tp']}/{self.dims.tp} "
            f"cp {c['cp']}/{self.dims.cp} dp {c['dp']}/{self.dims.dp} ep {c['ep']}/{self.dims.ep} "
            f"sequence_parallel={self.sequence_parallel}"
        )
