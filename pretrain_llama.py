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

from training.cli import main as train_main


def main(argv: list[str] | None = None) -> None:
    """Load and validate the config, then train."""
    train_main(argv, description=__doc__)


if __name__ == "__main__":
    main()
