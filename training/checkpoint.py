"""Atomic training checkpoints that resume at any layout: write into a temporary directory, rename it, move `latest`.

    <dir>/step-00000010/
        config.json, model-tpNN-of-NN.safetensors   the model in the native format (modeling.native_format:
        experts-epNN-of-NN.safetensors              mixture-of-experts models also write their expert shards)
        optimizer-tpNN-of-NN.safetensors            per parameter: Adam's moments, its step and (DeepSpeed) the fp32
        optimizer-experts-epNN-of-NN.safetensors    master weight, split like the parameter itself
        data-dpNNNNN.json                           the data stream's position (dataset.loader: per stream, merged
                                                    over the data-parallel ranks on load)
        rank-NNNNN.pt                               per rank: its RNG state
        train_config.yaml                           the resolved training config
        trainer_state.json                          step, tokens seen, LR schedule, layout; written last: its
                                                    presence = complete
    <dir>/latest                                    the name of the newest complete step directory

Nothing in a checkpoint depends on the layout that wrote it: the model and optimizer files record the dimension each
tensor is split along and are re-cut for any tp, pp, ep, cp, dp and ZeRO stage (each rank reads only its slices),
the data state is per stream of the global batch, not per rank. `load_training_state` says what changed.

`python -m training.checkpoint DIR` describes a step directory, or a run's checkpoints and the one a resume reads:
step, tokens seen, the layout that wrote it, the sizes, and whether it is complete.

A crash at any point leaves the previous checkpoint and `latest` intact. Loading never unpickles arbitrary
objects: tensors come from safetensors, the .pt files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import yaml

from dataset.loader import merge_states
from modeling.config import CheckpointError, ModelConfig, resolve_checkpoint_dir
from modeling.convert import copy_tokenizer, load_checkpoint
from modeling.native_format import (
    MODEL_SHARDS,
    OPTIMIZER_EXPERT_SHARDS,
    OPTIMIZER_SHARDS,
    TIED_SOURCE,
    ShardReader,
    check_shapes,
    expected_tensors,
    is_native,
    read_rank_state_dict,
    split_for_rank,
    write_shards,
)
from parallel.engine import Engine
from parallel.state import ParallelState
from training.optim import load_schedule_state

if TYPE_CHECKING:
    from configs.sections import CheckpointSection

STATE_FILE = "trainer_state.json"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint taken after `step` optimizer steps."""
    return f"step-{step:08d}"


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, as tensors and plain Python.

    The CUDA generator's (of the current device) only where this process uses CUDA: asking a GPU host's CUDA
    otherwise (a run with train.device=cpu) would create a context on GPU 0 from every rank.
    """
    state = {"torch": torch.get_rng_state(), "python": repr(random.getstate())}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() returned (the CUDA generator's where this process uses CUDA)."""
    import ast

    torch.set_rng_state(state["torch"])
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    write_weights: Callable[[Path], None],
    engine: Engine,
    state: ParallelState,
    trainer_state: dict[str, Any],
    data_state: dict[str, Any],
    config_dict: dict[str, Any],
    keep_last: int,
    tokenizer_dir: str | None = None,
) -> Path:
    """Collectively write the checkpoint of `step` (every rank calls this) and prune to the last `keep_last`.

    `data_state` is this rank's loader.state_dict(): its streams' positions (the first rank of each data-parallel
    replica writes it; the replicas of one model hold the same).
    """
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    if state.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash during an earlier save
        tmp.mkdir()
    _barrier()
    try:
        write_weights(tmp)  # e.g. the native model shards: dp_rank 0 of each tensor rank writes its own
        save_optimizer(engine, tmp, state)
        if state.tp_rank == 0 and state.cp_rank == 0 and state.pp_rank == 0:
            (tmp / f"data-dp{state.dp_rank:05d}.json").write_text(json.dumps(data_state))
        torch.save({"rng": rng_state()}, tmp / f"rank-{state.rank:05d}.pt")
    except OSError as e:  # a full or failing disk: say so in one line (exit 2), not a traceback
        raise _write_error(root, final, state.rank, e) from e
    _barrier()
    if state.rank == 0:
        try:
            _publish(root, tmp, final, step, state, trainer_state, config_dict, keep_last, tokenizer_dir)
        except OSError as e:
            raise _write_error(root, final, state.rank, e) from e
    _barrier()
    return final


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (a full disk, say); the message names the step, the rank and what is intact.

    Also an OSError, so that code catching the write error still does; the CLI ends the run with the message and
    exit code 2, as for any CheckpointError.
    """


def _write_error(root: Path, final: Path, rank: int, e: OSError) -> CheckpointWriteError:
    previous = latest_checkpoint(root)
    kept = f"the last complete checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    return CheckpointWriteError(
        f"rank {rank}: writing checkpoint {final} failed ({e}); {kept} and `latest` was not moved. Free space in "
        f"{root} (or lower checkpoint.keep_last) and rerun the same command to resume"
    )


def _publish(
    root: Path,
    tmp: Path,
    final: Path,
    step: int,
    state: ParallelState,
    trainer_state: dict[str, Any],
    config_dict: dict[str, Any],
    keep_last: int,
    tokenizer_dir: str | None,
) -> None:
    """Rank 0: complete the temporary directory, rename it to its final name, move `latest`, prune old ones."""
    (tmp / "train_config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
    if tokenizer_dir:  # so that generate.py and the HF export find it beside the weights
        copy_tokenizer(Path(tokenizer_dir), tmp)
    meta = {"layout": layout(state), **trainer_state, "step": step}  # the trainer's layout adds the batch split
    (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2))
    _fsync_dir(tmp)
    if final.exists():  # a rerun that reaches the same step again replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / "latest")
    _fsync_dir(root)
    # keep the most recently written ones: after --no-resume, an older run's higher steps go first
    by_age = sorted(complete_checkpoints(root), key=lambda p: (p / STATE_FILE).stat().st_mtime_ns)
    for old in by_age[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def layout(state: ParallelState) -> dict[str, int]:
    """The world layout that wrote a checkpoint (informative: a checkpoint resumes at any layout)."""
    d = state.dims
    return {"world_size": d.world_size, "tp": d.tp, "ep": d.ep, "pp": d.pp, "cp": d.cp, "dp": d.dp}


def describe_change(saved: dict[str, Any], here: dict[str, Any]) -> str | None:
    """'tp 1 -> 2, dp 2 -> 1, zero_stage 2 -> 0' for the keys that differ between two layouts (None if none)."""
    changed = [f"{k} {saved[k]} -> {v}" for k, v in here.items() if k in saved and saved[k] != v]
    return ", ".join(changed) or None


def saved_vocab_size(ckpt: Path) -> int | None:
    """The vocabulary size of a checkpoint's model (None where it holds no config.json: a LoRA adapter's)."""
    path = ckpt / "config.json"
    return ModelConfig.load(path).vocab_size if path.is_file() else None


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir() if path.is_dir() else []:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete step directories under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE_FILE).exists()]
    return sorted(dirs, key=lambda p: p.name)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `latest` points at if it is complete, else the newest complete one, else None."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.exists():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_FILE).exists():
            return candidate
    done = complete_checkpoints(root)
    return done[-1] if done else None


def resume_hint(ckpt: CheckpointSection, resume: bool = True) -> str:
    """What a rerun of a run stopped by an error starts from, for its message (`resume` false under --no-resume).

    The newest complete checkpoint in the checkpoint section's `dir`, this run's or an earlier run's (a run with
    checkpoint.save=false writes none but resumes all the same), or step 0.
    """
    last = latest_checkpoint(ckpt.dir)
    if not (resume and ckpt.resume):
        hint = "a rerun of the same command starts again from step 0 (--no-resume or checkpoint.resume=false)"
        return hint + (f"; without that it resumes from {last}" if last else "")
    if last is not None:
        unsaved = " (this run saves none: checkpoint.save=false)" if not ckpt.save else ""
        return f"the last checkpoint {last} is intact and a rerun resumes from it{unsaved}"
    unsaved = "" if ckpt.save else " (checkpoint.save=false)"
    return f"no checkpoint was written{unsaved}: a rerun starts from step 0"


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint."""
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{ckpt / STATE_FILE}: unreadable ({e}); delete {ckpt} to resume from an older one"
        ) from None


