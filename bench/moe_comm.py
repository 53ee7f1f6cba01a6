"""Bytes the expert-parallel all-to-all moves per MoE layer, forward and backward, against the analytical minimum.

Spawns gloo processes on the CPU (tp=1, experts split over `ep` ranks), runs one MoEMLP forward and backward per
rank on its own random tokens, and counts every `dist.all_to_all_single` call by wrapping it (parallel.experts
looks it up as `dist.all_to_all_single` at call time). A call's bytes are what this rank sends to the other ranks
of its group (its own chunk stays in memory); the token exchanges and the per-expert count exchange are reported
apart.

The minimum, per rank and per direction (dispatch, combine; forward, backward):

    (N k - assignments whose expert is on this rank) x H x bytes per element

so one layer's forward moves 2 x that (dispatch + combine), and so does its backward (their conjugates). The script
prints measured / minimum (target 1.00), summed over ranks.

    python bench/moe_comm.py                       # world 2 (ep 2) and world 4 (ep 4 and ep 2), fp32
    python bench/moe_comm.py --dtype bf16 --tokens 2048 --hidden 1024
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.config import ModelConfig  # noqa: E402
from modeling.moe import MoEMLP  # noqa: E402
from parallel.state import ParallelState  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class _Counter:
    """Wraps dist.all_to_all_single; logs (phase, kind, bytes sent to other ranks)."""

    def __init__(self) -> None:
        self.phase = "idle"
        self.log: list[tuple[str, str, int]] = []
        self.original = dist.all_to_all_single

    def __call__(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
        n, me = dist.get_world_size(group), dist.get_rank(group)
        rows = input.shape[0]
        splits = input_split_sizes or [rows // n] * n
        row_bytes = input[:1].numel() * input.element_size() if rows else 0
        sent = sum(s for r, s in enumerate(splits) if r != me) * row_bytes
        kind = "counts" if input.dtype == torch.long else "tokens"
        self.log.append((self.phase, kind, sent))
        return self.original(output, input, output_split_sizes, input_split_sizes, group=group, **kw)

    def total(self, phase: str, kind: str) -> int:
        """Bytes logged for one phase and kind."""
        return sum(b for p, k, b in self.log if p == phase and k == kind)


def _rank(rank: int, world_size: int, ep: int, args: argparse.Namespace) -> dict[str, int]:
    torch.set_num_threads(1)
    counter = _Counter()
    dist.all_to_all_single = counter
    state = ParallelState.build(ep=ep)
    config = ModelConfig(
        vocab_size=32,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
    )
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    moe = MoEMLP(config, state, init_method=lambda w: torch.nn.init.normal_(w, 0.0, 0.02), dtype=dtype)
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(1, args.tokens, args.hidden, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(1, args.tokens, args.hidden, generator=g).to(dtype)
    counter.phase = "forward"
    y = moe(x)
    counter.phase = "backward"
    y.backward(dy)
    counter.phase = "idle"
    dist.all_to_all_single = counter.original

    mine = slice(moe.expert_offset, moe.expert_offset + moe.num_local_experts)
    local = int(moe.stats["tokens_per_expert"][mine].sum())
    one_way = (args.tokens * args.top_k - local) * args.hidden * x.element_size()
    return {
        "forward": counter.total("forward", "tokens"),
        "backward": counter.total("backward", "tokens"),
        "counts": counter.total("forward", "counts") + counter.total("backward", "counts"),
        "minimum": 2 * one_way,  # dispatch + combine
        "local": local,
    }


def main() -> None:
    """Parse arguments, spawn each layout, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank (N)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--layouts", default="2:2,4:4,4:2", help="world:ep pairs")
    args = p.parse_args()

    print(f"N={args.tokens} per rank, H={args.hidden}, E={args.experts}, k={args.top_k}, {args.dtype}; bytes summed")
    print("over ranks, one MoE layer; minimum = 2 x (N k - assignments on their own rank) x H x bytes per pass")
    print("counts: bytes of the per-expert count exchange (forward only); local: assignments kept on their rank")
    header = ("world", "ep", "pass", "measured", "minimum", "ratio", "counts", "local")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (5, 3, 8, 12, 12, 6, 7, 6), strict=True)))
    for layout in args.layouts.split(","):
        world, ep = (int(v) for v in layout.split(":"))
        results = run_distributed(_rank, world, ep, args, timeout=600)
        minimum = sum(r["minimum"] for r in results)
        counts = sum(r["counts"] for r in results)
        local = sum(r["local"] for r in results) / (world * args.tokens * args.top_k)
        for phase in ("forward", "backward"):
            measured = sum(r[phase] for r in results)
            extra = f"{counts:>7} {local:>6.1%}" if phase == "forward" else ""
            print(f"{world:>5} {ep:>3} {phase:>8} {measured:>12} {minimum:>12} {measured / minimum:>6.2f} {extra}")


if __name__ == "__main__":
    main()
