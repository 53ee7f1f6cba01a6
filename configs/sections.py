"""The config sections: one dataclass per yaml section, its typed keys, and the checks on its own values.

Every check raises ConfigError naming the key (`train.max_steps=0 must be positive`). Rules that join sections
(batch sizes over the data-parallel ranks, the layout) are TrainConfig.validate's, in configs/schema.py; the
model against the layout is configs/architecture.py's. Paths in a config resolve from the working directory, else
from the repository root.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin

from dataset.jsonl_zst import ON_ERROR
from parallel.lora import LORA_TARGETS
from parallel.pipeline import SCHEDULES

CONFIG_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the key and what to do."""


def resolve_path(path: str) -> Path:
    """A path as given, or relative to the repository root when it does not exist from here."""
    p = Path(path)
    return p if p.exists() or p.is_absolute() else CONFIG_DIR.parent / p


def coerce(key: str, value: Any, typ: Any) -> Any:
    """Check `value` against the annotation `typ`; ints are accepted for floats. Raise ConfigError naming `key`."""
    origin, args = get_origin(typ), get_args(typ)
    if typ is Any:
        return value
    if args and type(None) in args:  # Optional / union
        if value is None:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):  # yaml 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if typ is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ in (float, str) and not isinstance(value, typ):
        raise ConfigError(f"{key}: expected a {typ.__name__}, got {value!r}")
    return value


def _positive(section: str, values: Any, *names: str) -> None:
    for name in names:
        if not getattr(values, name) > 0:
            raise ConfigError(f"{section}.{name}={getattr(values, name)!r} must be positive")


def _non_negative(section: str, values: Any, *names: str) -> None:
    for name in names:
        v = getattr(values, name)
        if not (v >= 0 and math.isfinite(v)):
            raise ConfigError(f"{section}.{name}={v!r} must be >= 0")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}; choose one of {', '.join(allowed)}")


@dataclass
class ModelSection:
    """Which architecture: a preset, or the checkpoint to start from, plus config.json keys that override it."""

    preset: str | None = None  # configs/model/<preset>.yaml; required unless init_from gives the architecture
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # native checkpoint, run directory or HF directory: architecture and weights

    def validate(self) -> None:
        """Exactly one of preset and init_from gives the architecture."""
        if self.init_from and self.preset:
            raise ConfigError(
                f"model.preset={self.preset!r} and model.init_from are both set: the checkpoint's config.json "
                f"defines the architecture; remove model.preset"
            )
        if not self.init_from and not self.preset:
            raise ConfigError("model.preset is not set: choose one of tiny, 125m, 1b, 7b (or set model.init_from)")


@dataclass
class DataSection:
    """Where the tokens come from and how they are packed."""

    train: str | list[Any] = ""  # a glob, a list of globs, or a list of {path, weight, name} sources
    valid: str | None = None  # held-out shards for periodic eval
    tokenizer: str = ""  # directory with tokenizer.model (or an HF tokenizer)
    seq_len: int = 256
    text_field: str = "text"
    add_bos: bool = True
    document_attention: bool = False  # no attention across the documents packed into one sequence
    num_workers: int | str = "auto"  # DataLoader workers per rank; auto: 0 on CPU, up to 4 on CUDA
    on_error: str = "raise"  # raise | skip
    synthetic: bool = False  # random tokens instead of text (benchmarks, equivalence tests); needs model.vocab_size
    pack: bool = True  # SFT: several conversations per sequence (needs document_attention) or one padded per row
    truncation: str = "drop"  # SFT: a conversation longer than seq_len + 1 is dropped or cut (drop | truncate)

    def validate(self) -> None:
        """Sizes and choices; real text needs shards and a tokenizer."""
        _positive("data", self, "seq_len")
        if self.num_workers != "auto":  # training.data.default_num_workers sizes auto
            if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int):
                raise ConfigError(f"data.num_workers={self.num_workers!r}: give auto or a number of worker processes")
            _non_negative("data", self, "num_workers")
        _choice("data.on_error", self.on_error, ON_ERROR)
        _choice("data.truncation", self.truncation, ("drop", "truncate"))
        if self.synthetic:
            return
        if not self.train:
            raise ConfigError("data.train is empty: give a glob of jsonl.zst shards (python -m data.shard ...)")
        if not self.tokenizer:
            raise ConfigError("data.tokenizer is empty: give a tokenizer directory (python -m dataset.train_tokenizer)")


@dataclass
class ParallelSection:
    """How the world is laid out; data-parallel degree = world_size / (pp x cp x tp), experts carved out of it."""

    tp: int = 1
    ep: int = 1
    pp: int = 1  # pipeline stages over ranks (parallel.pipeline); the outermost axis
    pp_schedule: str = "1f1b"  # 1f1b | gpipe | interleaved_1f1b | zbv
    pp_stages_per_rank: int = 1  # 2 or more for interleaved_1f1b; exactly 2 for zbv
    pp_layers: list[int] | None = None  # decoder layers per stage, in order; None = balanced
    cp: int = 1  # context parallelism: each sequence split over cp ranks (parallel.context)
    cp_attention: str = "ulysses"  # ulysses (all-to-all of heads) | ring (key/value chunks passed around)
    moe_pad_to_capacity: bool = False  # under model.capacity_factor: experts' rows padded to C, no host sync
    sequence_parallel: bool = False
    deepspeed_config: str | None = None  # a DeepSpeed json (configs/deepspeed/zero*.json); None = torch DDP
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    timeout_minutes: float = 10.0  # collective timeout: a dead rank stops the others after this long

    def layout(self) -> dict:
        """The keyword arguments of parallel.state.ParallelState.build."""
        keys = ("tp", "ep", "pp", "cp", "sequence_parallel", "cp_attention", "moe_pad_to_capacity")
        return {key: getattr(self, key) for key in keys}

    def validate(self) -> None:
        """Degrees and choices; how they fit the world size is ParallelDims' rule (TrainConfig.parallel_dims)."""
        _positive("parallel", self, "tp", "ep", "pp", "pp_stages_per_rank", "cp", "timeout_minutes")
        _choice("parallel.pp_schedule", self.pp_schedule, SCHEDULES)
        _choice("parallel.cp_attention", self.cp_attention, ("ulysses", "ring"))
        _choice("parallel.backend", self.backend, ("auto", "nccl", "gloo"))


