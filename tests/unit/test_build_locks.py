"""Stale JIT-extension build locks (parallel.build_locks): found where no process holds them, named once, with the
command that frees them; ZeRO-Offload's optimizer switch checks before it builds DeepSpeed's CPU Adam. The whole
run's check, a real stale lock of DeepSpeed's start-up op, is in tests/integration/test_user_errors.py."""

import os
import subprocess
import sys
import time
import types

import pytest
from torch import nn

import parallel.build_locks as build_locks
from configs.sections import OptimSection
from training.optim import build_optimizer

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds open files through /proc")


@pytest.fixture
def root(tmp_path, monkeypatch):
    """An empty extensions root ($TORCH_EXTENSIONS_DIR), no lock named yet in this process."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(build_locks, "_warned", set())
    return tmp_path


def _lock(root, *parts):
    path = root.joinpath(*parts, "lock")
    path.parent.mkdir(parents=True)
    path.touch()
    return path


def test_unheld_locks_are_stale_at_either_depth(root):
    flat = _lock(root, "cpu_adam")  # $TORCH_EXTENSIONS_DIR/<op>
    nested = _lock(root, "py311_cu130", "deepspeed_shm_comm")  # torch's default root/<python>_<accelerator>/<op>
    (root / "fused_adam").mkdir()  # a finished build: no lock
    assert build_locks.extensions_root() == root
    assert build_locks.stale_build_locks() == sorted([flat, nested])


def test_a_lock_held_open_is_a_build_in_progress(root):
    mine, child, stale = _lock(root, "a"), _lock(root, "b"), _lock(root, "c")
    fd = os.open(mine, os.O_RDONLY)  # as torch's FileBaton holds it while it builds
    hold = f"import os, time; os.open({str(child)!r}, os.O_RDONLY); print(flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()  # the child holds it now
        assert build_locks.stale_build_locks() == [stale]
    finally:
        holder.kill()
        holder.wait()
        os.close(fd)
    time.sleep(0.1)
    assert build_locks.stale_build_locks() == [mine, child, stale]


def test_warning_names_the_lock_and_the_command_once_per_process(root, capsys):
    lock = _lock(root, "cpu_adam")
    assert build_locks.warn_stale_build_locks() == [lock]
    err = capsys.readouterr().err
    assert f"warning: {lock} is left from a build of the extension op 'cpu_adam' that was stopped" in err
    assert f"rm {lock}" in err and "waits on it forever" in err
    assert build_locks.warn_stale_build_locks() == [lock]
    assert capsys.readouterr().err == ""  # named once


def test_only_each_machines_local_rank_0_looks_and_warns(root, capsys, monkeypatch):
    _lock(root, "cpu_adam")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert build_locks.warn_stale_build_locks() == []
    assert capsys.readouterr().err == ""


def test_a_lock_released_during_the_scan_is_not_stale(root, monkeypatch):
    lock, kept = _lock(root, "cpu_adam"), _lock(root, "fused_adam")
    scan = build_locks._held_open
    monkeypatch.setattr(build_locks, "_held_open", lambda: lock.unlink() or scan())  # its build ended meanwhile
    assert build_locks.stale_build_locks() == [kept]


def test_a_process_that_exits_during_the_scan_is_skipped(monkeypatch):
    listed = os.listdir("/proc")
    gone = str(2**22 + 1)  # above Linux's largest pid: listed, then gone when its descriptors are read
    monkeypatch.setattr(build_locks.os, "listdir", lambda path: [*listed, gone])
    assert isinstance(build_locks._held_open(), set)


def test_offload_optimizer_checks_before_building_cpu_adam(root, capsys, monkeypatch):
    lock = _lock(root, "cpu_adam")
    seen = []

    class Adam:  # stands in for DeepSpeedCPUAdam, whose op build would wait on the lock
        def __init__(self, *args, **kwargs):
            seen.append(capsys.readouterr().err)
            raise RuntimeError("stop here")

    monkeypatch.setitem(sys.modules, "deepspeed.ops.adam", types.SimpleNamespace(DeepSpeedCPUAdam=Adam))
    model = nn.Linear(4, 3)
    with pytest.warns(UserWarning, match="could not be built"):
        build_optimizer(model, OptimSection(), max_steps=1, offload="configs/deepspeed/zero3_offload.json")
    assert len(seen) == 1 and f"warning: {lock} is left" in seen[0]
