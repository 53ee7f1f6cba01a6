"""Shared pytest setup: the repo root is importable and torch stays within the 2-core budget."""

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# CI machines have 2 cores; more intra-op threads only oversubscribe them.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _pytest_process_keeps_glibc_defaults(monkeypatch):
    """Trainers built inside the pytest process leave its allocator alone (keep_host_memory is process-wide).

    Trainers launched as subprocesses keep their memory as a run does; tests/unit/test_host_memory.py checks the
    setting itself in a fresh interpreter.
    """
    import training.distributed

    monkeypatch.setattr(training.distributed, "keep_host_memory", lambda: False)
