"""The command line of pretrain_llama.py, sft.py and dpo.py, and how a run ends: one line and an exit code.

    python pretrain_llama.py --config CONFIG.yaml [--no-resume] [dotted.key=value ...]

Exit codes: 0 done (or stopped by SIGTERM/SIGINT, after a checkpoint unless checkpoint.save=false), 2 an error the
user can fix (the line names the key, file, line or value and what to do), 3 a collective failed because another rank
died.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch.distributed as dist

from configs.schema import TrainConfig, load_config
from configs.sections import ConfigError
from dataset.lines import DataError
from dataset.tokenizer import TokenizerError
from modeling.config import CheckpointError
from parallel.state import ParallelConfigError
from parallel.token_ids import TokenIdError
from training.checkpoint import resume_hint
from training.loop import Trainer, TrainingError

# Errors the user can fix (a config key, a data file and line, a tokenizer or checkpoint directory, a token id outside
# the vocabulary, a layout or DeepSpeed version that cannot work): their message names what and where, so the run
# ends with that one line and exit code 2 instead of a traceback.
USER_ERRORS = (
    ConfigError,
    TrainingError,
    DataError,
    TokenizerError,
    CheckpointError,
    TokenIdError,
    ParallelConfigError,
)


def main(argv: list[str] | None, *, description: str, trainer_cls: type[Trainer] = Trainer) -> None:
    """The command line of pretrain_llama.py, sft.py and dpo.py: --config, --no-resume, dotted overrides; then train."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="yaml config (configs/*.yaml); defaults apply without one")
    ap.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in checkpoint.dir")
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 optim.lr=1e-3")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    run_training(cfg, resume=not args.no_resume, trainer_cls=trainer_cls)


def run_training(cfg: TrainConfig, *, resume: bool, trainer_cls: type[Trainer] = Trainer) -> None:
    """Build a Trainer and run it; user errors (exit 2) and collective failures (exit 3) end in one clear line."""
    try:
        trainer_cls(cfg, resume=resume).run()
    except USER_ERRORS as e:  # met at start-up or mid-run (a corrupt shard under data.on_error=raise)
        print(f"error: {_user_message(e)}", file=sys.stderr, flush=True)
        _exit(2)
    except RuntimeError as e:
        text = str(e)
        if dist.is_initialized() and any(s in text for s in ("timed out", "Connection closed", "Connection reset")):
            rank = dist.get_rank()
            print(
                f"error: rank {rank}: a collective failed ({text.splitlines()[0]}). Another rank probably died: see "
                f"its log above; {resume_hint(cfg.checkpoint, resume)}.",
                file=sys.stderr,
                flush=True,
            )
            _exit(3)
        raise
    if dist.is_initialized():
        dist.destroy_process_group()


def _user_message(e: Exception) -> str:
    """The error's own message, also when a DataLoader worker raised it.

    torch re-raises a worker's exception with the worker's traceback as its message (a line "Caught DataError in
    DataLoader worker process 0.", "Original Traceback ...", and last "dataset.lines.DataError: <message>", which
    may span lines): keep only <message>.
    """
    text = str(e).strip()
    if "\nOriginal Traceback" not in text:
        return text
    name = re.escape(f"{type(e).__module__}.{type(e).__qualname__}")
    starts = [m.end() for m in re.finditer(rf"^{name}: ", text, re.MULTILINE)]
    return text[starts[-1] :] if starts else text.splitlines()[-1]


def _exit(code: int) -> None:
    # a dead peer can make destroy_process_group (and interpreter shutdown) block: leave at once
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
