"""The experts of one MoE layer as one grouped GEMM (torch._grouped_mm) against a Python loop over the experts.

Runs MoEMLP (ep=1) forward + backward on random tokens twice per repetition, once with each way of running the
experts (modeling.moe.grouped_gemm_supported patched to say yes or no), alternating so that both see the same
machine load, and prints the best time of each and loop / grouped (> 1: the grouped GEMM is faster). The outputs
and gradients of the two are compared too (they must agree to rounding). fp32, and bf16 under autocast.

On a CPU the grouped GEMM is torch's C++ loop over the same matmuls; modeling.moe.CPU_GROUPED_GEMM lists the dtypes
for which it is used there, from this script's figures (quoted beside it). On a GPU the choice is fixed by the
kernel (bf16 on compute capability 9.x: no host sync), not by this script, which still runs there. The machine's
load moves single runs a lot on a shared CPU: compare several.

    python bench/moe_experts.py                                  # the default shapes, CPU
    python bench/moe_experts.py --tokens 4096 --hidden 1024 --intermediate 2816 --experts 8 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import modeling.moe as moe_module  # noqa: E402
from modeling.config import ModelConfig  # noqa: E402
from modeling.moe import MoEMLP  # noqa: E402
from parallel.state import ParallelState  # noqa: E402


def _step(moe: MoEMLP, x: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype, grouped: bool) -> float:
    """Seconds for one forward + backward with the experts run one way; leaves the gradients in moe and x."""
    moe_module.grouped_gemm_supported = lambda *_: grouped
    moe.zero_grad(set_to_none=True)
    x.grad = None
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        y = moe(x)
    (y.float() * dy).sum().backward()
    sync()
    return time.perf_counter() - start


def _grads(moe: MoEMLP, x: torch.Tensor) -> list[torch.Tensor]:
    return [x.grad.clone()] + [p.grad.clone() for p in (moe.w1, moe.w2, moe.w3, moe.gate.weight)]


def run(args: argparse.Namespace, dtype: torch.dtype) -> None:
    """Time both ways for one dtype and print one line."""
    config = ModelConfig(
        vocab_size=32,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
    )
    torch.manual_seed(0)
    device = torch.device(args.device)
    moe = MoEMLP(config, ParallelState(), init_method=lambda w: torch.nn.init.normal_(w, 0.0, 0.02), device=device)
    x = torch.randn(1, args.tokens, args.hidden, device=device).requires_grad_()
    dy = torch.randn(1, args.tokens, args.hidden, device=device)
    times: dict[bool, list[float]] = {True: [], False: []}
    real = moe_module.grouped_gemm_supported
    try:
        for grouped in (True, False):  # warm-up, and the results to compare
            _step(moe, x, dy, dtype, grouped)
        grads = {}
        for grouped in (True, False):
            _step(moe, x, dy, dtype, grouped)
            grads[grouped] = _grads(moe, x)
        for _ in range(args.reps):
            for grouped in (True, False):
                times[grouped].append(_step(moe, x, dy, dtype, grouped))
    finally:
        moe_module.grouped_gemm_supported = real
    diff = max(
        ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()
        for a, b in zip(grads[True], grads[False], strict=True)
    )
    loop, grouped = min(times[False]), min(times[True])
    name = str(dtype).removeprefix("torch.")
    print(
        f"{name:8} loop {loop * 1e3:8.2f} ms   grouped {grouped * 1e3:8.2f} ms   loop/grouped {loop / grouped:5.2f}x"
        f"   max relative gradient difference {diff:.1e}"
    )


def main() -> None:
    """Parse the shapes and run fp32 and bf16."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32 (no autocast), bf16 (autocast)")
    args = p.parse_args()
    print(
        f"MoEMLP forward+backward, {args.tokens} tokens, H={args.hidden}, I={args.intermediate}, "
        f"E={args.experts}, k={args.top_k}, {args.device}, best of {args.reps}, torch {torch.__version__}"
    )
    for name in args.dtypes.split(","):
        run(args, {"fp32": torch.float32, "bf16": torch.bfloat16}[name])


if __name__ == "__main__":
    main()
