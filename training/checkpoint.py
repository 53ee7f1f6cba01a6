"""Atomic training checkpoints: write into a temporary directory, rename it, then move the `latest` pointer.

    <dir>/step-00000010/
        config.json, model-tpNN-of-NN.safetensors   the model in the native format (modeling.native_format:
        experts-epNN-of-NN.safetensors              mixture-of-experts models also write their expert shards)
        rank-00000.pt ...                           per rank: optimizer partition, scheduler, data-loader state, RNG
        train_config.yaml                           the resolved training config
        trainer_state.json                          step, tokens seen, layout; written last: its presence = complete
    <dir>/latest                                    the name of the newest complete step directory

`python -m training.checkpoint DIR` describes a step directory, or a run's checkpoints and the one a resume reads:
step, tokens seen, the layout that wrote it, the sizes, and whether it is complete.

A crash at any point leaves the previous checkpoint and `latest` intact. Loading never unpickles arbitrary
objects: tensors come from safetensors, the .pt files are read with `torch.load(weights_only=True)` (DeepSpeed's
loss-scaler class is allow-listed by name when DeepSpeed is in use).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from modeling.config import CheckpointError, ModelConfig
from modeling.convert import copy_tokenizer, load_checkpoint
from modeling.native_format import EXPERT_SHARDS, MODEL_SHARDS, expected_tensors, split_for_rank
from parallel.engine import Engine
from parallel.state import ParallelState

STATE_FILE = "trainer_state.json"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint taken after `step` optimizer steps."""
    return f"step-{step:08d}"


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, as tensors and plain Python."""
    state = {"torch": torch.get_rng_state(), "python": repr(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() returned."""
    import ast

    torch.set_rng_state(state["torch"])
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    write_weights: Callable[[Path], None],
    engine: Engine,
    state: ParallelState,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    config_dict: dict[str, Any],
    keep_last: int,
    tokenizer_dir: str | None = None,
) -> Path:
    """Collectively write the checkpoint of `step` (every rank calls this) and prune to the last `keep_last`."""
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
        torch.save({**engine.optimizer_state(), **rank_state, "rng": rng_state()}, tmp / f"rank-{state.rank:05d}.pt")
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
    (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step, "layout": layout(state)}, indent=2))
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
    """The world layout a checkpoint records (and a resume must match)."""
    d = state.dims
    return {"world_size": d.world_size, "tp": d.tp, "ep": d.ep, "pp": d.pp, "cp": d.cp}


def check_layout(ckpt: Path, meta: dict[str, Any], state: ParallelState, pipeline: list | None) -> None:
    """Raise CheckpointError naming both layouts unless `ckpt` was written at this state's layout and stages.

    `meta` is its trainer_state.json; the rank files hold the optimizer state of one layout's shards.
    """
    saved = {**meta.get("layout", {}), "pipeline": meta.get("pipeline")}
    here = {**layout(state), "pipeline": pipeline}
    if any(saved.get(k, here[k]) != v for k, v in here.items()):
        raise CheckpointError(
            f"{ckpt} was written at the layout {saved}, this run's is {here}: a checkpoint resumes at the world "
            f"size and parallel.tp, ep, pp, cp, pp_schedule, pp_stages_per_rank and pp_layers that wrote it. Rerun "
            f"with those, or start a new run from its weights with model.init_from={ckpt}"
        )


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


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint."""
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{ckpt / STATE_FILE}: unreadable ({e}); delete {ckpt} to resume from an older one"
        ) from None


def load_model_weights(model: torch.nn.Module, ckpt: Path, state: ParallelState) -> None:
    """Load this rank's tensor and expert shard of a native or HF checkpoint, whatever tp/ep it was written at."""
    config, full = load_checkpoint(ckpt)  # validated against its own config.json
    expected = {k: tuple(v) for k, v in expected_full_shapes(model.config).items()}
    got = {k: tuple(v.shape) for k, v in full.items()}
    if expected != got:
        diff = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
        raise CheckpointError(
            f"{ckpt}: its architecture differs from the configured model at {diff[:6]} "
            f"(checkpoint {[got.get(k) for k in diff[:6]]}, model {[expected.get(k) for k in diff[:6]]}); "
            f"make model.* match the checkpoint's config.json"
        )
    ranks = {"ep_rank": state.ep_rank, "ep_size": state.ep_size}
    shard = split_for_rank(full, model.config, state.tp_rank, state.tp_size, **ranks)
    model.load_state_dict(shard, strict=False)


