"""The launchers of launch/ start real multi-process runs of pretrain_llama.py that train exactly as one process.

- two nodes simulated on loopback: launch/torchrun_multinode.sh started twice (two torchrun agents, a c10d
  rendezvous on 127.0.0.1, one process per "node");
- the Slurm script with fake `srun`/`scontrol` that start one agent per "node" on this machine;
- `accelerate launch` with launch/accelerate/cpu_2proc.yaml (torch DDP on gloo), and with
  launch/accelerate/multinode_zero3.yaml on two loopback "machines" (DeepSpeed ZeRO-3 on the CPU, the
  placeholders given on the command line as launch/README.md says).

The reference is a one-process run of the same global batch (no collectives, grad_accum 4). Synthetic data numbers
every sequence globally (training/data.py), so every layout sees the same sequences in each step; the losses and
pre-clip gradient norms of the multi-process runs agree with it to float32 reduction-order noise (measured: losses
< 1e-6, grad norms < 5e-7 relative; compared at 1e-5 by tests.integration.train_utils.assert_same_curve, which sees
a gradient summed instead of averaged over the ranks where the loss, through AdamW and clipping, would not).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.train_utils import assert_same_curve, metrics
from training.distributed import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
TOL = 1e-5
STEPS = 10

# A model and synthetic data small enough that 10 steps take a few seconds per process.
SYNTHETIC = {
    "model": {
        "preset": "tiny",
        "overrides": {
            "vocab_size": 256,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    },
    "data": {"synthetic": True, "seq_len": 32},
    "train": {"micro_batch_size": 1, "global_batch_size": 4, "max_steps": STEPS, "seed": 1, "device": "cpu"},
    "optim": {"lr": 3.0e-3, "warmup_steps": 2, "min_lr": 3.0e-4},
    "checkpoint": {"every": 5},
    "logging": {"log_every": 1, "wandb_mode": "disabled", "progress_bar": False},
}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "synthetic.yaml"
    path.write_text(yaml.safe_dump(SYNTHETIC))
    return path


def _env(**extra: str) -> dict[str, str]:
    """One thread per process, DeepSpeed on the CPU, gloo on loopback, no ranks inherited from a parent launcher."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", PYTHON=sys.executable)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_CONFIG_FILE"):
        env.pop(k, None)
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.update(extra)
    return env


def _run_all(commands: list[list[str]], env: dict[str, str], logs: Path) -> None:
    """Start the commands together (the agents of one job), wait for all; kill every process group on timeout."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, cmd in enumerate(commands):
        log = open(logs / f"agent{i}.log", "w")  # noqa: SIM115 - closed below, after the process ends
        procs.append(
            (
                subprocess.Popen(
                    cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                ),
                log,
            )
        )
    failed, deadline = [], time.monotonic() + TIMEOUT_S
    try:
        for i, (p, _) in enumerate(procs):
            if p.wait(timeout=max(0.0, deadline - time.monotonic())) != 0:
                failed.append(i)
    except subprocess.TimeoutExpired:
        failed = list(range(len(procs)))
    finally:
        for p, log in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            log.close()
    if failed:
        text = "\n".join(
            f"--- {cmd} (exit {procs[i][0].returncode}):\n{(logs / f'agent{i}.log').read_text()[-5000:]}"
            for i, cmd in enumerate(commands)
            if i in failed
        )
        pytest.fail(f"launch failed or timed out after {TIMEOUT_S}s:\n{text}")


def _assert_matches(out: Path, reference: list[dict]) -> None:
    got = metrics(out)
    assert len(got) == len(reference), f"{len(got)} rows in {out / 'metrics.jsonl'}, expected {len(reference)}"
    assert_same_curve(got, reference, loss_tol=TOL)


def _pretrain_args(config: Path, out: Path, *overrides: str) -> list[str]:
    return ["--config", str(config), f"checkpoint.dir={out}", *overrides]


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("one_process")
    _run_all([[sys.executable, "pretrain_llama.py", *_pretrain_args(config, out)]], _env(), out / "logs")
    ref = metrics(out)
    assert len(ref) == STEPS
    assert ref[-1]["loss"] < ref[0]["loss"] - 0.1, f"the reference run does not learn: {[r['loss'] for r in ref]}"
    return ref


def test_two_torchrun_nodes_on_loopback_match_one_process(config, reference, tmp_path):
    out = tmp_path / "run"
    env = _env(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RUN_ID="loopback")
    agent = ["bash", "launch/torchrun_multinode.sh", *_pretrain_args(config, out)]
    _run_all([agent, agent], env, tmp_path / "logs")
    _assert_matches(out, reference)
    rank_files = sorted(p.name for p in (out / "step-00000010").glob("rank-*.pt"))
    assert rank_files == ["rank-00000.pt", "rank-00001.pt"], "the two nodes did not form one world of 2"


FAKE_SRUN = """#!/usr/bin/env bash
# srun on one machine: drop the options, start the command once per "node", fail if any task fails.
while [[ $1 == --* ]]; do
    case $1 in --*=*) shift ;; *) shift 2 ;; esac
