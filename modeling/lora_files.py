"""LoRA adapter files: native tensor-parallel shards (training) and PEFT's format (export).

Both are directories; adapter_config.json holds r, alpha, dropout and targets in PEFT's key names.
    native (training)  adapter_config.json + adapter-tp00-of-02.safetensors, ...: each shard records its rank, the tp
                       degree and every tensor's split dim (modeling.native_format), so an adapter saved at one tp
                       degree loads at any other
    PEFT (export)      adapter_config.json + adapter_model.safetensors with full tensors, which loads with
                       peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir), peft_dir)

    model = apply_lora(LlamaForCausalLM(config, state), r=8, alpha=16)  # parallel.lora
    save_adapter(model, out_dir)            # each tensor rank with dp_rank 0 writes its shard
    config, full = load_adapter_full(out_dir)
    merged = merge_lora_state_dict(base_full, full, config.scaling)  # W + s B A, for export
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from modeling.native_format import ShardSet
from parallel.lora import (
    AdapterError,
    LoRAConfig,
    apply_lora,
    lora_factors,
    lora_pairs,
    lora_split_dims,
    lora_state_dict,
)
from parallel.state import ParallelState

CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
ADAPTER_SHARDS = ShardSet("adapter", "tp", "llama-tp-lora", error=AdapterError, label="adapter shards")


def save_adapter(model: nn.Module, out_dir: str | Path) -> None:
    """Write this tensor rank's adapter shard (ranks with dp_rank 0) and, on tensor rank 0, adapter_config.json.

    Collective-free, except under pipeline parallelism (the stages gather to the first, which writes the layers
    of all). Under ZeRO-3 call it where the parameters are whole (the engine's full_parameters()).
    """
    config = getattr(model, "lora_config", None)
    if config is None:
        raise AdapterError("the model has no LoRA adapters to save; call apply_lora(model, ...) first")
    state: ParallelState = next(iter(lora_factors(model).values())).state
    if state.dp_rank != 0 or state.cp_rank != 0:  # replicas (data, context) hold the same adapter
        return
    out = Path(out_dir)
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    dims = lora_split_dims(model)
    if state.pp_size > 1:  # the stages send their layers' adapters to the first stage (collective over pp)
        parts: list | None = [None] * state.pp_size if state.pp_rank == 0 else None
        dst = dist.get_global_rank(state.pp_group, 0)
        dist.gather_object((tensors, dims), parts, dst=dst, group=state.pp_group)
        if state.pp_rank != 0:
            return
        for stage_tensors, stage_dims in parts[1:]:
            tensors.update(stage_tensors)
            dims.update(stage_dims)
    out.mkdir(parents=True, exist_ok=True)
    ADAPTER_SHARDS.write(tensors, dims, out, state.tp_rank, state.tp_size)
    if state.tp_rank == 0:
        _write_config(out, {"format": ADAPTER_SHARDS.format, **config.to_json_dict()})


def _layer_index(name: str) -> int | None:
    """The decoder layer of a tensor name (model.layers.N....), None outside the layers."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _write_config(out: Path, d: dict) -> None:
    (out / CONFIG_NAME).write_text(json.dumps(d, indent=2) + "\n")


def _read_config(path: Path) -> dict:
    if not (path / CONFIG_NAME).is_file():
        raise AdapterError(f"{path}: no {CONFIG_NAME}; pass a directory written by save_adapter or a PEFT adapter")
    return json.loads((path / CONFIG_NAME).read_text())


def load_adapter_full(adapter_dir: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """Config and full (merged over tensor ranks) adapter of a native adapter directory or a PEFT LoRA export."""
    path = Path(adapter_dir)
    raw = _read_config(path)
    config = LoRAConfig.from_json_dict(raw, source=str(path / CONFIG_NAME))
    if (path / PEFT_WEIGHTS_NAME).is_file():
        full = _read_peft_weights(path, raw)
    else:
        full = _read_native_shards(path)
    lora_pairs(full, str(path))
    return config, full


def _read_native_shards(path: Path) -> dict[str, torch.Tensor]:
    if not ADAPTER_SHARDS.files(path):
        raise AdapterError(f"{path}: no {ADAPTER_SHARDS.pattern} shards (nor {PEFT_WEIGHTS_NAME})")
    return ADAPTER_SHARDS.read(path)


def _read_peft_weights(path: Path, raw: dict) -> dict[str, torch.Tensor]:
    variants = ("use_rslora", "use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern")
    unsupported = {k: raw[k] for k in variants if raw.get(k)}
    if raw.get("bias", "none") != "none":
        unsupported["bias"] = raw["bias"]
    if raw.get("peft_type", "LORA") != "LORA" or unsupported:
        raise AdapterError(
            f"{path / CONFIG_NAME}: only plain LoRA adapters load here (peft_type LORA, one r and alpha, bias none); "
            f"got peft_type={raw.get('peft_type')!r} {unsupported}"
        )
    full = {}
    with safe_open(str(path / PEFT_WEIGHTS_NAME), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no iter)
            if not key.startswith(PEFT_PREFIX):
                raise AdapterError(f"{path / PEFT_WEIGHTS_NAME}: tensor {key} lacks the prefix {PEFT_PREFIX!r}")
            full[key.removeprefix(PEFT_PREFIX)] = f.get_tensor(key)
    return full


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Load an adapter saved at any tp degree into `model` (this rank's slices); returns `model`.

    A model without adapters gets them first (apply_lora with the saved config); a model with adapters must have
    the saved r, alpha and targets.
    """
    config, full = load_adapter_full(adapter_dir)
    current = getattr(model, "lora_config", None)
    if current is None:
        apply_lora(model, targets=config.targets, r=config.r, alpha=config.alpha, dropout=config.dropout)
    elif (current.r, current.alpha, current.targets) != (config.r, config.alpha, config.targets):
        raise AdapterError(
            f"{adapter_dir}: adapter has r={config.r}, alpha={config.alpha}, targets={list(config.targets)} but the "
            f"model's adapters have r={current.r}, alpha={current.alpha}, targets={list(current.targets)}"
        )
    factors = lora_factors(model)
    expected = {f"{name}.weight" for name in factors}
    part = getattr(model, "part", None)
    if part is not None and len(part.layers) < model.config.num_hidden_layers:  # a pipeline stage's layers only
        full = {k: v for k, v in full.items() if _layer_index(k) in part.layers}
    if set(full) != expected:
        missing, unexpected = sorted(expected - set(full)), sorted(set(full) - expected)
        raise AdapterError(f"{adapter_dir}: adapter tensors missing {missing[:4]}, unexpected {unexpected[:4]}")
    with torch.no_grad():
        for name, m in factors.items():
            t, dim = full[f"{name}.weight"], m.weight.tp_split_dim
            if dim is not None and m.state.tp_size > 1:
                t = t.chunk(m.state.tp_size, dim=dim)[m.state.tp_rank]
            if t.shape != m.weight.shape:
                shapes = f"{tuple(t.shape)} vs the model's {tuple(m.weight.shape)}"
                raise AdapterError(f"{adapter_dir}: {name}.weight shard {shapes}; was it trained on another model?")
            m.weight.copy_(t)
    return model


def save_peft_adapter(
    adapter_full_sd: dict[str, torch.Tensor],
    *,
    r: int,
    alpha: float,
    dropout: float,
    targets: tuple[str, ...] | list[str],
    out_dir: str | Path,
) -> None:
    """Write a full adapter as PEFT's LoRA: adapter_model.safetensors (`base_model.model.<name>`) and its config."""
    config = LoRAConfig(r=r, alpha=alpha, dropout=dropout, targets=tuple(targets))
    lora_pairs(adapter_full_sd, "adapter")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.contiguous() for k, v in adapter_full_sd.items()}
    save_file(tensors, str(out / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        **config.to_json_dict(),
        "bias": "none",
        "base_model_name_or_path": None,
    }
    _write_config(out, peft_config)
