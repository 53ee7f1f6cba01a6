"""The training configuration: one dataclass per section, loaded from yaml, with dotted command-line overrides.

    cfg = load_config("configs/pretrain_tiny.yaml", ["parallel.tp=2", "optim.lr=1e-3"])
    cfg.validate(world_size=4)          # every check before any work; errors name the key

Sections: `model`, `data`, `parallel`, `optim`, `train`, `checkpoint`, `logging`. Unknown keys are errors. The
`model` section names a preset (`configs/model/<preset>.yaml`, Hugging Face config.json keys) and may override any of
its keys; `vocab_size: null` takes the tokenizer's vocabulary, padded to a multiple of 64 x tp.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

CONFIG_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the key and what to do."""


@dataclass
class ModelSection:
    """Which architecture: a preset, or the checkpoint to start from, plus config.json keys that override it."""

    preset: str | None = None  # configs/model/<preset>.yaml; required unless init_from gives the architecture
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # native checkpoint, run directory or HF directory: architecture and weights


@dataclass
class DataSource:
    """One weighted source of a mixture: a glob (or list of globs) of jsonl.zst shards."""

    path: str | list[str] = ""
    weight: float = 1.0
    name: str | None = None


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
    num_workers: int = 0
    on_error: str = "raise"  # raise | skip
    synthetic: bool = False  # random tokens instead of text (benchmarks, equivalence tests); needs model.vocab_size
    pack: bool = True  # SFT: several conversations per sequence (needs document_attention) or one padded per row
    truncation: str = "drop"  # SFT: a conversation longer than seq_len + 1 is dropped or cut (drop | truncate)


@dataclass
class ParallelSection:
    """How the world is laid out; data-parallel degree = world_size / (tp), experts carved out of it."""

    tp: int = 1
    ep: int = 1
    sequence_parallel: bool = False
    deepspeed_config: str | None = None  # a DeepSpeed json (configs/deepspeed/zero*.json); None = torch DDP
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    timeout_minutes: float = 10.0  # collective timeout: a dead rank stops the others after this long


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


@dataclass
class TrainSection:
    """The loop: batch sizes, steps, precision, evaluation and samples."""

    micro_batch_size: int = 8  # sequences per rank per forward
    global_batch_size: int = 8  # sequences per optimizer step over all data-parallel ranks
    max_steps: int = 1000
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    activation_checkpointing: bool = False
    eval_every: int = 0  # 0 = only at the end (when data.valid is set)
    eval_batches: int = 8
    sample_every: int = 0  # 0 = only at the end
    sample_prompts: list[str] = field(default_factory=lambda: ["The"])
    sample_tokens: int = 48
    max_nonfinite_steps: int = 5  # stop after this many non-finite losses in a row
    exit_interval: int = 0  # save and exit when the step is a multiple of this (job time limits); 0 = never


@dataclass
class CheckpointSection:
    """Where and how often to save; the run resumes from the latest good checkpoint in `dir`."""

    dir: str = "outputs/run"
    every: int = 500  # steps; 0 = only at the end
    keep_last: int = 3
    resume: bool = True


@dataclass
class LoggingSection:
    """metrics.jsonl always; wandb as configured; a progress bar on rank 0."""

    log_every: int = 10
    wandb_mode: str = "auto"  # auto (offline without an API key) | online | offline | disabled
    wandb_project: str = "llama-tp"
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)
    progress_bar: bool = True