def load_model_weights(model: torch.nn.Module, ckpt: Path, state: ParallelState) -> None:
    """Load this rank's tensor and expert shard of a native or HF checkpoint, whatever tp/ep it was written at.

    A native checkpoint is checked from its files' headers and this rank reads only its slices of them
    (modeling.native_format.read_rank_state_dict); a Hugging Face directory is read whole, then split.
    """
    path = resolve_checkpoint_dir(ckpt)
    if is_native(path):
        reader = ShardReader(path)
        shapes = reader.shapes()
        check_shapes(shapes, ModelConfig.load(path / "config.json"), str(path))  # against its own config.json
        _check_architecture(ckpt, model.config, shapes)
        shard = read_rank_state_dict(path, model, reader=reader)
    else:
        _, full = load_checkpoint(path)  # validated against its own config.json
        _check_architecture(ckpt, model.config, {k: tuple(v.shape) for k, v in full.items()})
        ranks = {"ep_rank": state.ep_rank, "ep_size": state.ep_size}
        shard = split_for_rank(full, model.config, state.tp_rank, state.tp_size, **ranks)
    model.load_state_dict(shard, strict=False)  # a tied head is the embedding: absent from `shard`


def _check_architecture(ckpt: Path, config: ModelConfig, got: dict[str, tuple[int, ...]]) -> None:
    """Raise CheckpointError naming the tensors whose full shapes in `ckpt` differ from the configured model's."""
    expected = {k: tuple(v) for k, v in expected_full_shapes(config).items()}
    got = {k: tuple(v) for k, v in got.items()}
    if expected != got:
        diff = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
        raise CheckpointError(
            f"{ckpt}: its architecture differs from the configured model at {diff[:6]} "
            f"(checkpoint {[got.get(k) for k in diff[:6]]}, model {[expected.get(k) for k in diff[:6]]}); "
            f"make model.* match the checkpoint's config.json"
        )


