"""The checkpoint inspector, `python -m training.checkpoint DIR` (or `python -m training.inspect_checkpoint DIR`).

For a step directory, or a run's checkpoint.dir and the step a resume reads: the step, tokens seen, the layout that
wrote it, the model's size, the files and their sizes, and whether it is complete (exit code 1 if not, 2 if there
is no checkpoint).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modeling.config import CheckpointError, ModelConfig
from modeling.native_format import EXPERT_SHARDS, MODEL_SHARDS, OPTIMIZER_EXPERT_SHARDS, OPTIMIZER_SHARDS
from training.checkpoint import STATE_FILE, latest_checkpoint, read_trainer_state


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
    optimizer_files = OPTIMIZER_SHARDS.files(ckpt) + OPTIMIZER_EXPERT_SHARDS.files(ckpt)
    rank_files, data_files = sorted(ckpt.glob("rank-*.pt")), sorted(ckpt.glob("data-dp*.json"))
    for shards in (MODEL_SHARDS, OPTIMIZER_SHARDS):
        try:
            shards.complete_set(ckpt)
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
        world, dp = saved_layout.get("world_size"), saved_layout.get("dp")
        if world is not None and len(rank_files) != world:
            problems.append(f"{len(rank_files)} rank files for a world of {world}")
        if dp is not None and len(data_files) != dp:
            problems.append(f"{len(data_files)} data-dp*.json files for {dp} data-parallel ranks")
    if (ckpt / "config.json").is_file():
        params = ModelConfig.load(ckpt / "config.json").num_params()
        lines.append(f"  model: {params / 1e6:.1f}M parameters")
    lines.append(
        f"  files: {len(model_files)} model shard(s) {_mb(_files_size(model_files))}, {len(expert_files)} expert "
        f"shard(s) {_mb(_files_size(expert_files))}, {len(optimizer_files)} optimizer shard(s) "
        f"{_mb(_files_size(optimizer_files))}, {len(rank_files)} rank file(s) {_mb(_files_size(rank_files))}; "
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