@dataclass
class LoraSection:
    """LoRA adapters for sft.py (frozen base; checkpoints hold only the adapter)."""

    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class TrainConfig:
    """The whole training configuration."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    lora: LoraSection = field(default_factory=LoraSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (saved beside every checkpoint, logged to wandb)."""
        return dataclasses.asdict(self)

    # ---- derived values ----

    def dp_size(self, world_size: int) -> int:
        """Data-parallel degree: the world divided by the tensor-parallel degree."""
        return world_size // self.parallel.tp

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank."""
        return self.train.global_batch_size // (self.train.micro_batch_size * self.dp_size(world_size))

    def deepspeed_json(self) -> dict[str, Any] | None:
        """The DeepSpeed config file's contents, or None for the torch engine."""
        if not self.parallel.deepspeed_config:
            return None
        path = resolve_path(self.parallel.deepspeed_config)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"parallel.deepspeed_config: {path} does not exist (see configs/deepspeed/)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"parallel.deepspeed_config: {path} line {e.lineno}: invalid JSON ({e.msg})") from None

    def zero_stage(self) -> int:
        """ZeRO stage of the DeepSpeed config (0 without one)."""
        ds = self.deepspeed_json()
        return int((ds or {}).get("zero_optimization", {}).get("stage", 0))

    def model_overrides(self) -> dict[str, Any]:
        """Model config keys: the init_from checkpoint's or the preset's, then the overrides."""
        keys: dict[str, Any] = {}
        if self.model.init_from:
            from modeling.config import ConfigError as ModelConfigError
            from modeling.config import ModelConfig
            from modeling.convert import resolve_checkpoint_dir

            try:
                base = ModelConfig.load(resolve_checkpoint_dir(resolve_path(self.model.init_from)) / "config.json")
            except (ModelConfigError, OSError) as e:
                raise ConfigError(f"model.init_from={self.model.init_from}: {e}") from None
            keys.update(dataclasses.asdict(base))
        elif self.model.preset:
            path = CONFIG_DIR / "model" / f"{self.model.preset}.yaml"
            if not path.exists():
                known = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
                raise ConfigError(f"model.preset={self.model.preset!r}: no {path}; known presets: {known}")
            keys.update(yaml.safe_load(path.read_text()) or {})
        keys.update(self.model.overrides)
        from modeling.config import ModelConfig

        hints = get_type_hints(ModelConfig)
        # null means "not set": the default (vocab_size: the tokenizer's) applies
        return {k: _coerce(f"model.{k}", v, hints[k]) if k in hints else v for k, v in keys.items() if v is not None}

    # ---- validation ----

    def validate(self, world_size: int = 1) -> None:
        """Check the whole config against the world size before any work; raise ConfigError naming the key."""
        t, p, o, d = self.train, self.parallel, self.optim, self.data
        _positive(self, ["parallel.tp", "parallel.ep", "data.seq_len", "train.micro_batch_size"])
        _positive(self, ["train.global_batch_size", "train.max_steps", "train.eval_batches", "logging.log_every"])
        _positive(self, ["checkpoint.keep_last", "train.max_nonfinite_steps", "parallel.timeout_minutes"])
        _non_negative(self, ["train.eval_every", "train.sample_every", "checkpoint.every", "optim.warmup_steps"])
        _non_negative(self, ["train.exit_interval"])
        _non_negative(self, ["optim.lr", "optim.min_lr", "optim.weight_decay", "optim.grad_clip", "data.num_workers"])
        _choice("optim.decay", o.decay, ("cosine", "linear", "constant"))
        _choice("train.device", t.device, ("auto", "cpu", "cuda"))
        _choice("train.dtype", t.dtype, ("auto", "fp32", "bf16"))
        _choice("parallel.backend", p.backend, ("auto", "nccl", "gloo"))
        _choice("logging.wandb_mode", self.logging.wandb_mode, ("auto", "online", "offline", "disabled"))
        _choice("data.on_error", d.on_error, ("raise", "skip"))
        _choice("data.truncation", d.truncation, ("drop", "truncate"))
        if self.model.init_from and self.model.preset:
            raise ConfigError(
                f"model.preset={self.model.preset!r} and model.init_from are both set: the checkpoint's config.json "
                f"defines the architecture; remove model.preset"
            )
        if not self.model.init_from and not self.model.preset:
            raise ConfigError("model.preset is not set: choose one of tiny, 125m, 1b, 7b (or set model.init_from)")
        if self.lora.enabled:
            _positive(self, ["lora.r", "lora.alpha"])
            if not 0 <= self.lora.dropout < 1:
                raise ConfigError(f"lora.dropout={self.lora.dropout} must be in [0, 1)")
            allowed = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
            if not self.lora.targets or set(self.lora.targets) - allowed:
                raise ConfigError(f"lora.targets={self.lora.targets}; choose among {sorted(allowed)}")
        if o.min_lr > o.lr:
            raise ConfigError(f"optim.min_lr={o.min_lr} is above optim.lr={o.lr}; the floor must be <= the peak")
        if world_size % p.tp:
            raise ConfigError(
                f"parallel.tp={p.tp} does not divide the world size {world_size}: launch tp x dp processes "
                f"(torchrun --nproc_per_node {p.tp * max(1, world_size // p.tp)})"
            )
        dp = self.dp_size(world_size)
        if dp % p.ep:
            raise ConfigError(
                f"parallel.ep={p.ep} does not divide the data-parallel degree {dp} (world {world_size} / tp {p.tp})"
            )
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size "
                f"({t.micro_batch_size}) x data-parallel ranks ({dp}) = {per_step}"
            )
        if p.sequence_parallel and d.seq_len % p.tp:
            raise ConfigError(f"data.seq_len={d.seq_len} must divide by parallel.tp={p.tp} under sequence_parallel")
        if d.synthetic:
            if not self.model_overrides().get("vocab_size"):
                raise ConfigError(
                    "data.synthetic needs model.overrides.vocab_size (there is no tokenizer to take it from)"
                )
        else:
            if not d.train:
                raise ConfigError("data.train is empty: give a glob of jsonl.zst shards (python -m data.shard ...)")
            if not d.tokenizer:
                raise ConfigError(
                    "data.tokenizer is empty: give a tokenizer directory (python -m dataset.train_tokenizer)"
                )
            for i, src in enumerate(self.data_sources()):
                if src.weight <= 0:
                    raise ConfigError(f"data.train[{i}].weight={src.weight} must be positive")
        if p.deepspeed_config:
            self.deepspeed_json()
            stage = self.zero_stage()
            if stage not in (0, 1, 2, 3):
                raise ConfigError(f"{p.deepspeed_config}: zero_optimization.stage={stage}; must be 0, 1, 2 or 3")
            if stage == 3 and p.ep > 1:
                raise ConfigError(
                    f"parallel.ep={p.ep} with {p.deepspeed_config} (ZeRO stage 3): expert parallelism runs under "
                    f"ZeRO 1 or 2 (configs/deepspeed/zero1.json, zero2.json) or the torch engine"
                )
        self._validate_model(world_size)

    def _validate_model(self, world_size: int) -> None:
        from modeling.config import ConfigError as ModelConfigError
        from modeling.config import ModelConfig

        keys = self.model_overrides()
        known = {f.name for f in fields(ModelConfig)}
        for k in keys:
            if k not in known:
                raise ConfigError(f"model.overrides.{k}: unknown model key; known keys: {sorted(known)}")
        keys.setdefault("vocab_size", 64 * self.parallel.tp)  # the tokenizer's size is checked when it is loaded
        try:
            ModelConfig(**keys).validate_parallel(self.parallel.tp, self.parallel.ep)
        except (ModelConfigError, ValueError) as e:
            raise ConfigError(str(e)) from None
        if self.data.seq_len > keys.get("max_position_embeddings", 2048):
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model max_position_embeddings="
                f"{keys.get('max_position_embeddings', 2048)}; raise model.overrides.max_position_embeddings"
            )

    def data_sources(self) -> list[DataSource]:
        """data.train as a list of weighted sources."""
        items = self.data.train if isinstance(self.data.train, list) else [self.data.train]
        if items and all(isinstance(i, str) for i in items):
            return [DataSource(path=list(items))]
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise ConfigError(f"data.train[{i}]: mix globs and {{path, weight, name}} entries is not allowed")
            unknown = set(item) - {"path", "weight", "name"}
            if unknown:
                raise ConfigError(f"data.train[{i}]: unknown keys {sorted(unknown)}; allowed: path, weight, name")
            out.append(DataSource(**item))
        return out


