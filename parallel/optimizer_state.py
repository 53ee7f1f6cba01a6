"""Optimizer state per parameter, in no layout: Adam's moments, step and master weight by parameter name.

Both engines export and import their state in this form (`Engine.optimizer_tensors` / `load_optimizer_tensors`):
for every parameter of the module, CPU fp32 tensors in the parameter's local shape (the rank's tensor, expert or
pipeline shard, whole over the data-parallel ranks). The checkpoint writes them beside the model's own shards, split
along the same dimension, so they load at any tp/pp/ep/dp and any ZeRO stage.

DeepSpeed keeps its state in flat fp32 partitions over the data-parallel group (the expert-data-parallel group for
MoE parameter groups). Its tensor-fragment API (`deepspeed.utils.safe_get_full_*` / `safe_set_full_*`) maps a
parameter onto its fragments: the gets are collective over the partition group (ZeRO-1/2 all-reduce a zero-padded
buffer over `param._dp_group`, ZeRO-3 all-gathers the partitions), the sets write only this rank's fragment. What the
API does not cover is read from the ZeRO optimizer's own attributes (tested with DeepSpeed 0.19):

- which flat partition a parameter belongs to, for its step count: Adam keeps one "step" per flat partition (the
  torch optimizer's "param" is the partition), so all parameters of one ZeRO group share it;
- the Adam state itself before the first step: torch's AdamW creates it lazily in `step()`, and ZeRO-1/2 link the
  parameters' fragments to it only after that step (`_lazy_init_hp_params_optimizer_state`, which misses every group
  but the first: see `_link_fragments`), so a load before the first step creates the zero state AdamW would create
  and links it;
- the module's bit16 copy after the fp32 master is set: ZeRO-1/2 hold every parameter whole (copied in place),
  ZeRO-3 copies its fp32 partitions into the bit16 ones and re-gathers the persistent parameters, as after a step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def cpu_fp32(t: torch.Tensor) -> torch.Tensor:
    """A CPU fp32 copy of `t` (detached, never a view of the optimizer's own tensor)."""
    return t.detach().to("cpu", torch.float32, copy=True)


def check_local_shapes(name: str, shape: torch.Size | tuple[int, ...], tensors: dict[str, torch.Tensor]) -> None:
    """Raise ValueError unless `tensors` has Adam's keys, and its moments (and master) have the parameter's shape."""
    missing = [k for k in (*ADAM_KEYS, "step") if k not in tensors]
    if missing:
        raise ValueError(f"optimizer state of parameter {name} lacks {missing}: the checkpoint is incomplete")
    for key in (*ADAM_KEYS, "master"):
        if key in tensors and tuple(tensors[key].shape) != tuple(shape):
            raise ValueError(
                f"optimizer state {name}.{key} has shape {tuple(tensors[key].shape)}, but this rank's parameter is "
                f"{tuple(shape)}: cut it to this rank's tensor/expert shard before loading"
            )


def zero_groups(zero: Any) -> list[tuple[list[nn.Parameter], torch.Tensor]]:
    """(the module's parameters, this rank's flat fp32 partition) of each group of a DeepSpeed ZeRO optimizer."""
    if getattr(zero, "swap_optimizer", False):
        raise ValueError(
            "ZeRO-Infinity's NVMe optimizer swapping (offload_optimizer.device=nvme) keeps the Adam state on disk; "
            "layout-free optimizer state is not supported there: use offload_optimizer.device=cpu or none"
        )
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3: one partition per sub-group
        return list(zip(zero.fp16_groups, zero.fp32_partitioned_groups_flat, strict=True))
    if hasattr(zero, "fp32_groups_flat_partition"):  # BF16_Optimizer: ZeRO-1 in bf16 with fp32 accumulation
        return list(zip(zero.bf16_groups, zero.fp32_groups_flat_partition, strict=True))
    if hasattr(zero, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        return list(zip(zero.bit16_groups, zero.single_partition_of_fp32_groups, strict=True))
    raise TypeError(f"unknown DeepSpeed ZeRO optimizer {type(zero).__name__}: no flat fp32 partitions found")


def deepspeed_optimizer_tensors(
    module: nn.Module, zero: Any, keep: Callable[[str], bool] | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """Every trained parameter's Adam moments, step and fp32 master, whole over the data-parallel ranks.

    Collective: every rank of the (expert-)data-parallel group calls it, the parameters in the same order. A group
    that never stepped has no state on any rank and is left out; so is a parameter `keep` rejects (its collective
    still runs, but this rank keeps no host copy).
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    groups = zero_groups(zero)
    _link_fragments(zero, groups)
    partition = {id(p): flat for params, flat in groups for p in params}
    out = {}
    for name, p in module.named_parameters():
        flat = partition.get(id(p))
        if flat is None:  # not trained (requires_grad=False): not in the optimizer
            continue
        st = zero.optimizer.state.get(flat)
        if not st or "exp_avg" not in st:
            continue
        tensors = {key: safe_get_full_optimizer_state(p, key) for key in ADAM_KEYS}
        tensors["master"] = safe_get_full_fp32_param(p)
        if keep is not None and not keep(name):
            continue
        tensors = {key: cpu_fp32(t) for key, t in tensors.items()}
        tensors["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)
        out[name] = tensors
    return out


def load_deepspeed_optimizer_tensors(
    module: nn.Module, zero: Any, get: Callable[[str], dict[str, torch.Tensor] | None]
) -> None:
    """Write `get(name)`'s moments and master into ZeRO's flat partitions, and the master into the module.

    Collective, as deepspeed_optimizer_tensors. Without "master" the fp32 master is set from the module's current
    value (load the model first). A None parameter gets zero moments. Each flat partition takes the largest step
    of its parameters (Adam counts steps per partition; a layout's parameters normally share one count).
    """
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    groups = zero_groups(zero)
    _create_adam_state(zero, groups)
    index = {id(p): i for i, (params, _) in enumerate(groups) for p in params}
    stage3 = hasattr(zero, "fp32_partitioned_groups_flat")
    steps: list[float] = [0.0] * len(groups)
    for name, p in module.named_parameters():
        i = index.get(id(p))
        if i is None:
            continue
        shape = p.ds_shape if stage3 else p.shape
        tensors = get(name)
        if tensors is not None:
            check_local_shapes(name, shape, tensors)
            steps[i] = max(steps[i], float(tensors["step"]))
        for key in ADAM_KEYS:
            value = torch.zeros(shape) if tensors is None else tensors[key]
            safe_set_full_optimizer_state(p, value.to(p.device, torch.float32), key)
        if tensors is not None and "master" in tensors:
            master = tensors["master"].to(p.device, torch.float32)
        elif stage3:  # the module's value, whole: ZeRO-3 holds only a partition of it
            with deepspeed.zero.GatheredParameters([p]):
                master = p.detach().float().clone()
        else:
            master = p.detach().float().clone()
        safe_set_full_fp32_param(p, master)
        if not stage3:  # ZeRO-1/2 hold the bit16 parameter whole on every rank
            with torch.no_grad():
                p.copy_(master)
    for (_, flat), step in zip(groups, steps, strict=True):
        st = zero.optimizer.state[flat]
        if torch.is_tensor(st["step"]):
            st["step"].fill_(step)
        else:
            st["step"] = int(step)
    if stage3:  # the bit16 partitions from the fp32 ones, then the persistent parameters whole again
        for i in range(len(groups)):
            zero._reassign_or_swap_out_partitioned_parameters(i)
        zero.checkpoint_event_epilogue()


def _create_adam_state(zero: Any, groups: list[tuple[list[nn.Parameter], torch.Tensor]]) -> None:
    """Zero Adam state for each flat partition that has none yet (what AdamW's first step would create).

    ZeRO-1/2's parameter fragments are then linked to it, as DeepSpeed does after its first step.
    """
    opt = zero.optimizer
    torch_adam = type(opt).__module__.startswith("torch.optim")
    for _, flat in groups:
        st = opt.state[flat]
        if "exp_avg" in st:
            continue
        # ZeRO-3 puts a partition into its group only around that group's step: the defaults hold the same flags
        group = next((g for g in opt.param_groups if any(q is flat for q in g["params"])), opt.defaults)
        if torch_adam:  # torch keeps the step as a 0-d fp32 tensor, on the device when capturable or fused
            on_device = group.get("capturable") or group.get("fused")
            st["step"] = torch.zeros((), dtype=torch.float32, device=flat.device if on_device else "cpu")
        else:  # DeepSpeed's CPU Adam counts in a Python int
            st["step"] = 0
        for key in ADAM_KEYS + (("max_exp_avg_sq",) if group.get("amsgrad") else ()):
            st[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    _link_fragments(zero, groups)


def _link_fragments(zero: Any, groups: list[tuple[list[nn.Parameter], torch.Tensor]]) -> None:
    """Point ZeRO-1/2's parameter fragments at the Adam state of their flat partitions (ZeRO-3 needs no links).

    DeepSpeed links them once, right after the first group's first step, when the later groups have no state yet:
    their fragments stay empty (DeepSpeed 0.19.8), and the fragment API raises "exp_avg not found". Linking again
    makes views of the same tensors, so it is safe to repeat.
    """
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        return
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    for params, flat in groups:
        if "exp_avg" in zero.optimizer.state.get(flat, {}):
            lazy_init_hp_params_optimizer_state(params, flat, zero.optimizer.state)
    zero._hp_optimizer_states_linked = True  # and DeepSpeed's own late linking would find nothing new
