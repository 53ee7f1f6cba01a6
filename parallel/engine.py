"""The engine interface and its torch (DDP) implementation; `build_engine` picks torch or DeepSpeed ZeRO 1-3.

Data-parallel wrapping happens after construction: tensor (and expert) parallelism live inside the layers; the engine
only reduces gradients over `state.dp_cp_group` (the data-parallel group, times the context group under context
parallelism), clips by the global gradient norm (tensor-split parameters summed over
the tensor group, replicated ones counted once), and steps the optimizer and the LR schedule. Both engines
(`TorchEngine` here, `parallel.deepspeed_engine.DeepSpeedEngine`) have the same small interface, `Engine`:

    engine = build_engine(model, optimizer, scheduler, state=state, grad_accum=4, grad_clip=1.0, ds_config=None)
    for batch in step_batches:                   # grad_accum of them
        with engine.micro_batch():               # forward and backward inside: DDP reduces in the last one only
            loss = engine.forward(...).loss      # mean over the micro-batch's tokens
            engine.backward(loss)                # scaled by 1/grad_accum, reduced over dp on the last one
    grad_norm = engine.step()                    # clip, optimizer step, schedule step, zero grads

DDP decides in the FORWARD whether the backward that follows reduces (the forward arms its reducer, and a backward
after an armed forward all-reduces whatever context it runs in), so `micro_batch()` must span both: around the
backward alone, every micro-batch would all-reduce every gradient bucket.

ZeRO stage 0 is plain data parallelism and runs on torch DDP, so a DeepSpeed config with stage 0 needs no DeepSpeed.

Expert parameters (`expert_parallel = True`, the MoE experts) hold different experts on the ranks of an expert group.
Their gradients are summed over the expert-data-parallel group only (the replicas of the same shard) and divided by
dp, as DDP's mean: each rank's loss reached the experts of its whole expert group through the all-to-all, so that
sum covers every data-parallel rank's tokens exactly once. The torch engine does this itself; DeepSpeed ZeRO 1/2 does
it over the same groups (see parallel/deepspeed_engine.py).

Buffers: DDP broadcasts the model's buffers from data-parallel rank 0 at every forward. A module's
`rank_local_buffers` (names of buffers that count this rank's own tokens, the MoE expert loads) are left out of that
broadcast: overwritten by rank 0's at each micro-batch they would lose this rank's earlier counts of the step, and
the sum over ranks that `update_expert_bias` takes would count rank 0's tokens twice and the others' partly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from parallel.deepspeed_engine import DeepSpeedEngine
from parallel.optimizer_state import check_local_shapes, cpu_fp32
from parallel.pipeline import reduce_tied_grads
from parallel.state import ParallelState

BUCKET_ELEMENTS = 2**24  # gradients reduced per collective without DDP (64 MiB of fp32)


class Engine(Protocol):
    """What the trainer and the checkpoint writer use of an engine (torch DDP or DeepSpeed ZeRO)."""

    module: nn.Module  # the unwrapped model
    scheduler: torch.optim.lr_scheduler.LRScheduler  # the LR schedule the engine steps
    zero_stage: int  # 0 for the torch engine

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward through the wrapper (DDP's hooks, ZeRO-3's parameter gathering)."""

    def micro_batch(self) -> AbstractContextManager[None]:
        """The context of one micro-batch's forward and backward: gradients are reduced in the step's last only.

        Without it the gradients are the same, but an engine may reduce them at every micro-batch.
        """

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate d(loss / grad_accum); gradients are reduced on the last micro-batch of the step."""

    def step(self) -> float:
        """Clip, step optimizer and schedule, zero the gradients; return the pre-clip global gradient norm."""

    def skip_step(self) -> None:
        """Discard this step's gradients (or raise where the engine cannot)."""

    @property
    def lr(self) -> float:
        """Current learning rate of the first parameter group."""

    def optimizer_tensors(self, keep: Callable[[str], bool] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """The optimizer state per parameter, in a form that loads at any layout.

        `keep(name)` False leaves a parameter out (a rank that will not write it holds no host copy of it).

        Keyed by the names of `module.named_parameters()`, for every parameter that has state: CPU fp32 tensors
        in the parameter's local shape (this rank's tensor / expert / pipeline shard, whole over the data-parallel
        ranks): "exp_avg", "exp_avg_sq", "step" (0-d: the parameter's Adam step count) and "master" (the fp32
        master weight) where the engine keeps one apart from the module's parameters. Collective under DeepSpeed:
        every rank of the data-parallel group calls it.
        """

    def load_optimizer_tensors(self, get: Callable[[str], dict[str, torch.Tensor] | None]) -> None:
        """Set the optimizer state from `get(name)`: tensors as optimizer_tensors() returns them, or None.

        None leaves that parameter without state (it starts as never stepped). A "master" tensor sets the
        parameter's value (the fp32 master and the module's copy); without one, DeepSpeed's fp32 master is set from
        the module's current value (load the model's weights first). Works before the first step; collective under
        DeepSpeed. A pipeline-tied copy of the embedding (`pipeline_tied == "copy"`) should get the embedding's
        tensors, so that the two copies step alike.
        """

    def full_parameters(self) -> Any:
        """A context in which parameters are whole (tensor-rank-local)."""


class TorchEngine:
    """Torch engine: DDP over the data-parallel group (none at dp=1), local accumulation, global-norm clipping."""

    zero_stage = 0

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        state: ParallelState,
        grad_accum: int,
        grad_clip: float,
    ) -> None:
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.state, self.grad_accum, self.grad_clip = state, grad_accum, grad_clip
        self._micro = 0
        self._ddp = None
        self._experts = [p for p in model.parameters() if getattr(p, "expert_parallel", False)]
        # pipeline stages run the model's pieces outside DDP's forward: their gradients are reduced in step()
        # gradients are averaged over dp x cp: context ranks hold other chunks of the same sequences (the model
        # scales their shares of the loss by cp, so that this mean sums over the chunks)
        self._reduce_dense = state.dp_cp_size > 1 and state.pp_size > 1
        if state.dp_cp_size > 1 and not self._reduce_dense:
            # expert shards differ across the expert-parallel group: DDP must not average them over dp; per-rank
            # statistics must not be replaced by rank 0's in DDP's buffer broadcast
            expert_names = [n for n, p in model.named_parameters() if getattr(p, "expert_parallel", False)]
            ignored = expert_names + rank_local_buffer_names(model)
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
            self._ddp = nn.parallel.DistributedDataParallel(model, process_group=state.dp_cp_group)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward (through DDP when data-parallel, so that its reduction hooks are armed)."""
        return (self._ddp or self.module)(*args, **kwargs)

    @contextmanager
    def micro_batch(self) -> Iterator[None]:
        """One micro-batch's forward and backward; DDP all-reduces only in the step's last (the grad_accum-th).

        DDP arms its reducer in the forward unless inside `no_sync`, so the forward must run inside it too.
        """
        last = self._micro + 1 >= self.grad_accum  # this micro-batch's backward completes the step's gradients
        with nullcontext() if self._ddp is None or last else self._ddp.no_sync():
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate d(loss / grad_accum); inside `micro_batch()` DDP reduces only on the step's last."""
        self._micro += 1
        (loss / self.grad_accum).backward()

    def step(self) -> float:
        """Clip by the global norm, step optimizer and schedule, zero the gradients; return the pre-clip norm.

        A non-finite norm skips the optimizer step (the caller sees the norm and counts the skip).
        """
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self._reduce_dense:
            self._reduce_dense_grads(params)
        # after the dp reduction (Megatron's order): both copies of a tied embedding then sum the same two values
        reduce_tied_grads(params, self.state)
        self._reduce_expert_grads()
        norm = global_grad_norm(params, self.state)
        if not math.isfinite(norm):  # the same on every rank: the norm is global
            self.skip_step()
            return norm
        if self.grad_clip > 0:
            coef = self.grad_clip / (norm + 1e-6)
            if coef < 1:
                torch._foreach_mul_([p.grad for p in params], coef)
        self.optimizer.step()
        self.scheduler.step()
        self.zero_grad()
        return norm

    def _reduce_dense_grads(self, params: list[nn.Parameter]) -> None:
        """Non-expert gradients: the mean over the data-parallel group, in buckets (DDP's job without a pipeline)."""
        state = self.state

        def mean(flat: torch.Tensor) -> None:
            dist.all_reduce(flat, group=state.dp_cp_group)
            flat /= state.dp_cp_size

        reduce_in_buckets([p.grad for p in params if not getattr(p, "expert_parallel", False)], mean)

    def _reduce_expert_grads(self) -> None:
        """Expert gradients: sum over the expert-data-parallel replicas, then / dp, as DDP's mean over dp.

        Each rank's loss already reached the experts of its whole ep group through the all-to-all, so the sum over
        the edp group covers every data-parallel rank's tokens exactly once. In buckets, as the dense gradients:
        the experts are most of an MoE model's weights, and one buffer of all their gradients would double them.
        """
        grads = [p.grad for p in self._experts if p.grad is not None]
        if not grads or self.state.dp_cp_size == 1:
            return
        state = self.state

        def mean(flat: torch.Tensor) -> None:
            if state.dims.edp > 1:
                dist.all_reduce(flat, group=state.edp_group)
            if state.cp_size > 1:  # context ranks routed other chunks of the same sequences to the same experts
                dist.all_reduce(flat, group=state.cp_group)
            flat /= state.dp_cp_size

        reduce_in_buckets(grads, mean)

    def zero_grad(self) -> None:
        """Drop the accumulated gradients (also the way to skip a step)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._micro = 0

    def skip_step(self) -> None:
        """Discard this step's gradients; the schedule still advances, as the data was consumed."""
        self.zero_grad()
        with warnings.catch_warnings():  # torch warns when the schedule moves before any optimizer step: intended
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()

    @property
    def lr(self) -> float:
        """Current learning rate of the first parameter group."""
        return self.optimizer.param_groups[0]["lr"]

    def optimizer_tensors(self, keep: Callable[[str], bool] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Adam's moments and step per parameter name (those `keep` accepts), CPU fp32 in the local shape.

        No "master": the parameters are the master weights. A parameter that never had a gradient has no state.
        """
        out = {}
        for name, p in self.module.named_parameters():
            st = self.optimizer.state.get(p)
            if not st or (keep is not None and not keep(name)):
                continue  # never stepped (no gradient yet): no state to carry; or not written by this rank
            out[name] = {k: cpu_fp32(st[k]) for k in ("exp_avg", "exp_avg_sq")}
            out[name]["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)
        return out

    def load_optimizer_tensors(self, get: Callable[[str], dict[str, torch.Tensor] | None]) -> None:
        """Set each parameter's Adam state (and value, from "master" when given) from `get(name)`.

        A parameter whose `get` is None gets no state: AdamW starts it at step 1, as a never-stepped one.
        """
        groups = {id(q): g for g in self.optimizer.param_groups for q in g["params"]}
        for name, p in self.module.named_parameters():
            group = groups.get(id(p))
            if group is None:  # frozen (not in the optimizer): torch's state_dict() would fail on its state
                continue
            tensors = get(name)
            self.optimizer.state.pop(p, None)
            if tensors is None:
                continue
            check_local_shapes(name, p.shape, tensors)
            with torch.no_grad():
                if "master" in tensors:  # a bf16 DeepSpeed run's fp32 weights: the value without its rounding
                    p.copy_(tensors["master"])
            on_device = group.get("capturable") or group.get("fused")
            self.optimizer.state[p] = {
                # torch's AdamW keeps the step as a 0-d fp32 tensor, on the CPU unless capturable or fused
                "step": torch.tensor(
                    float(tensors["step"]), dtype=torch.float32, device=p.device if on_device else "cpu"
                ),
                "exp_avg": tensors["exp_avg"].to(p.device, p.dtype, copy=True),
                "exp_avg_sq": tensors["exp_avg_sq"].to(p.device, p.dtype, copy=True),
            }

    def full_parameters(self) -> Any:
        """A context in which parameters are whole (tensor-rank-local); a no-op outside ZeRO-3."""
        return nullcontext(self.module)


def reduce_in_buckets(grads: list[torch.Tensor], reduce: Callable[[torch.Tensor], None]) -> None:
    """Apply `reduce` (in-place collectives and scaling) to `grads`, one bucket of BUCKET_ELEMENTS at a time.

    Neighbouring gradients of one dtype are packed into a flat buffer of at most BUCKET_ELEMENTS, so that one
    collective moves many small tensors; a contiguous gradient alone in its bucket (as one at least that large
    always is) is reduced in place. No buffer above the bucket size is allocated, where a flat copy of all the
    gradients would hold their full size again.
    """
    start = 0
    while start < len(grads):
        end, n = start, 0
        while end < len(grads) and (
            n == 0 or (n + grads[end].numel() <= BUCKET_ELEMENTS and grads[end].dtype == grads[start].dtype)
        ):
            n, end = n + grads[end].numel(), end + 1
        bucket = grads[start:end]
        if len(bucket) == 1 and bucket[0].is_contiguous():
            reduce(bucket[0])  # its own storage: no copy
        else:
            flat = torch.cat([g.reshape(-1) for g in bucket])  # (n,): one collective per bucket
            reduce(flat)
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
                g.copy_(part.view_as(g))
        start = end


def rank_local_buffer_names(model: nn.Module) -> list[str]:
    """Full names of the buffers the model's modules declare in `rank_local_buffers` (this rank's own statistics)."""
    names = []
    for prefix, module in model.named_modules():
        for name in getattr(module, "rank_local_buffers", ()):
            if module._buffers.get(name) is not None:
                names.append(f"{prefix}.{name}" if prefix else name)
    return names


def global_grad_norm(params: list[nn.Parameter], state: ParallelState) -> float:
    """L2 norm of the whole model's gradient, each parameter counted once.

    Tensor-split parameters are summed over the tensor group, expert shards over the expert-parallel group, and
    the stages' sums over the pipeline group (a tied embedding's last-stage copy left out).
    Replicated parameters (norm weights) carry the same gradient on every tensor rank, so they are counted once.
    """
    params = [p for p in params if getattr(p, "pipeline_tied", None) != "copy"]  # the tied embedding counts once
    experts = [p.grad for p in params if getattr(p, "expert_parallel", False)]
    dense = [p for p in params if not getattr(p, "expert_parallel", False)]
    split = [p.grad for p in dense if getattr(p, "tp_split_dim", None) is not None]
    replicated = [p.grad for p in dense if getattr(p, "tp_split_dim", None) is None]
    device = params[0].device if params else torch.device("cpu")
    sq_split = _sum_sq(split, device)
    if state.tp_size > 1:
        dist.all_reduce(sq_split, group=state.tp_group)
    sq_experts = _sum_sq(experts, device)  # each ep rank holds other experts (the same on every tensor rank)
    if state.ep_size > 1:
        dist.all_reduce(sq_experts, group=state.ep_group)
    total = sq_split + sq_experts + _sum_sq(replicated, device)
    if state.pp_size > 1:  # each stage holds other layers
        dist.all_reduce(total, group=state.pp_group)
    return math.sqrt(total.item())


def _sum_sq(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack([g.float().pow(2).sum() for g in grads]).sum()


def build_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    state: ParallelState,
    grad_accum: int,
    grad_clip: float,
    ds_config: dict[str, Any] | None = None,
    micro_batch_size: int = 1,
    bf16: bool = False,
) -> Engine:
    """The torch engine for ZeRO stage 0 (or no DeepSpeed config), DeepSpeed for stages 1-3."""
    stage = int((ds_config or {}).get("zero_optimization", {}).get("stage", 0))
    if stage == 0:
        return TorchEngine(model, optimizer, scheduler, state=state, grad_accum=grad_accum, grad_clip=grad_clip)
    return DeepSpeedEngine(
        model,
        optimizer,
        scheduler,
        state=state,
        grad_accum=grad_accum,
        grad_clip=grad_clip,
        ds_config=ds_config,
        micro_batch_size=micro_batch_size,
        bf16=bf16,
    )
