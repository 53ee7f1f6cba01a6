"""The model a training config describes: a preset or a checkpoint's config.json, the overrides, the tokenizer.

    model_config = resolve_model_config(cfg, tokenizer)   # vocab_size: the tokenizer's, padded to 64 x tp

TrainConfig.validate() resolves it without a tokenizer to check the model against parallel.* and data.seq_len
before any work. Only yaml and config.json are read: resolving a config imports no checkpoint I/O (safetensors,
the model).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, get_type_hints

import yaml

from configs.sections import CONFIG_DIR, ConfigError, coerce, resolve_path
from modeling.config import CheckpointError, ModelConfig, resolve_checkpoint_dir
from modeling.config import ConfigError as ModelConfigError
from parallel.layers import padded_size
from parallel.pipeline import check_pipeline, check_schedule_torch

if TYPE_CHECKING:
    from configs.schema import TrainConfig
    from dataset.tokenizer import Tokenizer

# A vocabulary taken from the tokenizer pads to a multiple of 64 x tp: each tensor rank's slice of the embedding and
# head is 64-aligned (faster matmuls). Any size works at any tp (parallel.layers pads to tp in memory); this one is
# the size the model is built and saved with.
VOCAB_MULTIPLE = 64


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """`vocab_size` rounded up to a multiple of 64 x tp."""
    return padded_size(vocab_size, VOCAB_MULTIPLE * tp)


def _model_keys(cfg: TrainConfig) -> dict[str, Any]:
    """Model config keys: the init_from checkpoint's or the preset's, then the overrides; unknown keys are errors."""
    keys: dict[str, Any] = {}
    if cfg.model.init_from:
        try:
            base = ModelConfig.load(resolve_checkpoint_dir(resolve_path(cfg.model.init_from)) / "config.json")
        except (ModelConfigError, CheckpointError, OSError) as e:
            raise ConfigError(f"model.init_from={cfg.model.init_from}: {e}") from None
        keys.update(dataclasses.asdict(base))
    elif cfg.model.preset:
        path = CONFIG_DIR / "model" / f"{cfg.model.preset}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
            raise ConfigError(f"model.preset={cfg.model.preset!r}: no {path}; known presets: {known}")
        keys.update(yaml.safe_load(path.read_text()) or {})
    keys.update(cfg.model.overrides)
    hints = get_type_hints(ModelConfig)
    for k in keys:
        if k not in hints:
            raise ConfigError(f"model.overrides.{k}: unknown model key; known keys: {sorted(hints)}")
    # null means "not set": the default (vocab_size: the tokenizer's) applies
    return {k: coerce(f"model.{k}", v, hints[k]) for k, v in keys.items() if v is not None}


def resolve_model_config(
    cfg: TrainConfig, tokenizer: Tokenizer | None, *, grad_accum: int | None = None, resumed_vocab: int | None = None
) -> ModelConfig:
    """The architecture: preset or checkpoint, then overrides; vocab_size from the tokenizer (padded) when not given.

    `resumed_vocab` is the vocabulary of the checkpoint a run resumes: padded for the tp that started the run, it
    stays at any other tp (parallel.layers pads it in memory), so that the run's architecture does not change.

    Checked against parallel.* (the pipeline's stages against the layers and, given `grad_accum`, the micro-batches
    per step) and data.seq_len. Without a tokenizer (validation before it is loaded) an unset
    vocab_size is a placeholder of 64 x tp, except with synthetic data, which has no tokenizer to take it from.
    """
    keys = _model_keys(cfg)
    tp = cfg.parallel.tp
    if tokenizer is not None:
        if keys.get("vocab_size") is None:
            keys["vocab_size"] = resumed_vocab or padded_vocab_size(tokenizer.vocab_size, tp)
        if keys["vocab_size"] < tokenizer.vocab_size:
            raise ConfigError(
                f"model vocab_size={keys['vocab_size']} is smaller than the tokenizer's {tokenizer.vocab_size} "
                f"({cfg.data.tokenizer}); remove model.overrides.vocab_size to take it from the tokenizer"
            )
        keys.setdefault("bos_token_id", tokenizer.bos_id if tokenizer.bos_id >= 0 else None)
        keys.setdefault("eos_token_id", tokenizer.eos_id if tokenizer.eos_id >= 0 else None)
        keys.setdefault("pad_token_id", tokenizer.pad_id if tokenizer.pad_id >= 0 else None)
    elif cfg.data.synthetic and not keys.get("vocab_size"):
        raise ConfigError("data.synthetic needs model.overrides.vocab_size (there is no tokenizer to take it from)")
    else:
        keys.setdefault("vocab_size", padded_vocab_size(1, tp))  # a placeholder: the tokenizer is checked when loaded
    try:
        config = ModelConfig(**keys)
        config.validate_parallel(tp, cfg.parallel.ep)
        p = cfg.parallel
        heads = config.num_attention_heads // tp
        if p.cp > 1 and p.cp_attention == "ulysses" and heads % p.cp:
            raise ConfigError(
                f"parallel.cp_attention=ulysses splits each tensor rank's {heads} attention heads (model "
                f"num_attention_heads={config.num_attention_heads} / parallel.tp={tp}) over parallel.cp={p.cp} ranks: "
                f"choose a cp that divides them, or parallel.cp_attention=ring"
            )
        if p.moe_pad_to_capacity and (not config.num_local_experts or config.capacity_factor is None):
            raise ConfigError(
                "parallel.moe_pad_to_capacity=true pads each expert's rows to its capacity: it needs an MoE model "
                "(model.num_local_experts > 0) with model.capacity_factor set; set them, or turn it off"
            )
        if p.cp > 1 and p.ep > 1 and p.deepspeed_config:
            raise ConfigError(
                f"parallel.cp={p.cp} with parallel.ep={p.ep} under {p.deepspeed_config}: DeepSpeed reduces expert "
                f"gradients over the expert-data-parallel group only, not over the context group; use the torch "
                f"engine (parallel.deepspeed_config=null) or ep=1"
            )
        check_pipeline(
            pp=p.pp,
            schedule=p.pp_schedule,
            stages_per_rank=p.pp_stages_per_rank,
            num_layers=config.num_hidden_layers,
            pp_layers=p.pp_layers,
            microbatches=grad_accum if grad_accum is not None else p.pp,
        )
        if p.pp > 1:
            check_schedule_torch(p.pp_schedule)
    except ValueError as e:  # ModelConfig's ConfigError and ParallelConfigError alike
        raise ConfigError(str(e)) from None
    if cfg.data.seq_len > config.max_position_embeddings:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model max_position_embeddings="
            f"{config.max_position_embeddings}; raise model.overrides.max_position_embeddings"
        )
    return config
