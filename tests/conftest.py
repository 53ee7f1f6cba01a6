"""Shared pytest setup: the repo root is importable and torch stays within the 2-core budget."""

import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# CI machines have 2 cores; more intra-op threads only oversubscribe them.
torch.set_num_threads(min(2, torch.get_num_threads()))
