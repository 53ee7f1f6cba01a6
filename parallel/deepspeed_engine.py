"""The DeepSpeed engine: ZeRO 1-3 (optionally offloaded), sharding and reducing over the data-parallel group only.

It has the interface of `parallel.engine.Engine`; `parallel.engine.build_engine` picks it for ZeRO stages 1-3.
Under ZeRO-Offload (`offloads_optimizer`) the optimizer should be DeepSpeed's CPU Adam, which the trainer builds
(training.optim.build_optimizer); a torch optimizer is accepted too, stepping on the CPU several times slower.
DeepSpeed clips by the global gradient norm itself: every parameter is marked `tensor_model_parallel` when it is
tensor-split, so that DeepSpeed's norm counts replicated parameters only on tensor rank 0.

Under ZeRO 1/2 with expert parallelism (ep > 1) the experts become DeepSpeed MoE parameters: `allreduce = False` and
`group_name = "ep_size_<ep>"`, with this ParallelState's expert and expert-data-parallel groups registered under that
name in `deepspeed.utils.groups` (instead of groups DeepSpeed would create) and the optimizer's `"moe"` param group
named after it, so ZeRO reduces expert gradients and partitions their fp32 master weights and Adam states over the
expert-data-parallel group. That path uses DeepSpeed internals (the group tables of `deepspeed.utils.groups`,
`DeepSpeedEngine._configure_distributed_model`), so it checks first that the installed DeepSpeed is in the range it
was tested with (`TESTED_DEEPSPEED`, the range requirements.txt states).

Buffers keep the dtype the model built them in (fp32: the rotary frequencies, the MoE expert bias and loads) whatever
DeepSpeed does to the module: releases before 0.19.2 cast the whole module to bf16 (`module.bfloat16()`), later
ones cast the buffers when the json sets `data_types.buffer_dtype`. A bf16 `expert_bias` rounds the small updates of
auxiliary-loss-free balancing away and bf16 `inv_freq` shifts every rotary angle, so the engine puts the fp32 values
back after DeepSpeed's set-up.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from parallel.build_locks import warn_stale_build_locks
from parallel.pipeline import reduce_tied_grads
from parallel.state import ParallelConfigError, ParallelState

# (lowest, first excluded) DeepSpeed release, as requirements.txt states; tested with 0.19.8, and the internals the
# expert-parallel path writes into are in every 0.19 release's sources
TESTED_DEEPSPEED = ((0, 19), (0, 20))


class DeepSpeedEngine:
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

        warn_stale_build_locks()  # DeepSpeed loads its ops below and would wait on a killed build's lock
        self.module, self.state, self.grad_accum, self.grad_clip = model, state, grad_accum, grad_clip
        self._micro = 0
        config = fill_auto(ds_config, micro_batch_size, grad_accum, grad_clip, bf16, state.dp_cp_size)
        self.zero_stage = int(config.get("zero_optimization", {}).get("stage", 0))
        for p in model.parameters():  # DeepSpeed's norm counts replicated parameters only on tensor rank 0
            p.tensor_model_parallel = getattr(p, "tp_split_dim", None) is not None
            # and leaves out a tied embedding's last-stage copy (DeepSpeed's own pipeline marks its ties so)
            p.ds_pipe_replicated = getattr(p, "pipeline_tied", None) == "copy"
        if state.pp_size > 1:
            # the pipeline schedule runs backward itself: DeepSpeed then only accumulates, and step() is the
            # boundary that reduces (with its default accumulation the parameters drifted, by 1e-2 in a test)
            config["managed_gradient_accumulation"] = False
        fp32_buffers = {n: b.detach().clone() for n, b in model.named_buffers() if b.dtype == torch.float32}
        if offloads_optimizer(config) and not isinstance(optimizer, deepspeed.ops.adam.DeepSpeedCPUAdam):
            # ZeRO-Offload with a torch optimizer (training.optim.build_optimizer's fallback, which warned, or a
            # caller's own): DeepSpeed refuses it unless told that the slower CPU step is meant
            config["zero_force_ds_cpu_optimizer"] = False
        if state.ep_size > 1 and any(getattr(p, "expert_parallel", False) for p in model.parameters()):
            if self.zero_stage == 3:
                raise ParallelConfigError(
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
        _restore_fp32_buffers(model, fp32_buffers)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's forward (ZeRO-3 gathers parameters around it)."""
        return self.ds(*args, **kwargs)

    def micro_batch(self) -> nullcontext:
        """Nothing to arm: DeepSpeed knows its accumulation boundary from the micro-steps counted in backward().

        ZeRO-1 reduces there only; ZeRO-2/3 reduce-scatter each micro-batch's gradients into their partitions by
        design (what keeps a rank's gradients at 1/dp), which DeepSpeed's own `no_sync` refuses to switch off.
        """
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed scales by 1/grad_accum itself and reduces at the accumulation boundary."""
        self._micro += 1
        self.ds.backward(loss)
        if self._micro < self.grad_accum:
            self.ds.step()  # a micro-step: DeepSpeed counts it and steps nothing

    def step(self) -> float:
        """The boundary step: DeepSpeed reduces (under a pipeline), clips, steps optimizer and schedule.

        ZeRO-1/2 skip the step themselves when the gradient norm is not finite; ZeRO-3 does not in fp32/bf16, and
        the trainer stops the run on a non-finite norm there.
        """
        if self.state.pp_size > 1:
            reduce_tied_grads(list(self.module.parameters()), self.state)
        self.ds.step()
        self._micro = 0
        norm = self.ds.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def skip_step(self) -> None:
        """Not supported generically under ZeRO: the trainer stops instead (see its non-finite handling)."""
        raise RuntimeError("DeepSpeedEngine cannot discard accumulated ZeRO gradients")

    @property
    def lr(self) -> float:
        """Current learning rate of the first parameter group."""
        return self.optimizer.param_groups[0]["lr"]

    def optimizer_tensors(self, keep: Callable[[str], bool] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Adam's moments, step and fp32 master per parameter name, whole over the data-parallel ranks (CPU fp32).

        Collective over the data-parallel group (parallel.optimizer_state reads ZeRO's flat partitions).
        """
        import deepspeed

        from parallel.optimizer_state import deepspeed_optimizer_tensors

        check_deepspeed_version(deepspeed.__version__, "layout-free optimizer state under DeepSpeed ZeRO")
        return deepspeed_optimizer_tensors(self.module, self.ds.optimizer, keep)

    def load_optimizer_tensors(self, get: Callable[[str], dict[str, torch.Tensor] | None]) -> None:
        """Write what optimizer_tensors() returned (at any layout, cut to this rank) into ZeRO's flat partitions.

        Collective; works before the first step. Without "master" the fp32 master is the module's current value.
        """
        import deepspeed

        from parallel.optimizer_state import load_deepspeed_optimizer_tensors

        check_deepspeed_version(deepspeed.__version__, "layout-free optimizer state under DeepSpeed ZeRO")
        load_deepspeed_optimizer_tensors(self.module, self.ds.optimizer, get)

    def full_parameters(self) -> Any:
        """A context in which ZeRO-3 partitioned parameters are whole on every rank (for saving)."""
        if self.zero_stage != 3:
            return nullcontext(self.module)
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)


