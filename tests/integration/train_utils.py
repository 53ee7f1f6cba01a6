"""Run pretrain_llama.py as a user would (python or torchrun subprocesses) and read what it wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300

# A model and synthetic data small enough that 10 steps take about a second per process.
SYNTHETIC = [
    "model.preset=tiny",
    "model.vocab_size=256",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
    "data.synthetic=true",
    "data.seq_len=32",
    "train.micro_batch_size=1",
    "train.global_batch_size=4",
    "train.max_steps=10",
    "train.seed=1",
    "optim.lr=3e-3",
    "optim.warmup_steps=2",
    "optim.min_lr=3e-4",
    "logging.log_every=1",
    "logging.wandb_mode=disabled",
    "logging.progress_bar=false",
]


def env() -> dict[str, str]:
    """The environment of a launched run: one thread per process, DeepSpeed on the CPU, no inherited ranks."""
    e = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    if sys.platform.startswith("linux"):
        e.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return e


def command(out: Path, overrides: list[str], nproc: int = 1) -> list[str]:
    """The command line of a run writing into `out`."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return launcher + ["pretrain_llama.py", *SYNTHETIC, f"checkpoint.dir={out}", *overrides]


def pretrain(out: Path, overrides: list[str] = (), nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """Run pretrain_llama.py to its end; assert success unless check=False."""
    proc = subprocess.run(
        command(out, list(overrides), nproc),
        cwd=REPO_ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    if check:
        assert proc.returncode == 0, (
            f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
        )
    return proc


def metrics(out: Path) -> list[dict]:
    """Rows of metrics.jsonl that carry a training loss, in step order."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


def losses(out: Path) -> list[float]:
    """Training loss per step."""
    return [r["loss"] for r in metrics(out)]
