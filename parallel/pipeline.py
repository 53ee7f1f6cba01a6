"""Pipeline parallelism on torch.distributed.pipelining: the stage plan, the schedules and the stage-to-stage p2p.

The decoder layers are cut into S = pp x stages_per_rank consecutive stages. Stage s runs on pipeline rank

    s % pp                          loop order: 1f1b, gpipe (one stage per rank), interleaved_1f1b
    s if s < pp else 2 pp - 1 - s   V order: zbv (two stages per rank; rank 0 holds the first and the last stage)

A step's gradient-accumulation micro-batches are the pipeline's microbatches. The schedules are torch's own
(`Schedule1F1B`, `ScheduleGPipe`, `ScheduleInterleaved1F1B`, `ScheduleZBVZeroBubble`): they run forward and
backward of every microbatch on every stage in their order, sending activations forward and their gradients back
over the pipeline group. The last stage's module returns the micro-batch's objective (mean loss); the schedule's
loss function divides it by the number of microbatches, so that the accumulated gradient is the one of the
step's mean loss, as `loss / grad_accum` gives without a pipeline (torch's own scaling is off: a weight that two
stages of one rank share, the V schedule's tied embedding, would be divided twice).

A stage's other terms of the objective (the MoE auxiliary losses of its layers) enter through `attach_loss`:
the identity on the activations going forward, a gradient of `scale` for the loss coming back.

Forward-only passes (evaluation, generation) do not need a schedule: `send_tensor` / `recv_tensor` move a
stage's output to the next stage's rank, shape and dtype included, and `broadcast_from_rank` hands the last
stage's result to every stage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.torch_version import Version

from parallel.state import ParallelConfigError, ParallelState

SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b", "zbv")
MULTI_STAGE = ("interleaved_1f1b", "zbv")  # the schedules with several stages per rank


def check_pipeline(
    *,
    pp: int,
    schedule: str,
    stages_per_rank: int,
    num_layers: int,
    pp_layers: Sequence[int] | None,
    microbatches: int,
) -> None:
    """Raise ParallelConfigError naming the keys when this pipeline cannot run (before any work)."""
    if schedule not in SCHEDULES:
        raise ParallelConfigError(f"parallel.pp_schedule={schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if stages_per_rank < 1:
        raise ParallelConfigError(f"parallel.pp_stages_per_rank={stages_per_rank} must be >= 1")
    if schedule in MULTI_STAGE and stages_per_rank < 2:
        raise ParallelConfigError(
            f"parallel.pp_schedule={schedule} needs parallel.pp_stages_per_rank >= 2 (got {stages_per_rank}); "
            f"use 1f1b or gpipe for one stage per rank"
        )
    if schedule == "zbv" and stages_per_rank != 2:
        raise ParallelConfigError(
            f"parallel.pp_schedule=zbv runs exactly two stages per rank (the V): set parallel.pp_stages_per_rank=2, "
            f"got {stages_per_rank}"
        )
    if schedule not in MULTI_STAGE and stages_per_rank != 1:
        raise ParallelConfigError(
            f"parallel.pp_schedule={schedule} runs one stage per rank; parallel.pp_stages_per_rank="
            f"{stages_per_rank} needs interleaved_1f1b or zbv"
        )
    if pp == 1:
        if pp_layers is not None:
            raise ParallelConfigError("parallel.pp_layers is set but parallel.pp=1: remove it, or set parallel.pp")
        return
    stages = pp * stages_per_rank
    if stages > num_layers:
        raise ParallelConfigError(
            f"parallel.pp={pp} x parallel.pp_stages_per_rank={stages_per_rank} = {stages} stages, but the model "
            f"has {num_layers} layers (model.num_hidden_layers): every stage needs at least one layer"
        )
    stage_layer_counts(num_layers, stages, pp_layers)  # raises on a bad parallel.pp_layers
    if schedule == "1f1b" and microbatches < pp:
        raise ParallelConfigError(
            f"parallel.pp_schedule=1f1b needs at least parallel.pp={pp} micro-batches per step, got {microbatches} "
            f"(train.global_batch_size / (train.micro_batch_size x data-parallel ranks)): raise "
            f"train.global_batch_size, lower train.micro_batch_size, or use parallel.pp_schedule=gpipe"
        )
    if schedule == "interleaved_1f1b":
        rounds = max(1, microbatches // pp)
        if microbatches % rounds:
            raise ParallelConfigError(
                f"parallel.pp_schedule=interleaved_1f1b needs the micro-batches per step ({microbatches}) to be a "
                f"multiple of {rounds} (their number // parallel.pp={pp}): use a multiple of {pp}"
            )


def check_schedule_torch(schedule: str, version: str | None = None) -> None:
    """Raise ParallelConfigError where this torch's pipelining cannot run `schedule`, on any backend.

    Called with the config (configs/architecture.py, before any work) and by `PipelineSchedule`; not by
    `check_pipeline`, whose stage plans do not depend on torch's schedules.

    zbv splits each stage's backward in two: the inputs' gradient, then the weights' from the autograd nodes it kept
    (torch/distributed/pipelining/_backward.py, stage_backward_input and stage_backward_weight). In torch 2.12 the
    weights' part dies on the nodes of custom autograd Functions, which every layer here has (RMSNorm; a compiled
    layer is one): "Attribute '_input_metadata' is invalid for this instance of _C._FunctionBase", at the first
    W action of a two-rank zbv run over gloo. 2.11 has the same code (and over gloo dies before, its p2p warm-up
    sending from a rank to itself: "Pair is not connected"). That code is autograd's, not the backend's, so NCCL
    gets the same. torch 2.13 reworked it and runs zbv (tests/integration/test_pretrain_pipeline.py).
    """
    version = version or torch.__version__  # read at the call: the tests set it
    if schedule == "zbv" and Version(version).release[:2] < (2, 13):  # 2.13 nightlies too
        raise ParallelConfigError(
            f"parallel.pp_schedule=zbv needs torch 2.13 or newer, found {version}: its split backward fails on "
            f"custom autograd functions there; use parallel.pp_schedule=interleaved_1f1b or torch 2.13"
        )


def stage_layer_counts(num_layers: int, num_stages: int, pp_layers: Sequence[int] | None = None) -> list[int]:
    """Decoder layers per stage, in order: `pp_layers` checked, or a balanced split.

    The balanced split weighs the embedding (first stage) and the output head with its loss (last stage) as one
    layer each, gives every stage at least one layer, and hands each further layer to the least loaded stage (the
    earliest on a tie): 8 layers over 4 stages -> [2, 3, 2, 1].
    """
    if pp_layers is not None:
        if len(pp_layers) != num_stages or any(n < 1 for n in pp_layers) or sum(pp_layers) != num_layers:
            raise ParallelConfigError(
                f"parallel.pp_layers={list(pp_layers)} must give {num_stages} stages (parallel.pp x "
                f"parallel.pp_stages_per_rank) at least one layer each, {num_layers} in all (model.num_hidden_layers)"
            )
        return list(pp_layers)
    counts = [1] * num_stages
    load = [1 + (s == 0) + (s == num_stages - 1) for s in range(num_stages)]
    for _ in range(num_layers - num_stages):
        s = min(range(num_stages), key=lambda i: (load[i], i))
        counts[s] += 1
        load[s] += 1
    return counts


def stage_layers(counts: Sequence[int]) -> list[tuple[int, ...]]:
    """The global layer indices of every stage, from the layers per stage."""
    out, start = [], 0
    for n in counts:
        out.append(tuple(range(start, start + n)))
        start += n
    return out


def stage_rank(stage: int, pp: int, schedule: str) -> int:
    """The pipeline rank that runs `stage` (V order for zbv, loop order otherwise)."""
    if schedule == "zbv" and stage >= pp:
        return 2 * pp - 1 - stage
    return stage % pp


def rank_stages(pp_rank: int, pp: int, stages_per_rank: int, schedule: str) -> list[int]:
    """The stages pipeline rank `pp_rank` runs, in increasing order."""
    return [s for s in range(pp * stages_per_rank) if stage_rank(s, pp, schedule) == pp_rank]


class _AttachLoss(torch.autograd.Function):
    """fwd: x (the loss rides along) / bwd: dx, and d(loss) = scale."""

    @staticmethod
    def forward(ctx, x, loss, scale):
        ctx.scale, ctx.shape, ctx.dtype = scale, loss.shape, loss.dtype
        return x.clone()  # not a view: the zero-bubble schedules detach stage outputs in place

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full(ctx.shape, ctx.scale, dtype=ctx.dtype, device=grad.device), None


def attach_loss(x: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
    """x, unchanged, carrying `loss` into backward: the backward through x also gives `loss` the gradient `scale`.

    How a stage that is not the last adds its own terms (MoE aux losses) to the objective: their gradients flow
    when the next stage's gradient arrives, as Megatron-LM's MoEAuxLossAutoScaler does.
    """
    return _AttachLoss.apply(x, loss, scale)


class PipelineSchedule:
    """torch.distributed.pipelining stages over this rank's stage modules, and the schedule that runs them.

    `modules[i]` runs stage `stage_ids[i]`; the last stage's module returns the micro-batch's objective.
    `io[i]` is an (input, output) pair of meta-device tensors of one microbatch for stage i: the shapes, dtypes and
    whether they need gradients. Given them, torch's stages skip their metadata inference, which would run each
    stage's forward once more on an empty tensor (MoE routing statistics included).
    step() runs forward and backward of every microbatch (the stage modules keep what the log needs).
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        stage_ids: Sequence[int],
        io: Sequence[tuple[torch.Tensor, torch.Tensor]],
        *,
        state: ParallelState,
        schedule: str,
        microbatches: int,
        device: torch.device,
    ) -> None:
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
            ScheduleZBVZeroBubble,
        )

        check_schedule_torch(schedule)
        num_stages = state.pp_size * len(stage_ids)
        self.stages = [
            PipelineStage(m, s, num_stages, device, input_args=x, output_args=y, group=state.pp_group)
            for m, s, (x, y) in zip(modules, stage_ids, io, strict=True)
        ]
        self.has_first = 0 in stage_ids
        scale = 1.0 / microbatches

        def loss_fn(objective: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return objective * scale  # the step's mean: grad_accum micro-batches of mean losses

        kinds = {
            "gpipe": ScheduleGPipe,
            "1f1b": Schedule1F1B,
            "interleaved_1f1b": ScheduleInterleaved1F1B,
            "zbv": ScheduleZBVZeroBubble,
        }
        stages = self.stages[0] if schedule in ("gpipe", "1f1b") else self.stages
        self.schedule = kinds[schedule](stages, microbatches, loss_fn=loss_fn, scale_grads=False)

    def step(self, input_ids: torch.Tensor, targets: torch.Tensor, **kwargs: torch.Tensor) -> None:
        """Forward and backward of the (microbatches x B, T) batch; gradients accumulate in the parameters."""
        args = (input_ids,) if self.has_first else ()
        self.schedule.step(*args, target=targets, return_outputs=False, targets=targets, **kwargs)


def reduce_tied_grads(params: Sequence[nn.Parameter], state: ParallelState) -> None:
    """Sum the gradients of a tied embedding's two copies (first and last stage) over the embedding group.

    Only parameters marked `pipeline_tied` take part; both copies then hold the gradient of the one weight, so
    their updates keep them equal, as Megatron-LM keeps its word embeddings.
    """
    for p in params:
        if getattr(p, "pipeline_tied", None) and p.grad is not None and state.embed_group is not None:
            if dist.get_world_size(state.embed_group) > 1:
                dist.all_reduce(p.grad, group=state.embed_group)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool, torch.float64)
