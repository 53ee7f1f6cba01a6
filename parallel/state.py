"""ParallelState: how the world is laid out into data-, tensor- and expert-parallel groups.

Rank layout (tensor ranks innermost, as in Megatron-LM, so that a tensor group sits on one node's fast links):

    global_rank = dp_rank * tp + tp_rank

Expert parallelism is carved out of the data-parallel dimension (as DeepSpeed-MoE and Megatron do): the dp ranks
that share a tp_rank are cut into blocks of `ep` consecutive dp ranks. Experts are split over a block (the expert
group); the same expert shard is replicated across blocks (the expert-data-parallel group, size dp // ep).

Example, 8 ranks, tp=2, ep=2 -> dp=4, edp=2:
    tp groups   [0,1] [2,3] [4,5] [6,7]
    dp groups   [0,2,4,6] [1,3,5,7]
    ep groups   [0,2] [4,6] [1,3] [5,7]
    edp groups  [0,4] [2,6] [1,5] [3,7]

The default `ParallelState()` is world size 1 and needs no `init_process_group`: every group is None and every
collective in `parallel.mappings` returns early, so the model runs in a notebook.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist


class ParallelConfigError(ValueError):
    """A parallel layout that cannot work with the given world size or model shape."""


@dataclass(frozen=True)
class ParallelDims:
    """The degrees of parallelism and their validation, independent of any process group."""

    world_size: int = 1
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "ep"):
            if getattr(self, name) < 1:
                raise ParallelConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.world_size % self.tp:
            raise ParallelConfigError(
                f"world size {self.world_size} is not divisible by parallel.tp={self.tp}: "
                f"dp = world_size / tp must be a whole number (degrees: world={self.world_size}, "
                f"tp={self.tp}, ep={self.ep})"
            )
        if self.dp % self.ep:
            raise ParallelConfigError(
                f"parallel.ep={self.ep} must divide the data-parallel degree dp={self.dp} "
                f"(world={self.world_size} / tp={self.tp}); experts are split over data-parallel ranks"
            )

    @property
    def dp(self) -> int:
        """Data-parallel degree."""
        return self.world_size // self.tp

    @property
    def edp(self) -> int:
        """Expert-data-parallel degree: replicas of one expert shard."""
        return self.dp // self.ep

    def coords(self, rank: int) -> dict[str, int]:
        """The (tp, dp, ep, edp) coordinates of a global rank."""
        tp_rank, dp_rank = rank % self.tp, rank // self.tp
        return {"tp": tp_rank, "dp": dp_rank, "ep": dp_rank % self.ep, "edp": dp_rank // self.ep}

    def group_ranks(self) -> dict[str, list[list[int]]]:
        """Every group of every kind as lists of global ranks, in a fixed order (all ranks must agree on it)."""
        tp, dp, ep = self.tp, self.dp, self.ep
        rank = lambda d, t: d * tp + t  # noqa: E731
        groups: dict[str, list[list[int]]] = {
            "tp": [[rank(d, t) for t in range(tp)] for d in range(dp)],
            "dp": [[rank(d, t) for d in range(dp)] for t in range(tp)],
            "ep": [],
            "edp": [],
        }
        for t in range(tp):
            for block in range(self.edp):
                groups["ep"].append([rank(block * ep + e, t) for e in range(ep)])
            for e in range(ep):
                groups["edp"].append([rank(block * ep + e, t) for block in range(self.edp)])
        return groups


@dataclass(frozen=True)
class ParallelState:
    """Process groups and this rank's coordinates; built once and passed to every parallel layer.

    `sequence_parallel` turns on Megatron-style sequence parallelism: activations outside the tensor-parallel
    matmuls (norms, residual stream) are split along the sequence dimension over the tensor group.
    """

    dims: ParallelDims = field(default_factory=ParallelDims)
    rank: int = 0
    sequence_parallel: bool = False
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    ep_group: dist.ProcessGroup | None = None
    edp_group: dist.ProcessGroup | None = None

    @classmethod
    def build(cls, *, tp: int = 1, ep: int = 1, sequence_parallel: bool = False) -> ParallelState:
        """Create all groups over the initialised default process group (every rank must call this)."""
        if not dist.is_initialized():
            if tp == 1 and ep == 1:
                return cls(sequence_parallel=False)
            raise ParallelConfigError(
                f"parallel.tp={tp}, parallel.ep={ep} need torch.distributed: launch with torchrun "
                f"(torchrun --nproc_per_node N ...) so that the process group can be initialised"
            )
        dims = ParallelDims(world_size=dist.get_world_size(), tp=tp, ep=ep)
        rank = dist.get_rank()
        mine: dict[str, dist.ProcessGroup | None] = {}
        for kind, all_groups in dims.group_ranks().items():
            for ranks in all_groups:
                group = dist.new_group(ranks)  # every rank creates every group, in the same order
                if rank in ranks:
                    mine[kind] = group
        return cls(
            dims=dims,
            rank=rank,
            sequence_parallel=sequence_parallel and tp > 1,
            tp_group=mine["tp"],
            dp_group=mine["dp"],
            ep_group=mine["ep"],
            edp_group=mine["edp"],
        )

    def require_groups(self) -> None:
        """Raise unless the groups this layout needs exist (a state built by hand has none)."""
        if self.dims.world_size > 1 and self.tp_group is None:
            raise ParallelConfigError(
                f"ParallelState with world size {self.dims.world_size} has no process groups: create it with "
                f"ParallelState.build(tp=..., ep=...) after torch.distributed is initialised (launch with torchrun)"
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

    def describe(self) -> str:
        """One line for logs: the degrees and this rank's coordinates."""
        c = self.dims.coords(self.rank)
        return (
            f"rank {self.rank}/{self.dims.world_size}: tp {c['tp']}/{self.dims.tp} dp {c['dp']}/{self.dims.dp} "
            f"ep {c['ep']}/{self.dims.ep} sequence_parallel={self.sequence_parallel}"
        )