def expected_full_shapes(config: Any) -> dict[str, torch.Size]:
    """Full (unsharded) shapes of the model's tensors."""
    return {name: torch.Size(shape) for name, (shape, _) in expected_tensors(config).items()}


OPTIMIZER_KEYS = ("exp_avg", "exp_avg_sq", "master", "step")


def save_optimizer(engine: Engine, directory: Path, state: ParallelState) -> None:
    """Write the engine's optimizer state per parameter, split like the parameter (collective).

    Keys are `<parameter>.<exp_avg | exp_avg_sq | master | step>`; a dense parameter's step is one replicated number,
    an expert tensor's one per expert (so that any expert degree reads its own).
    """
    params = dict(engine.module.named_parameters())
    coords = state.dims.coords(state.rank)

    def writes(name: str) -> bool:  # the ranks write_shards writes from (the others hold no host copy)
        if getattr(params[name], "expert_parallel", False):
            return coords["edp"] == 0 and state.tp_rank == 0 and state.cp_rank == 0
        return state.dp_rank == 0 and state.cp_rank == 0

    tensors, like = {}, {}
    for name, entries in engine.optimizer_tensors(keep=writes).items():  # collective under DeepSpeed
        param = params[name]
        for key, tensor in entries.items():
            ref = param
            if key == "step":
                if getattr(param, "expert_parallel", False):  # (E_local,): stacked like the experts
                    experts = getattr(param, "ds_shape", param.shape)[0]  # ZeRO-3 keeps the shape aside
                    tensor = tensor.reshape(1).expand(experts).contiguous()
                else:
                    ref = tensor  # no split attributes: replicated
            tensors[f"{name}.{key}"], like[f"{name}.{key}"] = tensor, ref
    write_shards(tensors, like, directory, state, model_set=OPTIMIZER_SHARDS, expert_set=OPTIMIZER_EXPERT_SHARDS)


