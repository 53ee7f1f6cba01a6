"""Run pretrain_llama.py as a user would (python or torchrun subprocesses) and read what it wrote."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
# Gradient norms of two layouts of the same step agree to float32 reduction-order noise. The loss alone cannot see a
# gradient-scale bug (AdamW is invariant to a uniform scale and clipping normalises it); the pre-clip norm can.
NORM_RTOL = 1e-5

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


def run_scenarios(scenarios: list[dict], path: Path, nproc: int) -> subprocess.CompletedProcess:
    """Write `scenarios` to `path` and run them with tests/integration/layout_runs.py (torchrun when nproc > 1)."""
    path.write_text(json.dumps(scenarios))
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = [*launcher, "tests/integration/layout_runs.py", str(path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-5000:]}\nstderr:\n{proc.stderr[-8000:]}"
    return proc


class Run(NamedTuple):
    """A scenario of run_worlds: the directory it trained in and what its ranks printed (rank 0's lines first)."""

    out: Path
    stdout: str

    def printed(self, *starts: str) -> list[str]:
        """The printed lines that start with one of `starts`."""
        return [line for line in self.stdout.splitlines() if line.startswith(starts)]


def run_worlds(root: Path, scenarios: dict[str, tuple]) -> dict[str, Run]:
    """Run named pretraining scenarios with one launch of layout_runs.py per process count; NAME -> Run.

    scenarios: NAME -> (nproc, overrides), trained in root/NAME, or (nproc, overrides, OTHER) to train in root/OTHER
    (a rerun that resumes there: it comes after OTHER in the dict, at the same nproc). Scenarios of one process count
    run in turn in one process (a torchrun world), which imports torch and the trainer once: on 2 cores a launch
    of 4 processes costs about 10 s before its first step, one of 2 about 5 s. The overrides apply to SYNTHETIC.
    """
    outs: dict[str, Path] = {}
    worlds: dict[int, list[dict]] = {}
    for name, (nproc, overrides, *other) in scenarios.items():
        if other:
            assert scenarios.get(other[0], (0,))[0] == nproc and other[0] in outs, f"{name}: rerun {other[0]} first"
        outs[name] = root / (other[0] if other else name)
        scenario = {"out": str(outs[name]), "overrides": list(overrides), "stdout": str(root / f"{name}.stdout")}
        worlds.setdefault(nproc, []).append(scenario)
    for nproc, world in sorted(worlds.items()):
        run_scenarios(world, root / f"world{nproc}.json", nproc)
    runs = {}
    for name, (nproc, *_) in scenarios.items():
        printed = "".join((root / f"{name}.stdout.rank{r}").read_text() for r in range(nproc))
        runs[name] = Run(outs[name], printed)
    return runs


def metrics(out: Path) -> list[dict]:
    """Rows of metrics.jsonl that carry a training loss, in step order."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


def eval_metrics(out: Path) -> list[dict]:
    """Rows of metrics.jsonl that carry an eval loss, in step order."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "eval_loss" in r]


def losses(out: Path) -> list[float]:
    """Training loss per step."""
    return [r["loss"] for r in metrics(out)]


def assert_same_curve(got: list[dict], ref: list[dict], loss_tol: float, norm_rtol: float = NORM_RTOL) -> None:
    """The rows of metrics.jsonl of two runs: the same steps, losses within `loss_tol`, grad norms within `norm_rtol`.

    The grad norm is compared relative to the reference's: a gradient scaled by dp (a sum instead of a mean) or by
    grad_accum, or a norm counting tensor-split parameters wrongly, moves it by far more than 1e-5 while the loss,
    through AdamW and clipping, can stay within tolerance.
    """
    assert [r["step"] for r in got] == [r["step"] for r in ref], "the runs logged different steps"
    loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(got, ref, strict=True))
    norm_diff = max(abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] for a, b in zip(got, ref, strict=True))
    loss_got, loss_ref = [a["loss"] for a in got], [b["loss"] for b in ref]
    assert loss_diff < loss_tol, (
        f"max |loss diff| {loss_diff:.2e} over {len(ref)} steps\ngot {loss_got}\nref {loss_ref}"
    )
    norm_got, norm_ref = [a["grad_norm"] for a in got], [b["grad_norm"] for b in ref]
    assert norm_diff < norm_rtol, (
        f"max relative grad_norm diff {norm_diff:.2e} over {len(ref)} steps\ngot {norm_got}\nref {norm_ref}"
    )


# A mixture-of-experts variant of SYNTHETIC: 4 experts, both auxiliary losses, auxiliary-loss-free balancing
MOE = ["model.num_local_experts=4", "model.router_aux_loss_coef=0.01", "model.router_z_loss_coef=0.001"]
MOE += ["model.router_expert_bias=true", "model.router_bias_update_rate=0.01"]


def assert_same_moe_stats(got: list[dict], ref: list[dict]) -> None:
    """Every `moe/...` metric of every step: token counts exactly, the losses and loads to 1e-5."""
    for row, want in zip(got, ref, strict=True):
        for key in (k for k in want if k.startswith("moe/")):
            if key.endswith("tokens_per_expert"):
                assert row[key] == want[key], key
            else:
                assert row[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key


WORDS = "the a model data token train loss step layer head vocab shard rank batch learn text code run".split()


def text_corpus(root: Path, files: int = 3, docs: int = 120) -> Path:
    """Short random-word documents in jsonl.zst shards (root/train: `files` x `docs`, root/valid: 1 x 30) and a
    400-piece SentencePiece tokenizer trained on them (root/tok)."""
    import zstandard

    from dataset.train_tokenizer import train_tokenizer

    rng = random.Random(0)
    for split, n_files, n_docs in (("train", files, docs), ("valid", 1, 30)):
        (root / split).mkdir()
        for f in range(n_files):
            lines = []
            for d in range(n_docs):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + f" {split}{f}-{d}."
                lines.append(json.dumps({"text": text.capitalize()}))
            data = ("\n".join(lines) + "\n").encode()
            (root / split / f"part-{f:05d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    train_tokenizer([str(root / "train" / "*.jsonl.zst")], root / "tok", vocab_size=400)
    return root


def text_overrides(corpus: Path) -> list[str]:
    """The overrides that train on text_corpus(corpus) instead of synthetic tokens."""
    return [
        f"data.train={corpus}/train/*.jsonl.zst",
        f"data.valid={corpus}/valid/*.jsonl.zst",
        f"data.tokenizer={corpus}/tok",
        "data.synthetic=false",
        "model.vocab_size=null",
    ]
