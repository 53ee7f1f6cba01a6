"""Data-parallel wrapping after construction: torch DDP, or DeepSpeed ZeRO 1-3, over the data-parallel group only.

Tensor (and expert) parallelism live inside the layers; the engine only reduces gradients over `state.dp_group`,
clips by the global gradient norm (tensor-split parameters summed over the tensor group, replicated ones counted
once), and steps the optimizer and the LR schedule. Both engines have the same small interface:

    engine = build_engine(model, optimizer, scheduler, state=state, grad_accum=4, grad_clip=1.0, ds_config=None)
    for micro_batch in step_batches:             # grad_accum of them
        loss = engine.module(...).loss           # mean over the micro-batch's tokens
        engine.backward(loss)                    # scaled by 1/grad_accum, reduced over dp on the last one
    grad_norm = engine.step()                    # clip, optimizer step, schedule step, zero grads

ZeRO stage 0 is plain data parallelism and runs on torch DDP, so a DeepSpeed config with stage 0 needs no DeepSpeed.

Expert parameters (`expert_parallel = True`, the MoE experts) hold different experts on the ranks of an expert group.
Their gradients are summed over the expert-data-parallel group only (the replicas of the same shard) and divided by
dp, as DDP's mean: each rank's loss reached the experts of its whole expert group through the all-to-all, so that
sum covers every data-parallel rank's tokens exactly once. The torch engine does this itself. Under DeepSpeed ZeRO 1/2
(ep > 1) the experts become DeepSpeed MoE parameters: `allreduce = False` and `group_name = "ep_size_<ep>"`, with this
ParallelState's expert and expert-data-parallel groups registered under that name in `deepspeed.utils.groups`
(instead of groups DeepSpeed would create) and the optimizer's `"moe"` param group named after it, so ZeRO reduces
expert gradients and partitions their fp32 master weights and Adam states over the expert-data-parallel group.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from parallel.state import ParallelState


class Engine:
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
        if state.dp_size > 1:
            # expert shards differ across the expert-parallel group: DDP must not average them over dp
            expert_names = [n for n, p in model.named_parameters() if getattr(p, "expert_parallel", False)]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_names)
            self._ddp = nn.parallel.DistributedDataParallel(model, process_group=state.dp_group)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward (through DDP when data-parallel, so that its reduction hooks are armed)."""
        return (self._ddp or self.module)(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate d(loss / grad_accum); DDP all-reduces only on the last micro-batch of the step."""
        self._micro += 1
        last = self._micro == self.grad_accum
        sync = nullcontext() if self._ddp is None or last else self._ddp.no_sync()
        with sync:
            (loss / self.grad_accum).backward()

    def step(self) -> float:
        """Clip by the global norm, step optimizer and schedule, zero the gradients; return the pre-clip norm.

        A non-finite norm skips the optimizer step (the caller sees the norm and counts the skip).
        """
        self._reduce_expert_grads()
        params = [p for p in self.module.parameters() if p.grad is not None]
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

    def _reduce_expert_grads(self) -> None:
        """Expert gradients: sum over the expert-data-parallel replicas, then / dp, as DDP's mean over dp.

        Each rank's loss already reached the experts of its whole ep group through the all-to-all, so the sum over
        the edp group covers every data-parallel rank's tokens exactly once.
        """
        grads = [p.grad for p in self._experts if p.grad is not None]
        if not grads or self.state.dp_size == 1:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # (n,): one collective for all expert gradients
        if self.state.dims.edp > 1:
            dist.all_reduce(flat, group=self.state.edp_group)
        flat /= self.state.dp_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

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

    def optimizer_state(self) -> dict[str, Any]:
        """This rank's optimizer and scheduler state (tensors and plain Python only)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_optimizer_state(self, sd: dict[str, Any]) -> None:
        """Restore what optimizer_state() returned."""
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])

    def full_parameters(self) -> Any:
        """A context in which parameters are whole (tensor-rank-local); a no-op outside ZeRO-3."""
        return nullcontext(self.module)