def load_optimizer(engine: Engine, ckpt: Path, state: ParallelState) -> None:
    """Give the engine this rank's slice of every parameter's optimizer state, whatever layout wrote it."""
    reader = ShardReader(ckpt, model_set=OPTIMIZER_SHARDS, expert_set=OPTIMIZER_EXPERT_SHARDS)
    keys = reader.keys()
    # the torch engine's weights are its fp32 masters: DeepSpeed takes them from the model files, unrounded
    weights = ShardReader(ckpt) if engine.zero_stage > 0 and MODEL_SHARDS.files(ckpt) else None
    weight_keys = weights.keys() if weights is not None else set()
    params = dict(engine.module.named_parameters())
    ranks = {"tp_rank": state.tp_rank, "tp_size": state.tp_size, "ep_rank": state.ep_rank, "ep_size": state.ep_size}

    def get(name: str) -> dict[str, torch.Tensor] | None:
        # a tied head's copy on the last pipeline stage steps exactly like the embedding, whose state is saved
        source = TIED_SOURCE if getattr(params[name], "pipeline_tied", None) == "copy" else name
        out = {k: reader.read(f"{source}.{k}", **ranks) for k in OPTIMIZER_KEYS if f"{source}.{k}" in keys}
        if "step" in out:
            out["step"] = out["step"].max()  # one count (an expert tensor's per-expert counts are equal)
        if out and "master" not in out and source in weight_keys:
            out["master"] = weights.read(source, **ranks).float()
        return out or None

    engine.load_optimizer_tensors(get)


def resume(
    ckpt: Path,
    config: dict[str, Any],
    layout: dict[str, Any],
    *,
    engine: Engine,
    loader: Any,
    state: ParallelState,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Continue from a checkpoint written at any layout; return its trainer_state.json.

    Refuses what cannot continue (the data state's fingerprint: another seq_len, tokenizer, data or seed), restores
    the training state, and says what changed: `layout` is this run's (the trainer's: `layout()` plus the ZeRO stage
    and the batch split).
    """
    meta = read_trainer_state(ckpt)
    change = describe_change(meta.get("layout", {}), layout)
    warnings = load_training_state(ckpt, meta, engine=engine, loader=loader, state=state, same_layout=change is None)
    say(f"resumed from {ckpt} at step {meta['step']}")
    if change is not None:
        say(
            f"resuming at another layout ({change}): the model and optimizer state were re-split for it; the "
            f"global batches continue where they stopped"
        )
    batch, saved_batch = layout["global_batch_size"], meta.get("layout", {}).get("global_batch_size")
    if saved_batch not in (None, batch):
        warnings.append(
            f"the learning-rate schedule continues by step (step {meta['step'] + 1} of train.max_steps="
            f"{config['train']['max_steps']}), each step now taking {batch} sequences instead of {saved_batch}"
        )
    for warning in warnings:
        say(f"warning: {warning}")
    return meta


def load_training_state(
    ckpt: Path, meta: dict[str, Any], *, engine: Engine, loader: Any, state: ParallelState, same_layout: bool
) -> list[str]:
    """Restore the optimizer, LR schedule, data position and RNG of a checkpoint; return the loader's warnings.

    The model's weights were loaded when it was built (`load_model_weights`). At the layout that wrote it every
    rank takes its own RNG state back; at another, rank 0's (the ranks draw alike: one seed, the same draws).
    """
    if "schedule" not in meta or not OPTIMIZER_SHARDS.files(ckpt):
        raise CheckpointError(
            f"{ckpt}: written by an older version of this project (per-rank optimizer files, no "
            f"{OPTIMIZER_SHARDS.pattern}), whose state resumes only with that version. Start a new run from its "
            f"weights with model.init_from={ckpt}"
        )
    parts = [json.loads(p.read_text()) for p in sorted(ckpt.glob("data-dp*.json"))]
    if not parts:
        raise CheckpointError(f"{ckpt}: no data-dpNNNNN.json (the data stream's position); the checkpoint is damaged")
    try:
        warnings = loader.load_state_dict(merge_states(parts)) or []  # first: it refuses another tokenizer or data
        load_optimizer(engine, ckpt, state)
        load_schedule_state(engine.scheduler, meta["schedule"])
    except ValueError as e:  # a changed tokenizer, data or seed; a damaged file: one line naming it (exit 2)
        raise CheckpointError(f"cannot resume from {ckpt}: {e}") from None
    rng = ckpt / f"rank-{state.rank:05d}.pt"
    if not (same_layout and rng.exists()):
        rng = ckpt / "rank-00000.pt"
    set_rng_state(torch.load(rng, map_location="cpu", weights_only=True)["rng"])
    return list(warnings)


if __name__ == "__main__":  # the inspector: python -m training.checkpoint DIR (training/inspect_checkpoint.py)
    from training.inspect_checkpoint import main

    main()
