"""AdamW with decoupled weight decay on matrices only, and a warmup-then-decay learning-rate schedule."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from configs.sections import OptimSection
from parallel.build_locks import warn_stale_build_locks


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight matrices decay; norms, biases and embeddings do not (as Megatron and Open-Llama).

    A tied embedding's copy on the last pipeline stage (`pipeline_tied`, named lm_head) is the embedding too.

    Expert-parallel weights (MoE experts, all matrices) form a third group marked `"moe": True`, DeepSpeed's mark of
    a group whose ZeRO partitions span the expert-data-parallel group (the engine names it; parallel.deepspeed_engine).
    """
    decay, no_decay, experts = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "expert_parallel", False):
            experts.append(p)
        elif p.ndim < 2 or "embed" in name or "norm" in name or getattr(p, "pipeline_tied", None):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": experts, "weight_decay": weight_decay, "moe": True},
    ]
    return [g for g in groups if g["params"]]


def lr_lambda(cfg: OptimSection, max_steps: int) -> Callable[[int], float]:
    """Multiplier of cfg.lr at optimizer step `step` (0-based): linear warmup, then cosine/linear/constant to min_lr."""
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    warmup = cfg.warmup_steps

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        if cfg.decay == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_optimizer(
    model: nn.Module, cfg: OptimSection, max_steps: int, *, offload: str | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over param_groups(model) and its LambdaLR schedule.

    torch's AdamW runs its fused kernel wherever it can (`fused_adamw_supported`: CPU and CUDA parameters).
    `offload` names the DeepSpeed config that offloads the optimizer (ZeRO-Offload; the trainer passes
    `parallel.deepspeed_config` where `parallel.deepspeed_engine.offloads_optimizer` says so). The optimizer is then
    DeepSpeed's CPU Adam (`deepspeed.ops.adam.DeepSpeedCPUAdam`: AdamW's update vectorised in C++, the same groups
    and hyperparameters, fp32 moments, the step a Python int), which ZeRO steps on its fp32 partitions in CPU memory;
    torch's AdamW there is several times slower. Its op is compiled on first use with the machine's C++ compiler
    and ninja (about 1.5 CPU-minutes, cached in $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions;
    `DS_BUILD_CPU_ADAM=1 pip install deepspeed` builds it ahead). Where it cannot be built, a warning names the
    config and the cause, and torch's AdamW steps instead.
    """
    hyper = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    opt = _cpu_adam(param_groups(model, cfg.weight_decay), hyper, offload) if offload else None
    if opt is None:  # fresh groups: an optimizer's constructor fills its defaults into the group dicts
        groups = param_groups(model, cfg.weight_decay)
        opt = torch.optim.AdamW(groups, **hyper, fused=fused_adamw_supported(groups))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, max_steps))


def fused_adamw_supported(groups: list[dict]) -> bool:
    """Whether torch's fused AdamW (`fused=True`) takes these parameters: floating point, on the CPU or a CUDA GPU.

    The fused kernel updates each parameter in one pass (moments, bias correction, decay and the update together),
    where the default multi-tensor (foreach) AdamW makes about ten passes, each over every parameter: measured on a
    2-core CPU for a 58M-parameter Llama (bench/throughput.py's), 260 ms -> 42 ms per step in bf16 and
    167 ms -> 37 ms in fp32, and torch names it the fastest on CUDA. It computes in fp32 whatever the parameters'
    dtype (bf16 weights round once), which matches the foreach step to fp32 rounding (1.5e-8 there in fp32).
    transformers' Trainer uses it by default (optim="adamw_torch_fused").
    """
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def _cpu_adam(groups: list[dict], hyper: dict, offload: str) -> torch.optim.Optimizer | None:
    """DeepSpeed's CPU AdamW over `groups`, or None (with a warning that names `offload`) where its op fails."""
    warn_stale_build_locks()  # the op's build would wait on a killed build's lock
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **hyper)
    except (ImportError, RuntimeError) as e:  # DeepSpeed wraps the op's build or load error in a RuntimeError
        cause = e.__cause__ or e
        first = (str(cause).strip().splitlines() or [""])[0]  # a failed build's compiler log follows
        warnings.warn(
            f"{offload} offloads the optimizer (zero_optimization.offload_optimizer), but DeepSpeed's CPU Adam op "
            f"could not be built or loaded ({type(cause).__name__}: {first}): stepping with torch.optim.AdamW on the "
            "CPU instead, several times slower. The op needs a C++ compiler and ninja (pip install ninja), or "
            "DeepSpeed installed with DS_BUILD_CPU_ADAM=1",
            stacklevel=3,
        )
        return None


def schedule_state(scheduler: torch.optim.lr_scheduler.LambdaLR) -> dict:
    """The schedule's position in a form that loads at any layout: the number of steps taken.

    torch's own state_dict holds one base lr (and one lambda) per parameter group, and a layout may have other groups
    (a pipeline stage without the embedding has no no-decay embedding, a dense stage no expert group).
    """
    return {"step": int(scheduler.last_epoch)}


def load_schedule_state(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict) -> None:
    """Move the schedule to `state["step"]`: every group's lr is its base lr times lambda(step), as if run on."""
    if "step" not in state:
        raise ValueError(f"schedule state {state!r} has no 'step': it was not written by schedule_state()")
    step = int(state["step"])
    scheduler.last_epoch = step
    scheduler._step_count = step + 1  # torch warns about a schedule stepped before its optimizer at count 1 only
    groups = scheduler.optimizer.param_groups
    for group, base_lr, f in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base_lr * f(step)
    scheduler._last_lr = [group["lr"] for group in groups]
