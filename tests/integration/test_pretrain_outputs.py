"""What a training run leaves behind: metrics.jsonl and the wandb offline log agree (read back by wandb's own
`wandb leet inspect`), the loss curve PNG, and checkpoints that export to Hugging Face with the same logits in
transformers as in this model -- also a ZeRO-3 checkpoint, consolidated from its partitions, and a tp=2 one."""

import json
import subprocess
import sys

import pytest
import torch

from tests.integration.train_utils import REPO_ROOT, env, losses, metrics, pretrain


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


def test_wandb_offline_history_equals_metrics_jsonl(tmp_path):
    pretrain(tmp_path, ["logging.wandb_mode=offline", "train.max_steps=6"])
    expected = {r["step"]: r["loss"] for r in metrics(tmp_path)}
    assert list(expected) == [1, 2, 3, 4, 5, 6]
    assert _wandb_history(tmp_path) == expected
    png = (tmp_path / "loss_curve.png").read_bytes()
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


@pytest.mark.parametrize(
    "overrides, nproc",
    [([], 1), (["parallel.tp=2"], 2), (["parallel.deepspeed_config=configs/deepspeed/zero3.json"], 2)],
    ids=["tp1", "tp2", "zero3"],
)
def test_checkpoint_exports_to_hf_with_same_logits(tmp_path, overrides, nproc):
    run = tmp_path / "run"
    pretrain(run, ["train.max_steps=4", *overrides], nproc=nproc)
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


def test_zero3_checkpoint_holds_the_same_weights_as_one_process(tmp_path):
    # ZeRO-3 partitions every parameter over the data-parallel ranks; the saved checkpoint must be the whole model,
    # equal to a one-process run's after the same steps.
    from modeling.convert import load_checkpoint

    single, zero3 = tmp_path / "single", tmp_path / "zero3"
    pretrain(single, ["train.max_steps=4"])
    pretrain(zero3, ["train.max_steps=4", "parallel.deepspeed_config=configs/deepspeed/zero3.json"], nproc=2)
    assert losses(single) == pytest.approx(losses(zero3), abs=1e-5)
    _, a = load_checkpoint(single)
    _, b = load_checkpoint(zero3)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    # Adam turns reduction-order differences of the gradients (~1e-7) into weight differences of ~1e-5 at lr 3e-3;
    # a wrongly consolidated partition would be off by the init scale (0.02).
    assert worst < 1e-4, worst


def test_checkpoint_inspector_tells_complete_from_incomplete(tmp_path):
    pretrain(tmp_path, ["train.max_steps=2", "checkpoint.every=1"])

    def inspect(path):
        proc = subprocess.run(
            [sys.executable, "-m", "training.checkpoint", str(path)], cwd=REPO_ROOT, env=env(), capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
        return proc.returncode, proc.stdout + proc.stderr

    rc, out = inspect(tmp_path)
    assert rc == 0, out
    assert "2 step directories; a resume reads step-00000002" in out
    assert "step 2, tokens seen 256, non-finite steps 0" in out  # 2 steps x global batch 4 x seq 32
    assert "layout: world_size 1, tp 1, ep 1, pp 1, cp 1, dp 1, zero_stage 0" in out and "1 rank file(s)" in out
    # a rank file lost, a half-written step: both said, and the exit code says the resume target is not whole
    (tmp_path / "step-00000001" / "rank-00000.pt").unlink()
    (tmp_path / "step-00000002" / "trainer_state.json").unlink()
    rc, out = inspect(tmp_path)
    assert rc == 1, out
    assert "step-00000002: incomplete" in out and "a resume reads step-00000001" in out
    assert "INCOMPLETE: 0 rank files for a world of 1" in out
    rc, out = inspect(tmp_path / "step-00000002")
    assert rc == 1 and "no readable trainer_state.json" in out, out