def expected_full_shapes(config: Any) -> dict[str, torch.Size]:
    """Full (unsharded) shapes of the model's tensors."""
    return {name: torch.Size(shape) for name, (shape, _) in expected_tensors(config).items()}


def load_rank_state(ckpt: Path, state: ParallelState) -> dict[str, Any]:
    """This rank's optimizer/scheduler/data/RNG state; the same world layout is required to resume."""
    path = ckpt / f"rank-{state.rank:05d}.pt"
    if not path.exists():
        raise CheckpointError(
            f"{path}: missing. The checkpoint was written by another world layout "
            f"({read_trainer_state(ckpt)['layout']}); resume with that layout, or start a new run from its "
            f"weights with model.init_from={ckpt}"
        )
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def _deepspeed_safe_globals() -> list[Any]:
    """DeepSpeed's ZeRO optimizer state holds a few of its own plain classes; allow exactly those."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, ZeroStageEnum, fragment_address]


# ---- the inspector: python -m training.checkpoint DIR ----


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _files_size(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def inspect(ckpt: Path) -> tuple[list[str], bool]:
    """Lines describing one step directory (step, tokens, layout, sizes) and whether it is complete.

    Complete: trainer_state.json (written last) is there, the model shards form one set, and every rank of the
    layout wrote its rank file.
    """
    problems, lines = [], []
    try:
        meta = read_trainer_state(ckpt)
    except CheckpointError:
        meta = None
        problems.append(f"no readable {STATE_FILE} (the write did not finish)")
    model_files, expert_files = MODEL_SHARDS.files(ckpt), EXPERT_SHARDS.files(ckpt)
    rank_files = sorted(ckpt.glob("rank-*.pt"))
    try:
        MODEL_SHARDS.complete_set(ckpt)
    except CheckpointError as e:
        problems.append(str(e))
    if meta is not None:
        saved_layout = meta.get("layout", {})
        lines.append(
            f"  step {meta['step']}, tokens seen {meta.get('tokens_seen', 0):,}, non-finite steps "
            f"{meta.get('nonfinite_steps', 0)}"
        )
        described = ", ".join(f"{k} {v}" for k, v in saved_layout.items())
        if meta.get("pipeline"):
            described += f", pipeline stages [rank, first layer, layers] {meta['pipeline']}"
        lines.append(f"  layout: {described}")
        world = saved_layout.get("world_size")
        if world is not None and len(rank_files) != world:
            problems.append(f"{len(rank_files)} rank files for a world of {world}")
    if (ckpt / "config.json").is_file():
        params = ModelConfig.load(ckpt / "config.json").num_params()
        lines.append(f"  model: {params / 1e6:.1f}M parameters")
    lines.append(
        f"  files: {len(model_files)} model shard(s) {_mb(_files_size(model_files))}, {len(expert_files)} expert "
        f"shard(s) {_mb(_files_size(expert_files))}, {len(rank_files)} rank file(s) {_mb(_files_size(rank_files))}; "
        f"total {_mb(_files_size([f for f in ckpt.iterdir() if f.is_file()]))}"
    )
    status = "complete" if not problems else "INCOMPLETE: " + "; ".join(problems)
    return [f"{ckpt}: {status}", *lines], not problems


def main(argv: list[str] | None = None) -> None:
    """Describe a checkpoint directory, or every checkpoint of a run directory.

    Exit code 1 when the one given, or the one a resume would read, is incomplete; 2 when there is none.
    """
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("dir", help="a step-NNNNNNNN directory, or a run's checkpoint.dir")
    path = Path(parser.parse_args(argv).dir)
    if not path.is_dir():
        print(f"error: {path} is not a directory", file=sys.stderr)
        raise SystemExit(2)
    if (path / STATE_FILE).exists() or path.name.startswith("step-"):
        lines, ok = inspect(path)
        print("\n".join(lines))
        raise SystemExit(0 if ok else 1)
    steps = sorted(p for p in path.glob("step-*") if p.is_dir())
    if not steps:
        print(f"error: {path}: no step-NNNNNNNN directories (is it a checkpoint.dir?)", file=sys.stderr)
        raise SystemExit(2)
    latest = latest_checkpoint(path)
    print(f"{path}: {len(steps)} step directories; a resume reads {latest.name if latest else 'none (start afresh)'}")
    for step in steps:
        print(f"  {step.name}: {'complete' if (step / STATE_FILE).exists() else 'incomplete'}")
    if latest is not None:
        lines, ok = inspect(latest)
        print("\n".join(lines))
        raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
