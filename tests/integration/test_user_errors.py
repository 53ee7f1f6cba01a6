"""Errors a user causes end pretrain_llama.py with one line naming the key, file or line and what to do, exit code 2,
and no traceback: a bad config key, a missing model.preset, a ZeRO stage that is not an integer, NCCL on the CPU, a
corrupt shard met in the middle of training under data.on_error=raise (in the main process and in a DataLoader
worker). A stale lock of a killed DeepSpeed op build, on which DeepSpeed then waits forever, is named before the
wait."""

import json
import random
import subprocess
import threading

import pytest
import zstandard

from tests.integration.train_utils import REPO_ROOT, command, env, metrics, pretrain

WORDS = "the a model data token train loss step layer head vocab shard rank batch learn text code run".split()


def assert_user_error(proc, *patterns: str) -> str:
    """Exit code 2, no traceback, and a last line of stderr that starts with 'error:' and holds every pattern."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n{output[-4000:]}"
    assert "Traceback" not in output, output[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-2000:]
    for pattern in patterns:
        assert pattern in last, f"{pattern!r} not in {last!r}"
    return last


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    """A tokenizer; a shard whose line 261 was cut short, met after the first 256 documents (the loader tokenizes
    256 at a time), about 60 steps of one sequence; one whose second zstd frame is garbage (a copy error), met when
    it is opened."""
    from dataset.train_tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("bad_data")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40))).capitalize() + "." for _ in range(270)]
    (root / "clean.txt").write_text("\n".join(docs) + "\n")
    train_tokenizer([str(root / "clean.txt")], root / "tok", vocab_size=300)
    lines = [json.dumps({"text": d}) for d in docs]
    lines[260] = lines[260][:25]  # a record cut in the middle: invalid JSON
    compress = zstandard.ZstdCompressor(level=3, write_checksum=True).compress
    cut = root / "cut" / "part-00000.jsonl.zst"
    cut.parent.mkdir()
    cut.write_bytes(compress(("\n".join(lines) + "\n").encode()))
    frame = root / "frame" / "part-00000.jsonl.zst"
    frame.parent.mkdir()
    frame.write_bytes(compress(("\n".join(lines[:100]) + "\n").encode()) + b"\x00" * 64)
    return root, cut, frame


def _text_args(root, shard, workers):
    return [
        f"data.train={shard}",
        f"data.tokenizer={root}/tok",
        "data.synthetic=false",
        "data.on_error=raise",
        f"data.num_workers={workers}",
        "model.vocab_size=null",
        "data.seq_len=128",
        "train.micro_batch_size=1",
        "train.global_batch_size=1",  # one stream: it meets line 261 after its first 256 documents, ~60 steps
        "train.max_steps=1000",
        "checkpoint.every=0",
    ]


def test_unknown_config_key(tmp_path):
    proc = pretrain(tmp_path, ["train.max_step=3"], check=False)
    assert_user_error(proc, "unknown key train.max_step", "keys of train:")


def test_missing_model_preset(tmp_path):
    proc = pretrain(tmp_path, ["model.preset=null"], check=False)
    assert_user_error(proc, "model.preset is not set", "tiny")


@pytest.mark.parametrize("stage", ['"two"', "2.5", "true"])
def test_zero_stage_not_an_integer(tmp_path, stage):
    ds = tmp_path / "zero.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": json.loads(stage)}}))
    proc = pretrain(tmp_path / "run", [f"parallel.deepspeed_config={ds}"], check=False)
    assert_user_error(proc, str(ds), f"zero_optimization.stage={stage}", "0, 1, 2 or 3")


def test_nccl_backend_on_the_cpu(tmp_path):
    proc = pretrain(
        tmp_path, ["parallel.backend=nccl", "parallel.deepspeed_config=configs/deepspeed/zero1.json"], check=False
    )
    assert_user_error(proc, "parallel.backend=nccl moves CUDA tensors only", "parallel.backend=gloo")


@pytest.mark.parametrize("workers", [0, 1], ids=["main_process", "worker"])
def test_corrupt_record_mid_training(bad_data, tmp_path, workers):
    root, cut, _ = bad_data
    proc = pretrain(tmp_path, _text_args(root, cut, workers), check=False)
    assert_user_error(proc, f"{cut}:261", "on_error")
    assert len(metrics(tmp_path)) >= 20, "the fault was met before training started, not in the middle"


def test_corrupt_zstd_frame(bad_data, tmp_path):
    root, _, frame = bad_data
    proc = pretrain(tmp_path, _text_args(root, frame, 0), check=False)
    assert_user_error(proc, str(frame), "corrupt zstd data", "after line 100", "data.on_error")


def test_stale_deepspeed_build_lock_is_named_before_deepspeed_waits_on_it(tmp_path):
    # a build of the op DeepSpeed's CPU accelerator loads at every start, killed half-way: its lock stays
    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    run = subprocess.Popen(
        command(tmp_path / "run", ["parallel.deepspeed_config=configs/deepspeed/zero1.json"]),
        cwd=REPO_ROOT,
        env=dict(env(), TORCH_EXTENSIONS_DIR=str(lock.parent.parent)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline, seen = threading.Timer(120, run.kill), []  # without the warning the run would wait forever
    deadline.start()
    try:
        for line in run.stderr:  # DeepSpeed blocks on the lock after the warning: stop reading there
            seen.append(line)
            if "is left from a build" in line:
                break
    finally:
        deadline.cancel()
        run.kill()
        run.wait()
    assert f"warning: {lock} is left from a build of the extension op 'deepspeed_shm_comm'" in seen[-1], seen[-20:]
    assert f"rm {lock}" in seen[-1]
