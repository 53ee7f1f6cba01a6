"""What a training run leaves behind: metrics.jsonl and the wandb offline log agree (read back by wandb's own
`wandb leet inspect`), the loss curve PNG, and checkpoints that export to Hugging Face with the same logits in
transformers as in this model -- also a ZeRO-3 checkpoint, consolidated from its partitions; the ZeRO-3 run gives
the one-process run's losses, gradient norms and weights. (A tp=2 checkpoint's export: test_vocab_padding.py, whose
tp=2 export holds the one-process run's weights, and test_pretrain_pipeline.py exports a pp=2 one.)

Two runs serve every test (one process and ZeRO-3 at dp=2, 4 steps each, a module fixture that starts each on
first use); the inspector test reads a copy of the one-process run, which it damages."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.integration.train_utils import REPO_ROOT, assert_same_curve, env, metrics, pretrain

LAYOUTS = {  # name: (overrides, processes)
    "tp1": (["logging.wandb_mode=offline", "checkpoint.every=2"], 1),
    "zero3": (["parallel.deepspeed_config=configs/deepspeed/zero3.json"], 2),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """run(name): the directory of the 4-step run of LAYOUTS[name], trained on first use."""
    done = {}

    def run(name):
        if name not in done:
            overrides, nproc = LAYOUTS[name]
            out = tmp_path_factory.mktemp(name) / "run"
            pretrain(out, ["train.max_steps=4", *overrides], nproc=nproc)
            done[name] = out  # only a finished run: a failed one fails every test that asks for it
        return done[name]

    return run


def _wandb_history(out) -> dict[int, float]:
    files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(files[0])],
        capture_output=True,
        text=True,
        timeout=120,
        env=env(),
        check=True,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    history = [r["history"]["item"] for r in rows if r.get("type") == "history"]
    return {h["_step"]: h["loss"] for h in history if "loss" in h}


def test_wandb_offline_history_equals_metrics_jsonl(trained):
    run = trained("tp1")  # logging.wandb_mode=offline
    expected = {r["step"]: r["loss"] for r in metrics(run)}
    assert list(expected) == [1, 2, 3, 4]
    assert _wandb_history(run) == expected
    png = (run / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def _our_logits(ckpt, ids):
    from modeling.convert import load_model

    model = load_model(ckpt)
    with torch.no_grad():
        return model(ids).logits


def _hf_logits(hf_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa").eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_checkpoint_exports_to_hf_with_same_logits(trained, tmp_path, name):
    run = trained(name)
    hf = tmp_path / "hf"
    subprocess.run(
        [sys.executable, "-m", "modeling.convert", "--to-hf", str(run), "--out", str(hf)],
        cwd=REPO_ROOT,
        env=env(),
        check=True,
        capture_output=True,
        timeout=120,
    )
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ours, theirs = _our_logits(run, ids), _hf_logits(hf, ids)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_zero3_checkpoint_holds_the_same_weights_as_one_process(trained):
    # ZeRO-3 partitions every parameter over the data-parallel ranks; the saved checkpoint must be the whole model,
    # equal to a one-process run's after the same steps.
    from modeling.convert import load_checkpoint

    single, zero3 = trained("tp1"), trained("zero3")
    assert len(metrics(single)) == 4
    assert_same_curve(metrics(zero3), metrics(single), loss_tol=1e-5)
    _, a = load_checkpoint(single)
    _, b = load_checkpoint(zero3)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    # Adam turns reduction-order differences of the gradients (~1e-7) into weight differences of ~1e-5 at lr 3e-3;
    # a wrongly consolidated partition would be off by the init scale (0.02).
    assert worst < 1e-4, worst


def test_checkpoint_inspector_tells_complete_from_incomplete(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained("tp1"), run)  # checkpoint.every=2: steps 2 and 4

    def inspect(path):
        proc = subprocess.run(
            [sys.executable, "-m", "training.checkpoint", str(path)], cwd=REPO_ROOT, env=env(), capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
        return proc.returncode, proc.stdout + proc.stderr

    rc, out = inspect(run)
    assert rc == 0, out
    assert "2 step directories; a resume reads step-00000004" in out
    assert "step 4, tokens seen 512, non-finite steps 0" in out  # 4 steps x global batch 4 x seq 32
    assert "layout: world_size 1, tp 1, ep 1, pp 1, cp 1, dp 1, zero_stage 0" in out and "1 rank file(s)" in out
    # a rank file lost, a half-written step: both said, and the exit code says the resume target is not whole
    (run / "step-00000002" / "rank-00000.pt").unlink()
    (run / "step-00000004" / "trainer_state.json").unlink()
    rc, out = inspect(run)
    assert rc == 1, out
    assert "step-00000004: incomplete" in out and "a resume reads step-00000002" in out
    assert "INCOMPLETE: 0 rank files for a world of 1" in out
    rc, out = inspect(run / "step-00000004")
    assert rc == 1 and "no readable trainer_state.json" in out, out
