"""The training configuration: the sections together, the rules that join them, and the yaml loader.

    cfg = load_config("configs/pretrain_tiny.yaml", ["parallel.tp=2", "optim.lr=1e-3"])
    cfg.validate(world_size=4)          # every check before any work; errors name the key

Sections (configs/sections.py): `model`, `data`, `parallel`, `optim`, `train`, `checkpoint`, `logging`, `lora`, `dpo`;
each checks its own values. Unknown keys are errors. The `model` section names a preset (`configs/model/<preset>.yaml`,
Hugging Face config.json keys) or a checkpoint and may override any of its keys (configs/architecture.py resolves it);
`vocab_size: null` takes the tokenizer's vocabulary, padded to a multiple of 64 x tp.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from configs.architecture import resolve_model_config
from configs.sections import (
    CheckpointSection,
    ConfigError,
    DataSection,
    DPOSection,
    LoggingSection,
    LoraSection,
    ModelSection,
    OptimSection,
    ParallelSection,
    TrainSection,
    coerce,
    resolve_path,
)
from dataset.sources import DataSource
from parallel.state import ParallelConfigError, ParallelDims


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
    dpo: DPOSection = field(default_factory=DPOSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (saved beside every checkpoint, logged to wandb)."""
        return dataclasses.asdict(self)

    # ---- derived values ----

    def parallel_dims(self, world_size: int) -> ParallelDims:
        """The rank layout of `world_size` processes under parallel.*; one that cannot work is a ConfigError."""
        try:
            p = self.parallel
            return ParallelDims(world_size=world_size, tp=p.tp, ep=p.ep, pp=p.pp, cp=p.cp)
        except ParallelConfigError as e:
            raise ConfigError(str(e)) from None

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank."""
        return self.train.global_batch_size // (self.train.micro_batch_size * self.parallel_dims(world_size).dp)

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
        """ZeRO stage of the DeepSpeed config (0 without one); one that is not 0, 1, 2 or 3 is a ConfigError."""
        ds = self.deepspeed_json()
        if ds is None:
            return 0
        where = f"parallel.deepspeed_config: {resolve_path(self.parallel.deepspeed_config)}"
        zero = ds.get("zero_optimization", {}) if isinstance(ds, dict) else None
        if not isinstance(zero, dict):
            raise ConfigError(
                f"{where}: the top level and zero_optimization must be JSON objects (see configs/deepspeed/)"
            )
        stage = zero.get("stage", 0)
        if type(stage) is not int or stage not in (0, 1, 2, 3):  # "two", "2", 2.5, true: refused here, by key
            raise ConfigError(
                f"{where}: zero_optimization.stage={json.dumps(stage)}; set it to the integer 0, 1, 2 or 3 "
                f"(configs/deepspeed/zero1.json, zero2.json, zero3.json)"
            )
        return stage

    # ---- validation ----

    def validate(self, world_size: int = 1) -> None:
        """Check the whole config against the world size before any work; raise ConfigError naming the key."""
        for section in fields(self):
            getattr(self, section.name).validate()
        t, p, d = self.train, self.parallel, self.data
        dp = self.parallel_dims(world_size).dp
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size "
                f"({t.micro_batch_size}) x data-parallel ranks ({dp}) = {per_step}"
            )
        if t.exit_interval and not self.checkpoint.save:
            raise ConfigError(
                f"train.exit_interval={t.exit_interval} saves a checkpoint and exits, and checkpoint.save=false writes "
                f"none: set checkpoint.save=true, or train.exit_interval=0 (a run that ends at train.max_steps)"
            )
        if p.sequence_parallel and d.seq_len % p.tp:
            raise ConfigError(f"data.seq_len={d.seq_len} must divide by parallel.tp={p.tp} under sequence_parallel")
        if p.cp > 1:
            if d.seq_len % (2 * p.cp):
                raise ConfigError(
                    f"data.seq_len={d.seq_len} must divide by 2 x parallel.cp={2 * p.cp}: each of the cp ranks holds "
                    f"two of 2 x cp equal chunks of every sequence (one early, one late: the causal work is balanced)"
                )
            if p.sequence_parallel and (d.seq_len // p.cp) % p.tp:
                raise ConfigError(
                    f"data.seq_len={d.seq_len} / parallel.cp={p.cp} must divide by parallel.tp={p.tp} under "
                    f"sequence_parallel (each context chunk is split again over the tensor group)"
                )

        if not d.synthetic:
            self.data_sources()  # each source's keys and weight
        if p.deepspeed_config:
            stage = self.zero_stage()  # the file, its JSON and its stage
            if stage == 3 and p.ep > 1:
                raise ConfigError(
                    f"parallel.ep={p.ep} with {p.deepspeed_config} (ZeRO stage 3): expert parallelism runs under "
                    f"ZeRO 1 or 2 (configs/deepspeed/zero1.json, zero2.json) or the torch engine"
                )
            if stage == 3 and self.train.compile:
                raise ConfigError(
                    f"train.compile=true with {p.deepspeed_config} (ZeRO stage 3): ZeRO-3 gathers each weight when "
                    f"its module runs or its attribute is read, which a compiled layer does inside the graph, where "
                    f"no gather happens; compile under ZeRO 1 or 2 (configs/deepspeed/zero2.json) or set "
                    f"train.compile=false"
                )
            overlap = self.deepspeed_json().get("zero_optimization", {}).get("overlap_comm", False)
            if stage == 1 and p.pp > 1 and overlap:
                raise ConfigError(
                    f"parallel.pp={p.pp} with {p.deepspeed_config}: zero_optimization.overlap_comm=true overlaps a "
                    f"reduction that the pipeline runs at the step's end (DeepSpeed allows it only under ZeRO-2); "
                    f"set it to false"
                )
            if stage > 1 and p.pp > 1:
                raise ConfigError(
                    f"parallel.pp={p.pp} with {p.deepspeed_config} (ZeRO stage {stage}): pipeline stages "
                    f"accumulate gradients over micro-batches, which ZeRO-2/3 partition as they arrive (DeepSpeed "
                    f"refuses it too); use configs/deepspeed/zero1.json or the torch engine"
                )
        resolve_model_config(self, None, grad_accum=self.grad_accum_steps(world_size))  # against parallel.*

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
            weight = item.get("weight", 1.0)
            if not weight > 0:
                raise ConfigError(f"data.train[{i}].weight={weight} must be positive")
            out.append(DataSource(item.get("path", ""), weight, item.get("name") or ""))
        return out


# ---- loading ----


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
            setattr(section, key, coerce(f"{name}.{key}", value, hints[key]))
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
