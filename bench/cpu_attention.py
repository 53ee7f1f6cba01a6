"""CPU attention, forward + backward: torch's SDPA (flash kernel both ways) against parallel.sdpa.CpuAttention.

CpuAttention is what compiled CPU training runs (train.compile), here compiled alone: in bf16 the same flash forward
and a backward written as plain ops in blocks of queries that inductor fuses; in fp32 causal, plain ops both ways,
the forward's probabilities kept for the backward. fp32 with documents shows the recomputing form, slower than
torch's there, which is why fp32 with a mask keeps SDPA. Both run on the same q, k, v and output gradient, in one
process, alternating; the script prints milliseconds per forward + backward (median of --iters), the speed-up, and
the largest relative difference of dq, dk, dv between the two (as a check, not a reference:
tests/unit/test_cpu_attention.py holds that against float64).

    python bench/cpu_attention.py                                  # bench/throughput.py's layer: B 4, T 512
    python bench/cpu_attention.py --seq 2048 --batch 1 --heads 16 --kv-heads 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling.llama import document_causal_mask  # noqa: E402
from parallel.sdpa import CpuAttention  # noqa: E402
from training.distributed import keep_host_memory  # noqa: E402


def torch_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """torch's SDPA as eager training calls it (grouped heads, causal when there is no mask)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)


def fwd_bwd(fn, q, k, v, mask, grad_out) -> tuple[float, list[torch.Tensor]]:
    """Seconds for fn's forward and backward, and the gradients of q, k, v."""
    q.grad = k.grad = v.grad = None
    t0 = time.perf_counter()
    fn(q, k, v, mask).backward(grad_out)
    return time.perf_counter() - t0, [q.grad, k.grad, v.grad]


def main() -> None:
    """Time both for bf16 and fp32, causal and with packed documents."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    keep_host_memory()  # as the trainer does on the CPU
    B, T, hd = args.batch, args.seq, args.head_dim
    docs = torch.arange(T).div(T // 3 + 1, rounding_mode="floor").expand(B, T)  # three documents per row
    compiled = torch.compile(CpuAttention.apply)
    print(f"B {B}, T {T}, heads {args.heads}, kv heads {args.kv_heads}, head dim {hd}, threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}")  # fmt: skip
    for dtype in (torch.bfloat16, torch.float32):
        for name, mask in (("causal", None), ("documents", document_causal_mask(docs))):
            g = torch.Generator().manual_seed(0)
            shapes = ((B, args.heads, T, hd), (B, args.kv_heads, T, hd), (B, args.kv_heads, T, hd))
            q, k, v = (torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes)
            grad_out = torch.randn(shapes[0], generator=g).to(dtype)

            inputs = (q, k, v, mask, grad_out)
            fwd_bwd(compiled, *inputs), fwd_bwd(torch_sdpa, *inputs)  # compile, warm up
            times: dict[str, list[float]] = {"torch": [], "cpu": []}
            for _ in range(args.iters):
                times["torch"].append(fwd_bwd(torch_sdpa, *inputs)[0])
                times["cpu"].append(fwd_bwd(compiled, *inputs)[0])
            pairs = zip(fwd_bwd(compiled, *inputs)[1], fwd_bwd(torch_sdpa, *inputs)[1], strict=True)
            diff = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in pairs)
            t_ref, t_cpu = (statistics.median(times[n]) * 1e3 for n in ("torch", "cpu"))
            print(f"{str(dtype)[6:]:>8} {name:>9}: torch SDPA {t_ref:7.1f} ms  CpuAttention {t_cpu:7.1f} ms  "
                  f"speed-up {t_ref / t_cpu:.2f}x  max rel. grad diff {diff:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
