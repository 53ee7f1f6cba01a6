"""training.distributed.keep_host_memory: a freed large tensor's memory is reused by the next one, not faulted in.

Counted, not timed: the process's minor page faults (getrusage) while a 64 MiB tensor is allocated and written, in
a fresh interpreter (mallopt is process-wide), first with glibc's defaults, where every allocation maps fresh pages
(one fault per 4 KiB page, 16384; fewer with transparent huge pages), then kept. Kept, the heap settles within the
first allocations (one of them may still grow the heap, when a small allocation has taken the start of the freed
block): most of seven allocations fault none.
"""

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs.schema import load_config
from training import distributed

REPO_ROOT = Path(__file__).resolve().parents[2]
CODE = """
import resource, torch
from training.distributed import keep_host_memory
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
default = min(faults() for _ in range(3))
assert keep_host_memory()
faults(), faults()  # the first allocations after the switch map their pages
print(default, sorted(faults() for _ in range(7))[3])  # the median
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_kept_memory_is_reused_without_page_faults():
    p = subprocess.run([sys.executable, "-c", CODE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    default, kept = map(int, p.stdout.split()[-2:])  # the fewest faults with the defaults, the median kept
    assert default >= 32, default  # 64 MiB mapped afresh: at least one fault per 2 MiB huge page
    assert kept <= 4, kept


def test_train_keep_host_memory_key_reaches_the_cpu_start_up(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed, "keep_host_memory", lambda: calls.append(1) or True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    base = ["model.preset=tiny", "data.synthetic=true", "model.vocab_size=64", "train.device=cpu"]
    assert distributed.init_distributed(load_config(None, base)) == torch.device("cpu")
    assert calls == [1]
    distributed.init_distributed(load_config(None, [*base, "train.keep_host_memory=false"]))
    assert calls == [1]