done
pids=()
for _ in $(seq "$SLURM_NNODES"); do "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
# `scontrol show hostnames LIST`: every "node" is this machine.
for _ in $(seq "$SLURM_NNODES"); do echo 127.0.0.1; done
"""


def test_slurm_script_with_fake_srun_matches_one_process(config, reference, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "run"
    env = _env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_SUBMIT_DIR=str(REPO_ROOT),
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="node[1-2]",
        SLURM_JOB_ID="4242",
        SLURM_GPUS_ON_NODE="1",
        MASTER_PORT=str(free_port()),
    )
    # 2 steps are still in warmup, where the schedule does not depend on max_steps: they equal the reference's.
    cmd = ["bash", "launch/slurm_multinode.sbatch", *_pretrain_args(config, out, "train.max_steps=2")]
    _run_all([cmd], env, tmp_path / "logs")
    _assert_matches(out, reference[:2])


def test_accelerate_cpu_2proc_matches_one_process(config, reference, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/accelerate/cpu_2proc.yaml"]
    cmd += ["pretrain_llama.py", *_pretrain_args(config, out)]
    _run_all([cmd], _env(), tmp_path / "logs")
    _assert_matches(out, reference)
    assert (out / "step-00000010" / "rank-00001.pt").exists(), "accelerate did not start 2 processes"


def test_accelerate_multinode_zero3_on_loopback_matches_one_process(config, reference, tmp_path):
    out = tmp_path / "run"
    port = str(free_port())
    commands = []
    for machine_rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch"]
        cmd += ["--config_file", "launch/accelerate/multinode_zero3.yaml", "--num_processes", "2"]
        cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port]
        cmd += [
            "pretrain_llama.py",
            *_pretrain_args(config, out, "parallel.deepspeed_config=configs/deepspeed/zero3.json"),
        ]
        commands.append(cmd)
    _run_all(commands, _env(), tmp_path / "logs")
    _assert_matches(out, reference)
    log = (tmp_path / "logs" / "agent0.log").read_text() + (tmp_path / "logs" / "agent1.log").read_text()
    assert "engine zero_stage=3" in log, "the run did not use DeepSpeed ZeRO-3"


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "launch" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_config_names_an_existing_deepspeed_json_of_its_stage(path):
    cfg = yaml.safe_load(path.read_text())
    if cfg["distributed_type"] != "DEEPSPEED":
        assert path.name == "cpu_2proc.yaml"
        return
    ds_file = REPO_ROOT / cfg["deepspeed_config"]["deepspeed_config_file"]
    ds = json.loads(ds_file.read_text())
    expected_stage = int(path.stem.removeprefix("multinode_").removeprefix("zero")[0])
    assert ds["zero_optimization"]["stage"] == expected_stage
    assert ("offload" in path.stem) == ("offload_optimizer" in ds["zero_optimization"])
    # the command in the file's header passes the same json to the script (parallel.deepspeed_config)
    assert f"parallel.deepspeed_config={cfg['deepspeed_config']['deepspeed_config_file']}" in path.read_text()