def global_grad_norm(params: list[nn.Parameter], state: ParallelState) -> float:
    """L2 norm of the whole model's gradient, each parameter counted once.

    Tensor-split parameters are summed over the tensor group, expert shards over the expert-parallel group.
    Replicated parameters (norm weights) carry the same gradient on every tensor rank, so they are counted once.
    """
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
    return math.sqrt((sq_split + sq_experts + _sum_sq(replicated, device)).item())


def _sum_sq(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack([g.float().pow(2).sum() for g in grads]).sum()


class _Mpu:
    """The model-parallel-unit interface DeepSpeed asks for, answered from a ParallelState."""

    def __init__(self, state: ParallelState) -> None:
        self.s = state

    def get_model_parallel_rank(self) -> int:
        return self.s.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.s.tp_size

    def get_model_parallel_group(self) -> dist.ProcessGroup | None:
        return self.s.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.s.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.s.dp_size

    def get_data_parallel_group(self) -> dist.ProcessGroup | None:
        return self.s.dp_group

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO 1-3 (optionally offloaded) with ZeRO sharding and reduction over the data-parallel group."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        state: ParallelState,
        grad_accum: int,
        grad_clip: float,
        ds_config: dict[str, Any],
        micro_batch_size: int,
        bf16: bool,
    ) -> None:
        import deepspeed

        self.module, self.state, self.grad_accum, self.grad_clip = model, state, grad_accum, grad_clip
        self._micro = 0
        config = fill_auto(ds_config, micro_batch_size, grad_accum, grad_clip, bf16, state.dp_size)
        self.zero_stage = int(config.get("zero_optimization", {}).get("stage", 0))
        for p in model.parameters():  # DeepSpeed's norm counts replicated parameters only on tensor rank 0
            p.tensor_model_parallel = getattr(p, "tp_split_dim", None) is not None
        offload = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
        if offload:  # ZeRO-Offload steps on the CPU with DeepSpeed's own Adam, built from the same groups
            config["zero_force_ds_cpu_optimizer"] = False
        if state.ep_size > 1 and any(getattr(p, "expert_parallel", False) for p in model.parameters()):
            if self.zero_stage == 3:
                raise ValueError(
                    "ZeRO stage 3 with expert parallelism (parallel.ep > 1) is not supported: use "
                    "configs/deepspeed/zero1.json or zero2.json, or parallel.ep=1"
                )
            self.ds = _expert_parallel_deepspeed(model, optimizer, scheduler, config, state)
            self.optimizer, self.scheduler = self.ds.optimizer, self.ds.lr_scheduler
        else:
            self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model,
                optimizer=optimizer,
                lr_scheduler=scheduler,
                config=config,
                mpu=_Mpu(state),
                dist_init_required=False,
            )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's forward (ZeRO-3 gathers parameters around it)."""
        return self.ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed scales by 1/grad_accum itself and reduces at the accumulation boundary."""
        self._micro += 1
        self.ds.backward(loss)
        if self._micro < self.grad_accum:
            self.ds.step()  # a micro-step: DeepSpeed counts it and steps nothing

    def step(self) -> float:
        """The boundary step: DeepSpeed clips, steps optimizer and schedule, zeroes the gradients.

        ZeRO-1/2 skip the step themselves when the gradient norm is not finite; ZeRO-3 does not in fp32/bf16, and
        the trainer stops the run on a non-finite norm there.
        """
        self.ds.step()
        self._micro = 0
        norm = self.ds.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def skip_step(self) -> None:
        """Not supported generically under ZeRO: the trainer stops instead (see its non-finite handling)."""
        raise RuntimeError("DeepSpeedEngine cannot discard accumulated ZeRO gradients")

    def optimizer_state(self) -> dict[str, Any]:
        """This rank's ZeRO optimizer partition and the scheduler."""
        return {"optimizer": self.ds.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_optimizer_state(self, sd: dict[str, Any]) -> None:
        """Restore this rank's ZeRO partition (the fp32 master weights included) and the scheduler."""
        mine = [sd["optimizer"]] * self.state.dp_size  # ZeRO indexes the list by data-parallel rank
        if self.zero_stage == 3:
            self.ds.optimizer.load_state_dict(mine, load_optimizer_states=True)
        else:
            self.ds.optimizer.load_state_dict(mine, load_optimizer_states=True, load_from_fp32_weights=True)
        self.scheduler.load_state_dict(sd["scheduler"])

    def full_parameters(self) -> Any:
        """A context in which ZeRO-3 partitioned parameters are whole on every rank (for saving)."""
        if self.zero_stage != 3:
            return nullcontext(self.module)
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)