def frozen_like_policy(
    model: nn.Module,
    *,
    ds_config: dict[str, Any],
    state: ParallelState,
    micro_batch_size: int,
    grad_accum: int,
    grad_clip: float,
    bf16: bool,
) -> nn.Module:
    """A frozen model placed as DeepSpeedEngine places the policy: what to call for its forward.

    ZeRO-3: partitioned over the data-parallel group by DeepSpeed with no optimizer (its parameter offload
    engine alone: the gathering hooks, as for the policy); the forward is collective over that group. Stages 1-2
    keep the whole model on every rank: only the bf16 cast of the policy is repeated. fp32 buffers stay fp32.
    """
    import deepspeed

    config = fill_auto(ds_config, micro_batch_size, grad_accum, grad_clip, bf16, state.dp_cp_size)
    fp32_buffers = {n: b.detach().clone() for n, b in model.named_buffers() if b.dtype == torch.float32}
    if int(config.get("zero_optimization", {}).get("stage", 0)) != 3:
        if bf16:
            model.to(torch.bfloat16)
        _restore_fp32_buffers(model, fp32_buffers)
        return model
    config = {k: v for k, v in config.items() if k not in ("optimizer", "scheduler")}
    config["zero_optimization"] = {k: v for k, v in config["zero_optimization"].items() if k != "offload_optimizer"}
    engine, *_ = deepspeed.initialize(model=model, config=config, mpu=_Mpu(state), dist_init_required=False)
    _restore_fp32_buffers(model, fp32_buffers)
    return engine


def _restore_fp32_buffers(model: nn.Module, fp32: dict[str, torch.Tensor]) -> None:
    """Put back the fp32 values of the buffers DeepSpeed cast (in place: whoever holds the tensor sees fp32)."""
    for name, buf in model.named_buffers():
        if name in fp32 and buf.dtype != torch.float32:
            buf.data = fp32[name].to(buf.device)