@dataclass
class OptimSection:
    """AdamW with warmup then decay to a floor; no weight decay on norms, biases and embeddings."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 100
    decay: str = "cosine"  # cosine | linear | constant
    grad_clip: float = 1.0  # 0 disables clipping

    def validate(self) -> None:
        """Non-negative rates, a known decay, a floor at or below the peak."""
        _non_negative("optim", self, "warmup_steps", "lr", "min_lr", "weight_decay", "grad_clip")
        _choice("optim.decay", self.decay, ("cosine", "linear", "constant"))
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} is above optim.lr={self.lr}; the floor must be <= the peak")


@dataclass
class TrainSection:
    """The loop: batch sizes, steps, precision, evaluation and samples."""

    micro_batch_size: int = 8  # sequences per rank per forward
    global_batch_size: int = 8  # sequences per optimizer step over all data-parallel ranks
    max_steps: int = 1000
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on a CUDA GPU with bf16 tensor cores, else fp32) | fp32 | bf16
    tf32: bool = True  # CUDA: fp32 matmuls on TF32 tensor cores; false keeps them exact fp32 (IEEE)
    keep_host_memory: bool = True  # CPU: freed host memory stays mapped (training.distributed.keep_host_memory)
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer (modeling.compile; one graph reused by every layer)
    attention: str = "auto"  # auto (FlexAttention on CUDA for masked attention, else SDPA) | sdpa | flex
    eval_every: int = 0  # 0 = only at the end (when data.valid is set)
    eval_batches: int = 8
    sample_every: int = 0  # 0 = only at the end
    sample_prompts: list[str] = field(default_factory=lambda: ["The"])
    sample_tokens: int = 48
    max_nonfinite_steps: int = 5  # stop after this many non-finite losses in a row
    exit_interval: int = 0  # save and exit when the step is a multiple of this (job time limits); 0 = never

    def validate(self) -> None:
        """Positive sizes and counts, non-negative intervals, known device and dtype."""
        _positive("train", self, "micro_batch_size", "global_batch_size", "max_steps", "eval_batches")
        _positive("train", self, "max_nonfinite_steps")
        _non_negative("train", self, "eval_every", "sample_every", "exit_interval")
        _choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _choice("train.dtype", self.dtype, ("auto", "fp32", "bf16"))
        _choice("train.attention", self.attention, ("auto", "sdpa", "flex"))  # modeling.flex.BACKENDS


@dataclass
class CheckpointSection:
    """Where and how often to save; the run resumes from the latest good checkpoint in `dir`."""

    dir: str = "outputs/run"
    every: int = 500  # steps; 0 = only at the end
    keep_last: int = 3
    resume: bool = True
    save: bool = True  # false: no checkpoint is written (benchmarks); a signal then stops the run unsaved

    def validate(self) -> None:
        """Keep at least one checkpoint; a non-negative interval."""
        _positive("checkpoint", self, "keep_last")
        _non_negative("checkpoint", self, "every")


@dataclass
class LoggingSection:
    """metrics.jsonl always; wandb as configured; a progress bar on rank 0."""

    log_every: int = 10
    wandb_mode: str = "auto"  # auto (offline without an API key) | online | offline | disabled
    wandb_project: str = "llama-tp"
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)
    progress_bar: bool = True

    def validate(self) -> None:
        """A positive interval and a known wandb mode."""
        _positive("logging", self, "log_every")
        _choice("logging.wandb_mode", self.wandb_mode, ("auto", "online", "offline", "disabled"))


@dataclass
class LoraSection:
    """LoRA adapters for sft.py (frozen base; checkpoints hold only the adapter)."""

    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def validate(self) -> None:
        """Rank, scale, dropout and targets, when LoRA is on."""
        if not self.enabled:
            return
        _positive("lora", self, "r", "alpha")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout={self.dropout} must be in [0, 1)")
        if not self.targets or set(self.targets) - set(LORA_TARGETS):
            raise ConfigError(f"lora.targets={self.targets}; choose among {sorted(LORA_TARGETS)}")


DPO_LOSSES = ("sigmoid", "ipo")  # training.dpo_loss.LOSSES


@dataclass
class DPOSection:
    """Preference tuning for dpo.py: the loss, its temperature and where the reference policy's log-probs come from."""

    loss: str = "sigmoid"  # DPO; ipo: Azar et al.'s squared loss on length-normalised log-probs
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO: the labels are flipped with this probability (sigmoid only)
    precompute_reference: bool = False  # one pass before training stores the reference log-probs, then frees it

    def validate(self) -> None:
        """Loss, beta and label smoothing."""
        _choice("dpo.loss", self.loss, DPO_LOSSES)
        _positive("dpo", self, "beta")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError(
                f"dpo.label_smoothing applies to dpo.loss=sigmoid only (dpo.loss={self.loss}); set it to 0"
            )