def _expert_parallel_deepspeed(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: dict[str, Any],
    state: ParallelState,
) -> Any:
    """A DeepSpeed engine that treats the expert parameters as MoE parameters over this state's groups.

    What deepspeed.initialize does for a plain model, plus: the groups registered, the parameters and the optimizer's
    "moe" group named, and `has_moe_layers` set (DeepSpeed sets it only for its own deepspeed.moe.layer.MoE modules,
    and its ZeRO optimizer reads it to reduce and partition expert groups over the expert-data-parallel group).
    """
    from deepspeed import comm
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.engine import DeepSpeedEngine as _DeepSpeedEngine
    from deepspeed.utils import groups

    name = f"ep_size_{state.ep_size}"  # DeepSpeed parses the degree back out of this exact form
    groups._EXPERT_PARALLEL_GROUP[name] = state.ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(state.ep_group)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = state.edp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(state.edp_group)
    for p in model.parameters():
        if getattr(p, "expert_parallel", False):
            p.allreduce, p.group_name = False, name
    moe_groups = [g for g in optimizer.param_groups if g.get("moe")]
    if not moe_groups or any(not getattr(p, "expert_parallel", False) for g in moe_groups for p in g["params"]):
        raise ValueError(
            'expert parallelism under DeepSpeed needs the optimizer\'s expert parameters in groups marked "moe": True '
            "(training.optim.param_groups does this)"
        )
    for g in moe_groups:
        g["name"] = name

    class ExpertParallelEngine(_DeepSpeedEngine):
        def _configure_distributed_model(self, module: nn.Module) -> None:
            super()._configure_distributed_model(module)
            self.has_moe_layers = True

    mpu = _Mpu(state)
    comm.init_distributed(dist_backend=get_accelerator().communication_backend_name(), dist_init_required=False)
    engine = ExpertParallelEngine(
        args=None,
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        mpu=mpu,
        dist_init_required=False,
        config=config,
        config_class=DeepSpeedConfig(config, mpu),
    )
    engine._configure_python_gc()
    return engine


def fill_auto(
    ds_config: dict[str, Any], micro_batch: int, grad_accum: int, grad_clip: float, bf16: bool, dp: int
) -> dict[str, Any]:
    """Replace the "auto" values of a DeepSpeed config by the training config's; conflicting values are errors."""
    config = {k: v for k, v in ds_config.items()}
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * dp,
        "gradient_clipping": grad_clip,
    }
    for key, value in wanted.items():
        given = config.get(key, "auto")
        if given not in ("auto", value):
            raise ValueError(
                f'DeepSpeed config {key}={given} disagrees with the training config ({value}); set it to "auto"'
            )
        config[key] = value
    bf16_section = dict(config.get("bf16", {}))
    if bf16_section.get("enabled", "auto") not in ("auto", bf16):
        raise ValueError(f"DeepSpeed config bf16.enabled={bf16_section['enabled']} disagrees with train.dtype")
    bf16_section["enabled"] = bf16
    config["bf16"] = bf16_section
    if config.get("fp16", {}).get("enabled") is True:
        raise ValueError(
            "DeepSpeed config fp16.enabled=true: this project trains in bf16 or fp32; remove the fp16 section"
        )
    return config


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
        return Engine(model, optimizer, scheduler, state=state, grad_accum=grad_accum, grad_clip=grad_clip)
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
