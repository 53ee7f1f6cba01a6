"""Masked attention with grouped kv heads: FlexAttention against SDPA with an explicit mask, time and peak memory.

    python bench/flex_attention.py                                  # CUDA: T 4096 8192, bf16, forward + backward
    python bench/flex_attention.py --seq 8192 16384 --docs 8 --window 4096
    python bench/flex_attention.py --seq 512 --heads 4 --kv-heads 2 --head-dim 64      # CPU: forward only

One attention call of a packed batch (--docs documents of random lengths per sequence, optionally a window), the
three ways the code could run it, side by side in one process:

    sdpa+gqa   F.scaled_dot_product_attention(mask, enable_gqa=True): what attention did before parallel.sdpa; on
               CUDA in torch 2.13 the math kernel (grouped heads and a mask), (B, Hq, T, T) scores kept for backward
    sdpa       parallel.sdpa.sdpa: k, v repeated to the query heads on CUDA, so the memory-efficient kernel runs
    flex       modeling.flex: the BlockMask built once (its build time printed apart), compiled flex_attention on
               CUDA; on the CPU its uncompiled reference (forward only: no CPU backward in torch 2.13)

Per row: milliseconds per call (median of --iters after one warm-up call, which on CUDA includes flex's compile),
the peak memory the call adds above its inputs (CUDA), and max |out - sdpa's out|. The (B, 1, T, T) bool mask the
SDPA rows need is built outside the timed region and counted in neither.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling import flex  # noqa: E402
from modeling.llama import document_causal_mask  # noqa: E402
from parallel.sdpa import sdpa  # noqa: E402


def packed_documents(batch: int, seq: int, docs: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, seq) document ids: `docs` runs of random lengths per row."""
    rows = []
    for _ in range(batch):
        cuts = torch.sort(torch.randperm(seq - 1, generator=gen)[: docs - 1] + 1).values
        ids = torch.zeros(seq, dtype=torch.long)
        ids[cuts] = 1
        rows.append(ids.cumsum(0))
    return torch.stack(rows)


def timed(fn, iters: int, device: torch.device) -> tuple[float, float, torch.Tensor]:
    """(median ms, peak MiB above the start (CUDA; nan elsewhere), output) of fn() after one warm-up call."""
    out = fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    for _ in range(iters):
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")  # the CPU rows
    print(f"device {device}, {dtype}, {'forward + backward' if device.type == 'cuda' else 'forward only'}")
    print(f"{'T':>6} {'backend':>9} {'ms':>9} {'peak MiB':>9} {'max diff':>9}   (block mask build ms)")
    for T in args.seq:
        measure(T, args, device, dtype, gen)


def measure(T: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, gen) -> None:
    """Print the three rows for sequence length T."""
    B, hq, hkv, hd = args.batch, args.heads, args.kv_heads, args.head_dim
    train = device.type == "cuda"  # FlexAttention has no CPU backward
    q, k, v = (torch.randn(B, h, T, hd, generator=gen).to(device, dtype).requires_grad_(train) for h in (hq, hkv, hkv))
    docs = packed_documents(B, T, args.docs, gen).to(device)
    mask = document_causal_mask(docs, args.window)  # (B, 1, T, T), the SDPA rows' input
    t0 = time.perf_counter()
    block = flex.flex_mask(T, device, docs, args.window)
    if device.type == "cuda":
        torch.cuda.synchronize()
    build_ms = (time.perf_counter() - t0) * 1e3

    def run(attend):
        def call():
            with torch.set_grad_enabled(train):
                y = attend()
                if train:
                    y.float().square().mean().backward()
            return y.detach()

        return call

    rows = {
        "sdpa": run(lambda: sdpa(q, k, v, mask)),
        "sdpa+gqa": run(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)),
        "flex": run(lambda: block.attend(q, k, v)),
    }
    ref = None
    for name, fn in rows.items():
        ms, peak, out = timed(fn, args.iters, device)
        ref = out if ref is None else ref
        diff = (out.float() - ref.float()).abs().max().item()
        extra = f"   ({build_ms:.2f})" if name == "flex" else ""
        print(f"{T:>6} {name:>9} {ms:9.2f} {peak:9.1f} {diff:9.2e}{extra}")


if __name__ == "__main__":
    main()