def resolve_path(path: str) -> Path:
    """A path as given, or relative to the repository root when it does not exist from here."""
    p = Path(path)
    return p if p.exists() or p.is_absolute() else CONFIG_DIR.parent / p


def _get(cfg: TrainConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _positive(cfg: TrainConfig, keys: list[str]) -> None:
    for key in keys:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be positive")


def _non_negative(cfg: TrainConfig, keys: list[str]) -> None:
    for key in keys:
        v = _get(cfg, key)
        if not (v >= 0 and math.isfinite(v)):
            raise ConfigError(f"{key}={v!r} must be >= 0")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}; choose one of {', '.join(allowed)}")


# ---- loading ----


def _coerce(key: str, value: Any, typ: Any) -> Any:
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
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else value
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


def from_dict(d: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a TrainConfig from nested dicts; unknown sections or keys are errors naming them."""
    cfg = TrainConfig()
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    sections = {f.name: f for f in fields(TrainConfig)}
    for name, values in d.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown section {name!r}; sections are {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping")
        section = getattr(cfg, name)
        hints = get_type_hints(type(section))
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"{source}: unknown key {name}.{key}; keys of {name}: {', '.join(hints)}")
            setattr(section, key, _coerce(f"{name}.{key}", value, hints[key]))
    return cfg


def apply_override(d: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` (value parsed as yaml) to nested dicts; `model.X=` goes to model overrides."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected section.key=value (for example parallel.tp=2)")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {assignment!r}: value is not valid yaml ({e})") from None
    model_keys = {f.name for f in fields(ModelSection)}
    if parts[0] == "model" and len(parts) == 2 and parts[1] not in model_keys:
        parts = ["model", "overrides", parts[1]]  # model.hidden_size=256 is shorthand for model.overrides.hidden_size
    if len(parts) < 2:
        raise ConfigError(f"override {assignment!r}: expected section.key=value (for example parallel.tp=2)")
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {p} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a yaml config (or the defaults when `path` is None) and apply dotted overrides."""
    d: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file (see configs/*.yaml)") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: invalid yaml ({getattr(e, 'problem', e)})") from None
    for o in overrides:
        apply_override(d, o)
    return from_dict(d, source=str(path or "config"))
