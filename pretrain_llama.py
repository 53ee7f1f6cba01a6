"""Pretrain a Llama model: one process, torchrun, accelerate launch or deepspeed, on CPU or GPU.

    python pretrain_llama.py --config configs/pretrain_tiny.yaml                       # one process (CPU default)
    torchrun --nproc_per_node 8 pretrain_llama.py --config configs/pretrain_7b.yaml parallel.tp=2
    accelerate launch --config_file launch/accelerate/zero2.yaml pretrain_llama.py --config ...
    deepspeed --num_gpus 8 pretrain_llama.py --config ... parallel.deepspeed_config=configs/deepspeed/zero3.json

Arguments after the config are dotted overrides (`optim.lr=1e-3`, `model.hidden_size=256`). Rerunning the same
command on the same checkpoint.dir resumes from its latest complete checkpoint; `--no-resume` starts fresh.
See README.md for every config key and launch/README.md for multi-GPU and multi-node commands.
"""

from __future__ import annotations

import argparse
import sys

from configs.schema import ConfigError, load_config
from training.loop import run_training


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="yaml config (configs/pretrain_*.yaml); defaults apply without one")
    ap.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in checkpoint.dir")
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 optim.lr=1e-3")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Load and validate the config, then train."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    run_training(cfg, resume=not args.no_resume)


if __name__ == "__main__":
    main()
