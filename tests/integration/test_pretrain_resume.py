"""Exact resume and faults of pretrain_llama.py: stop-and-rerun, SIGKILL, SIGTERM, a crash inside a checkpoint
write, non-finite losses, a dead rank. The reference is an uninterrupted run of the same command; on CPU fp32 the
resumed losses and pre-clip gradient norms are required to be bitwise equal (the grad norm sees a gradient-scale
error, say a lost 1/grad_accum in the restored state, that AdamW and clipping would hide from the loss)."""

import dataclasses
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.train_utils import REPO_ROOT, command, env, losses, metrics, pretrain
from training.distributed import free_port

# sequences of 64: steps long enough for a signal to land mid-run (the SIGTERM test)
STEPS = ["train.max_steps=20", "checkpoint.every=5", "data.seq_len=64"]


def _curve(out) -> list[tuple[float, float]]:
    """(loss, grad_norm) per step: the resumed run must repeat both bitwise."""
    return [(r["loss"], r["grad_norm"]) for r in metrics(out)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> list[tuple[float, float]]:
    out = tmp_path_factory.mktemp("straight")
    pretrain(out, STEPS)
    return _curve(out)


def test_stop_and_rerun_resumes_exactly(straight, tmp_path):
    first = pretrain(tmp_path, [*STEPS, "train.exit_interval=10"])
    assert "stopped by train.exit_interval at step 10" in first.stdout
    assert len(losses(tmp_path)) == 10
    second = pretrain(tmp_path, [*STEPS, "train.exit_interval=10"])
    assert f"resumed from {tmp_path / 'step-00000010'} at step 10" in second.stdout
    assert _curve(tmp_path) == straight  # bitwise


def _wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path} appeared:\n{proc.stderr.read() if proc.stderr else ''}"
        assert time.time() - t0 < timeout, f"{path} did not appear in {timeout}s"
        time.sleep(0.05)


def test_sigkill_after_checkpoint_then_rerun(straight, tmp_path):
    proc = subprocess.Popen(
        command(tmp_path, [*STEPS, "train.max_steps=20"]),
        cwd=REPO_ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(tmp_path / "step-00000010" / "trainer_state.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed (exit {proc.returncode}): it had finished"
    # killed between the checkpoints of steps 10 and 15: the rerun can only continue from step 10
    assert not (tmp_path / "step-00000015").exists(), "the kill came too late: step 15 was already saved"
    assert len(losses(tmp_path)) < 15, "the killed run logged step 15"
    rerun = pretrain(tmp_path, STEPS)
    assert f"resumed from {tmp_path / 'step-00000010'} at step 10" in rerun.stdout, rerun.stdout[-2000:]
    got = _curve(tmp_path)
    assert len(got) == 20
    assert got == straight  # bitwise: steps 1-10 before the kill and 11-20 replayed after it


def test_sigterm_saves_and_exits_then_resumes(straight, tmp_path):
    run = [*STEPS, "checkpoint.every=0"]  # only the signal saves
    proc = subprocess.Popen(
        command(tmp_path, run),
        cwd=REPO_ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(tmp_path / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped by a signal at step" in out
    done = int(out.split("stopped by a signal at step")[1].split(";")[0])
    assert 0 < done < 20, f"the signal came at step {done}, not mid-run"
    assert (tmp_path / f"step-{done:08d}" / "trainer_state.json").exists()
    assert (tmp_path / "latest").read_text().strip() == f"step-{done:08d}"
    # the same command again resumes there and ends as an uninterrupted run does
    rerun = pretrain(tmp_path, run)
    assert f"resumed from {tmp_path / f'step-{done:08d}'} at step {done}" in rerun.stdout, rerun.stdout[-2000:]
    assert _curve(tmp_path) == straight  # bitwise (checkpoint.every=5 there changes no number)


def test_checkpoint_save_false_writes_no_checkpoint(straight, tmp_path):
    pretrain(tmp_path, [*STEPS, "checkpoint.every=5", "checkpoint.save=false"])
    assert _curve(tmp_path) == straight  # the same run, every step logged
    assert not list(tmp_path.glob("step-*")) and not (tmp_path / "latest").exists()


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    # In-process: the trainer runs 5 steps and checkpoints; the next save dies half-way (torch.save raises).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    from configs.schema import load_config
    from tests.integration.train_utils import SYNTHETIC
    from training import checkpoint as ckpt_io
    from training.loop import Trainer

    cfg = load_config(None, [*SYNTHETIC, f"checkpoint.dir={tmp_path}", "train.max_steps=5", "checkpoint.every=5"])
    trainer = Trainer(cfg)
    trainer.run()
    good = tmp_path / "step-00000005"
    assert ckpt_io.latest_checkpoint(tmp_path) == good
    trainer.step = 6

    def dying_save(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="simulated"):
        trainer.save()
    monkeypatch.undo()
    assert (tmp_path / "step-00000006.tmp").exists()  # the half-written one
    assert ckpt_io.latest_checkpoint(tmp_path) == good
    assert (tmp_path / "latest").read_text().strip() == good.name
    ckpt = cfg.checkpoint
    assert ckpt_io.resume_hint(ckpt) == f"the last checkpoint {good} is intact and a rerun resumes from it"
    assert ckpt_io.resume_hint(dataclasses.replace(ckpt, save=False)).endswith(
        "resumes from it (this run saves none: checkpoint.save=false)"
    )  # it resumes from the earlier run's checkpoint all the same
    assert ckpt_io.resume_hint(ckpt, resume=False) == (
        "a rerun of the same command starts again from step 0 (--no-resume or checkpoint.resume=false); without "
        f"that it resumes from {good}"
    )
    # and a rerun resumes from the good one
    resumed = Trainer(load_config(None, [*SYNTHETIC, f"checkpoint.dir={tmp_path}", "train.max_steps=6"]))
    assert resumed.step == 5


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
    # Weights of 1e18 overflow the attention scores and the MLP in fp32: every loss is NaN and every update skipped.
    # (Much larger weights overflow the first RMSNorm's mean square instead, which zeroes its output: a finite loss.)
    proc = pretrain(tmp_path, ["model.initializer_range=1e18", "train.max_nonfinite_steps=3"], check=False)
    assert proc.returncode == 2, proc.stderr
    assert "3 non-finite losses or gradients in a row (train.max_nonfinite_steps=3) at step 3" in proc.stderr
    assert "no checkpoint was written: a rerun starts from step 0" in proc.stderr
    rows = metrics(tmp_path)
    assert [r["nonfinite_steps"] for r in rows] == [1, 2, 3]
    assert all(r["grad_norm"] is None for r in rows)  # inf, written as null
    assert not list(tmp_path.glob("step-*"))  # nothing was saved from a broken state


def test_dead_rank_stops_the_other_with_a_message(tmp_path):
    # Two ranks launched by hand (no torchrun agent to tear the group down): kill rank 1, rank 0 must exit by itself.
    port = free_port()
    procs = []
    for rank in range(2):
        e = dict(
            env(), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
        args = command(tmp_path, ["train.max_steps=100000", "checkpoint.every=0", "parallel.timeout_minutes=0.5"])
        procs.append(
            subprocess.Popen(args, cwd=REPO_ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    _wait_for(tmp_path / "metrics.jsonl", procs[0])
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    _, err = procs[0].communicate(timeout=90)
    assert time.time() - t0 < 60
    assert procs[0].returncode == 3, err[-3000:]
    assert "Another rank probably died" in err
    assert "no checkpoint was written: a rerun starts from step 0" in err  # checkpoint.every=0, killed mid-run