def check_deepspeed_version(version: str, why: str) -> None:
    """Raise ParallelConfigError unless `version` (deepspeed.__version__) is in TESTED_DEEPSPEED.

    `why` names what needs the tested range (the feature that uses DeepSpeed's internals).
    """
    from packaging.version import InvalidVersion, Version

    (lo, hi), wanted = TESTED_DEEPSPEED, _tested_range()
    try:
        release = Version(version).release[:2]
    except InvalidVersion:
        release = None
    if release is None or not lo <= release < hi:
        raise ParallelConfigError(
            f"{why} uses DeepSpeed internals tested with deepspeed{wanted}, but DeepSpeed {version} is installed: "
            f"pip install 'deepspeed{wanted}' (the range in requirements.txt)"
        )


def _tested_range() -> str:
    (lo, hi) = TESTED_DEEPSPEED
    return f">={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}"


class _Mpu:
    """The model-parallel-unit interface DeepSpeed asks for, answered from a ParallelState.

    DeepSpeed sums the gradient norm over `get_model_parallel_group()`: the tensor x pipeline ranks of one
    data-parallel rank (every stage holds other layers), counting replicated parameters on tensor rank 0 only.
    """

    def __init__(self, state: ParallelState) -> None:
        self.s = state

    def get_tensor_model_parallel_rank(self) -> int:
        return self.s.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.s.tp_size

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup | None:
        return self.s.tp_group

    get_model_parallel_rank = get_tensor_model_parallel_rank

    def get_model_parallel_world_size(self) -> int:
        return self.s.tp_size * self.s.pp_size

    def get_model_parallel_group(self) -> dist.ProcessGroup | None:
        return self.s.mp_group if self.s.pp_size > 1 else self.s.tp_group

    # ZeRO shards and reduces over dp x cp: context ranks hold the same weights and other chunks of the sequences
    def get_data_parallel_rank(self) -> int:
        return self.s.dp_cp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.s.dp_cp_size

    def get_data_parallel_group(self) -> dist.ProcessGroup | None:
        return self.s.dp_cp_group

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.s.pp_size

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.s.pp_rank

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup | None:
        return self.s.pp_group


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
    import deepspeed
    from deepspeed import comm
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.engine import DeepSpeedEngine as _DeepSpeedEngine
    from deepspeed.utils import groups

    why = f"expert parallelism under DeepSpeed ZeRO (parallel.ep={state.ep_size})"
    check_deepspeed_version(deepspeed.__version__, why)
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
    if hasattr(engine, "_configure_python_gc"):  # deepspeed.initialize's last step in the latest 0.19 releases
        engine._configure_python_gc()
    return engine


def offloads_optimizer(ds_config: dict[str, Any] | None) -> bool:
    """Whether a DeepSpeed config offloads the optimizer (ZeRO-Offload: offload_optimizer.device cpu or nvme).

    Its step then runs on the CPU, where the optimizer should be DeepSpeed's CPU Adam
    (training.optim.build_optimizer(..., offload=...) builds it).
    """
    device = (ds_config or {}).get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in ("none", None)


def fill_auto(
    ds_config: dict[str, Any], micro_batch: int, grad_accum: int, grad_clip: float, bf16: bool, dp: int
) -> dict[str, Any]:
    """Replace the "auto" values of a DeepSpeed config by the training config's; conflicting values are errors.

    Also switches DeepSpeed's throughput timer off unless the config sets timers.throughput (two device syncs
    per micro-batch).
    """
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
            raise ParallelConfigError(
                f'DeepSpeed config {key}={given} disagrees with the training config ({value}); set it to "auto"'
            )
        config[key] = value
    bf16_section = dict(config.get("bf16", {}))
    if bf16_section.get("enabled", "auto") not in ("auto", bf16):
        raise ParallelConfigError(f"DeepSpeed config bf16.enabled={bf16_section['enabled']} disagrees with train.dtype")
    bf16_section["enabled"] = bf16
    config["bf16"] = bf16_section
    if config.get("fp16", {}).get("enabled") is True:
        raise ParallelConfigError(
            "DeepSpeed config fp16.enabled=true: this project trains in bf16 or fp32; remove the fp16 section"
        )
    # DeepSpeed's throughput timer (on by default) synchronises the device at the start and end of every
    # micro-batch; the trainer times its steps itself. A config's own timers.throughput is kept.
    config["timers"] = {"throughput": {"enabled": False}, **(config.get("timers") or {})}
    return config
