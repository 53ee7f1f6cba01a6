"""Stale build locks of PyTorch's JIT extensions: a DeepSpeed op build that was killed leaves a lock that hangs runs.

DeepSpeed compiles its C++ ops on first use (the CPU accelerator's shared-memory collectives at every start, CPU
Adam under ZeRO-Offload) through `torch.utils.cpp_extension.load`. That build takes a file lock,
`<extensions root>/<op>/lock`, created with O_EXCL and held open by the building process until the build ends; other
processes wait while the file exists, silently and without a time limit. A build killed half-way (Ctrl-C during a
first start, a job's time limit) leaves the file behind, and every later run that loads the op hangs on it.

`warn_stale_build_locks` finds such files before DeepSpeed starts and names them: a lock that no process on this
machine holds open. It only warns: a run on another machine that shares the directory (a shared home) may be
building the op right now, which no local check can see, and removing its lock would start a second build there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch.utils.cpp_extension

_warned: set[Path] = set()  # locks already named in this process


def extensions_root() -> Path:
    """Where torch builds JIT extensions: $TORCH_EXTENSIONS_DIR, else torch's per-user cache (torch_extensions)."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or torch.utils.cpp_extension.get_default_build_root())


def _held_open() -> set[str] | None:
    """The paths that processes on this machine hold open (those this user may inspect), or None without /proc."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    held = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:  # a process may exit (or a descriptor close) at any point: skip what is gone, or another user's
            fds = os.scandir(f"/proc/{pid}/fd")
            with fds:
                for fd in fds:
                    try:
                        held.add(os.readlink(fd.path))
                    except OSError:
                        continue
        except OSError:
            continue
    return held


def stale_build_locks(root: Path | None = None) -> list[Path]:
    """The build locks under `root` (default `extensions_root()`) that no process on this machine holds open.

    torch puts an op's build directory at `<root>/<op>` when $TORCH_EXTENSIONS_DIR is set, else at
    `<root>/py<version>_<accelerator>/<op>`; both levels are searched. Empty where /proc cannot tell (not Linux).
    """
    root = root or extensions_root()
    locks = sorted({*root.glob("*/lock"), *root.glob("*/*/lock")})
    if not locks:
        return []
    held = _held_open()
    if held is None:
        return []
    # a build that ended during the scan released its lock (closed, then removed): gone now, not stale
    return [lock for lock in locks if str(lock.resolve()) not in held and lock.exists()]


def warn_stale_build_locks(root: Path | None = None) -> list[Path]:
    """Print what to do about each stale build lock (once a process) on each machine's local rank 0; returns them."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return []
    locks = stale_build_locks(root)
    for lock in sorted(set(locks) - _warned):
        _warned.add(lock)
        print(
            f"warning: {lock} is left from a build of the extension op '{lock.parent.name}' that was stopped (no "
            "process of this user on this machine holds it). A run that loads that op (DeepSpeed's ops: "
            f"deepspeed_shm_comm at start, cpu_adam under ZeRO-Offload) waits on it forever. Delete it (rm {lock}) "
            "and start again, unless a run on another machine sharing this directory is building that op now",
            file=sys.stderr,
            flush=True,
        )
    return locks