_HEADER = 8  # dtype index, ndim, up to 6 sizes


def send_tensor(x: torch.Tensor, dst: int, group: dist.ProcessGroup) -> None:
    """Send `x` (any shape, up to 6 dims) to global rank `dst`: a fixed-size header with dtype and shape first."""
    header = torch.zeros(_HEADER, dtype=torch.int64, device=x.device)
    header[0], header[1] = _DTYPES.index(x.dtype), x.dim()
    header[2 : 2 + x.dim()] = torch.tensor(x.shape, dtype=torch.int64)
    dist.send(header, dst=dst, group=group)
    dist.send(x.contiguous(), dst=dst, group=group)


def recv_tensor(src: int, group: dist.ProcessGroup, device: torch.device) -> torch.Tensor:
    """Receive what send_tensor sent from global rank `src`."""
    header = torch.zeros(_HEADER, dtype=torch.int64, device=device)
    dist.recv(header, src=src, group=group)
    dtype, ndim = _DTYPES[int(header[0])], int(header[1])
    x = torch.empty(header[2 : 2 + ndim].tolist(), dtype=dtype, device=device)
    dist.recv(x, src=src, group=group)
    return x


def broadcast_from_rank(
    x: torch.Tensor | None, src_pp_rank: int, state: ParallelState, make: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """`x` of pipeline rank `src_pp_rank`, on every rank of the pipeline group (`make()` allocates the buffer)."""
    if state.pp_size == 1:
        return x
    buf = x if state.pp_rank == src_pp_rank else make()
    dist.broadcast(buf, src=dist.get_global_rank(state.pp_group, src_pp_rank), group=state.pp_group)
    return buf
