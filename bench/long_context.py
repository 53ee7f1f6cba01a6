"""Context parallelism: activation memory per rank against 1/cp, the longest sequence in a budget, bytes moved.

    python bench/long_context.py                                   # seq 1024 2048; cp 1 2 4; ulysses and ring
    python bench/long_context.py --seq 2048 4096 8192              # the issue's lengths (slow on 2 cores, see README)
    python bench/long_context.py --cp 1 2 --kinds ring --budget-mib 256
    python bench/long_context.py --budget-mib 256 --check          # and train one step at each predicted length

The model is this project's own Llama (modeling.llama.LlamaForCausalLM, fp32, untied), built in each of cp spawned
gloo processes with ParallelState.build(cp=cp, cp_attention=kind), so that its forward splits the sequence as the
trainer does (LlamaForCausalLM.local and attention_inputs: rank r keeps chunks r and 2cp-1-r of 2cp). One training
forward and backward of one micro-batch per (cp, kind, seq), the same token ids on every rank; every process has
one thread.
At cp = 1 the kinds are the same program (plain SDPA): it runs once.

Memory, two figures per rank, each the peak over the step:

    saved    bytes of the tensors saved for backward alive at once (bench/pipeline.py's saved_tensors_hooks count:
             each storage once while an autograd node holds it, parameters left out). The activation memory.
    working  bytes of every tensor created during the step alive at once (a TorchDispatchMode that counts each
             output storage until its last tensor dies): saved tensors plus the transients of the op running
             (attention's score blocks, the gradients in flight). Parameters and their .grad are left out (their
             .grad is allocated before the step).

The expectation is the cp = 1 figure / cp; the ratio printed is measured / expectation (1.00 = a perfect split).
ratio+w keeps w out of the division: the q/k/v and gate/up weights that parallel.layers.fused_column_parallel
concatenates and saves for backward, the same bytes on every rank whatever the sequence.

Budget (activations only: parameters, gradients and optimizer state come on top). For each (cp, kind) the
per-token slope of the saved bytes between the two longest sequences measured, b = (M(T2) - M(T1)) / (T2 - T1),
and its intercept a = M(T2) - b T2 give the longest sequence whose activations fit --budget-mib:
T_max = (budget - a) / b, rounded down to a multiple of 2 cp (--check then runs one step at each T_max and prints
its peaks against the budget). Linear is exact when no (T x T) tensor is saved (SDPA's flash kernel, the ring's
blocks); the same is printed for the working peak, where the ring's chunk-by-chunk score blocks
(B, Hq, T/2cp, T/2cp) add a quadratic term that the line does not see (it overestimates T_max there).

Bytes moved. torch.distributed.all_to_all_single (Ulysses), batch_isend_irecv (the ring), all_gather_single
(all_gather_into_tensor before torch 2.13) and all_reduce are wrapped in the spawned processes (parallel.context
and parallel.mappings look them up as dist.<name> at call time); a call's bytes are those leaving the rank:
(cp-1)/cp of an all-to-all's input (equal splits), every isend's tensor, (cp-1) x an all-gather's input. Per layer
(the attention collectives / the layers), per rank, against the analytic volume (e = bytes per element,
Tl = T / cp, B micro-batch, hd head_dim):

    ulysses, forward and backward each:  4 all-to-alls (q, k, v, out / d out, dq, dk, dv), (cp-1)/cp of each leaves:
                                         (cp-1)/cp x B Tl hd e x (2 Hq + 2 Hkv'),  Hkv' = lcm(Hkv, cp) (kv heads are
                                         repeated up to a multiple of cp before the all-to-all)
    ring, forward:                       (cp-1) k/v chunks: (cp-1) x 2 B Hkv Tl hd e
    ring, backward:                      the same k/v chunks again and (cp-1) dk/dv chunks sent in fp32:
                                         (cp-1) x 2 B Hkv Tl hd (e + 4)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pipeline import _cpu, _load, _SavedBytes  # noqa: E402
from modeling.config import ModelConfig  # noqa: E402
from modeling.llama import LlamaForCausalLM  # noqa: E402
from parallel.state import ParallelState  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402

KINDS = ("ulysses", "ring")
MIB = 2**20


def _config(args: argparse.Namespace) -> ModelConfig:
    """The benchmark's Llama (untied, grouped kv heads)."""
    return ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq),
        tie_word_embeddings=False,
    )


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages of every tensor an op returns while the mode is on, alive at once, and their peak."""

    def __init__(self, exclude: set[int]) -> None:
        super().__init__()
        self.exclude = exclude  # storage pointers of tensors made before the step (parameters, their .grad)
        self.refs: dict[int, list[int]] = {}  # storage ptr -> [tensors alive, bytes]
        self.live = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or getattr(t, "_long_context_seen", False):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self.exclude:
                continue
            t._long_context_seen = True  # an in-place op returns its input: count each tensor object once
            entry = self.refs.setdefault(key, [0, storage.nbytes()])
            entry[0] += 1
            if entry[0] == 1:
                self.live += entry[1]
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, key)  # the C++ tensor keeps its Python object: fires at its death
        return out


class _Comm:
    """Wraps the collectives parallel.context and parallel.mappings call; logs (phase, kind, bytes leaving)."""

    # parallel.mappings calls all_gather_single where torch has it (>= 2.13), else all_gather_into_tensor
    GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"

    def __init__(self) -> None:
        self.phase = "idle"
        self.log: list[tuple[str, str, int]] = []
        names = ("all_to_all_single", "batch_isend_irecv", self.GATHER, "all_reduce")
        self.original = {name: getattr(dist, name) for name in names}
        dist.all_to_all_single = self._all_to_all
        dist.batch_isend_irecv = self._p2p
        setattr(dist, self.GATHER, self._all_gather)
        dist.all_reduce = self._all_reduce

    def _all_to_all(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
        n = dist.get_world_size(group)
        self.log.append((self.phase, "a2a", input.numel() * input.element_size() * (n - 1) // n))
        return self.original["all_to_all_single"](output, input, output_split_sizes, input_split_sizes, group, **kw)

    def _p2p(self, ops):
        sent = sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        self.log.append((self.phase, "p2p", sent))
        return self.original["batch_isend_irecv"](ops)

    def _all_gather(self, output, input, group=None, **kw):
        self.log.append((self.phase, "gather", input.numel() * input.element_size() * (dist.get_world_size(group) - 1)))
        return self.original[self.GATHER](output, input, group=group, **kw)

    def _all_reduce(self, tensor, op=dist.ReduceOp.SUM, group=None, **kw):
        self.log.append((self.phase, "reduce", tensor.numel() * tensor.element_size()))
        return self.original["all_reduce"](tensor, op=op, group=group, **kw)

    def total(self, phase: str, kind: str) -> int:
        """Bytes logged for one phase and kind of collective."""
        return sum(b for p, k, b in self.log if p == phase and k == kind)


def _rank(rank: int, world: int, args: argparse.Namespace) -> list[dict]:
    """At cp = world: for every kind and seq, this rank's saved and working peaks, step time and bytes sent."""
    torch.set_num_threads(1)
    comm = _Comm()
    config = _config(args)
    rows = []
    for kind in args.kinds if world > 1 else ["-"]:
        state = ParallelState.build(cp=world, cp_attention=kind if world > 1 else "ulysses")
        torch.manual_seed(0)
        model = LlamaForCausalLM(config, state, dtype=torch.float32)
        params = list(model.parameters())
        for p in params:
            p.grad = torch.zeros_like(p)  # allocated before the step, so that the working peak leaves them out
        exclude = {t.untyped_storage().data_ptr() for p in params for t in (p, p.grad)}
        for seq in args.seq:
            g = torch.Generator().manual_seed(1234)
            ids = torch.randint(args.vocab, (args.micro_batch, seq + 1), generator=g)
            saved, live = _SavedBytes(params), _LiveBytes(exclude)
            comm.log.clear()
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            with saved.hooks, live:
                comm.phase = "forward"
                out = model(ids[:, :-1], targets=ids[:, 1:])
                comm.phase = "backward"
                out.loss.backward()
                comm.phase = "idle"
            seconds = time.perf_counter() - t0
            del out
            rows.append(
                {
                    "kind": kind,
                    "seq": seq,
                    "saved": saved.peak,
                    "working": live.peak,
                    "seconds": seconds,
                    **{f"{p}_{k}": comm.total(p, k) for p in ("forward", "backward") for k in ("a2a", "p2p")},
                    "gather": sum(comm.total(p, "gather") for p in ("forward", "backward")),
                    "reduce": sum(comm.total(p, "reduce") for p in ("forward", "backward")),
                }
            )
    return rows


def _fused_weights(args: argparse.Namespace, e: int = 4) -> int:
    """Bytes of the weight copies the fused q/k/v and gate/up matmuls save for backward, all layers together."""
    hd = args.hidden // args.heads
    per_layer = args.hidden * ((args.heads + 2 * args.kv_heads) * hd + 2 * args.intermediate)
    return args.layers * per_layer * e


def _analytic(kind: str, cp: int, seq: int, args: argparse.Namespace, e: int = 4) -> tuple[int, int]:
    """(forward, backward) bytes one rank sends per layer for `kind` at `cp` (module docstring)."""
    hd = args.hidden // args.heads
    tl = seq // cp
    if kind == "ulysses":
        kv = args.kv_heads * (cp // math.gcd(args.kv_heads, cp))  # lcm(Hkv, cp)
        one = (cp - 1) * args.micro_batch * tl * hd * e * (2 * args.heads + 2 * kv) // cp
        return one, one
    chunk = 2 * args.micro_batch * args.kv_heads * tl * hd  # elements of one k/v (or dk/dv) chunk
    return (cp - 1) * chunk * e, (cp - 1) * chunk * (e + 4)


def _t_max(points: list[tuple[int, int]], budget: float, cp: int) -> tuple[int, float] | None:
    """(longest seq whose bytes fit `budget`, bytes per token) on the line through the two longest (seq, bytes)."""
    if len(points) < 2:
        return None
    (t1, m1), (t2, m2) = sorted(points)[-2:]
    slope = (m2 - m1) / (t2 - t1)
    if slope <= 0:
        return None
    t = (budget - (m2 - slope * t2)) / slope
    return int(t // (2 * cp)) * 2 * cp, slope


def _fmt(fit: tuple[int, float] | None) -> str:
    return "n/a" if fit is None else f"{fit[0]} ({fit[1] / 1024:.1f} KiB/token)"


def main() -> None:
    """Parse arguments, run every cp, print the memory, budget and traffic tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 2048], help="sequence lengths (multiples of 2 cp)")
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4], help="context-parallel degrees (processes)")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--budget-mib", type=float, default=512.0, help="activation memory budget per rank")
    ap.add_argument("--check", action="store_true", help="run one more step at each predicted longest seq")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=1)
    args = ap.parse_args()
    args.seq = sorted(args.seq)
    bad = [s for s in args.seq for cp in args.cp if s % (2 * cp)]
    if bad or min(args.cp) < 1:
        sys.exit(f"error: every --seq must be a multiple of 2 x every --cp (got seq {args.seq}, cp {args.cp})")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the children inherit it: one thread per process

    cores = os.cpu_count()
    print(f"{_cpu()}, {cores} cores, torch {torch.__version__}, gloo, fp32, one thread per process")
    print(f"load average at start: {_load()}")
    print(
        f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, {args.kv_heads} kv heads, "
        f"intermediate {args.intermediate}, vocab {args.vocab}; micro-batch {args.micro_batch}; one step per case"
    )
    results: dict[int, list[list[dict]]] = {}
    for cp in sorted(set(args.cp) | {1}):
        t0 = time.perf_counter()
        results[cp] = run_distributed(_rank, cp, args, timeout=3600)
        print(f"cp={cp}: {time.perf_counter() - t0:.0f} s ({cp} processes on {cores} cores)", flush=True)
    base = {row["seq"]: row for row in results[1][0]}
    fixed = _fused_weights(args)

    print("\nPeak MiB per rank (the largest over the ranks); expect = the cp=1 figure / cp; ratio = measured / expect")
    print(
        f"ratio+w = measured / (w + (cp=1 figure - w) / cp), w = {fixed / MIB:.2f} MiB: the concatenated q/k/v and "
        "gate/up weights that parallel.layers.fused_column_parallel saves per layer, whatever the sequence"
    )
    head = ("cp", "kind", "seq", "saved", "expect", "ratio", "ratio+w", "working", "expect", "ratio", "step s")
    widths = (2, 7, 6, 8, 8, 6, 7, 8, 8, 6, 7)
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True)))
    for cp, ranks in results.items():
        for i, row in enumerate(ranks[0]):
            saved = max(r[i]["saved"] for r in ranks)
            working = max(r[i]["working"] for r in ranks)
            seconds = max(r[i]["seconds"] for r in ranks)
            b = base[row["seq"]]
            es, ew = b["saved"] / cp, b["working"] / cp
            print(
                f"{cp:>2} {row['kind']:>7} {row['seq']:>6} {saved / MIB:8.2f} {es / MIB:8.2f} {saved / es:6.2f} "
                f"{saved / (fixed + (b['saved'] - fixed) / cp):7.2f} "
                f"{working / MIB:8.2f} {ew / MIB:8.2f} {working / ew:6.2f} {seconds:7.2f}"
            )

    print(f"\nLongest seq within {args.budget_mib:g} MiB per rank (line through the two longest seqs; see docstring)")
    print(f"{'cp':>2} {'kind':>7} {'saved':>28} {'working':>28}")
    budget, checks = args.budget_mib * MIB, []
    for cp, ranks in results.items():
        for kind in dict.fromkeys(row["kind"] for row in ranks[0]):
            pts = {m: [] for m in ("saved", "working")}
            for i, row in enumerate(ranks[0]):
                if row["kind"] == kind:
                    for m, v in pts.items():
                        v.append((row["seq"], max(r[i][m] for r in ranks)))
            fits = {m: _t_max(v, budget, cp) for m, v in pts.items()}
            print(f"{cp:>2} {kind:>7} {_fmt(fits['saved']):>28} {_fmt(fits['working']):>28}")
            if fits["saved"] is not None and fits["saved"][0] > 0:
                checks.append((cp, kind, fits["saved"][0]))
    if args.check:
        print("\n--check: one step at each predicted T_max (saved); MiB per rank against the budget")
        print(f"{'cp':>2} {'kind':>7} {'seq':>6} {'saved':>8} {'/budget':>7} {'working':>8} {'/budget':>7}")
        for cp, kind, seq in checks:
            one = argparse.Namespace(**{**vars(args), "seq": [seq], "kinds": [kind] if cp > 1 else list(KINDS)})
            ranks = run_distributed(_rank, cp, one, timeout=3600)
            saved = max(r[0]["saved"] for r in ranks)
            working = max(r[0]["working"] for r in ranks)
            print(
                f"{cp:>2} {kind:>7} {seq:>6} {saved / MIB:8.2f} {saved / budget:7.3f} {working / MIB:8.2f} "
                f"{working / budget:7.3f}",
                flush=True,
            )

    print("\nBytes one rank sends per layer (rank 0; attention collectives / layers), against the analytic volume")
    print("index: all-gathers of the token indices per step (all layers); loss: all-reduces of the loss per step")
    head = ("cp", "kind", "seq", "fwd KiB", "analytic", "ratio", "bwd KiB", "analytic", "ratio", "index B", "loss B")
    widths = (2, 7, 6, 9, 9, 6, 9, 9, 6, 8, 6)
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True)))
    for cp, ranks in results.items():
        if cp == 1:
            continue
        for row in ranks[0]:
            coll = "a2a" if row["kind"] == "ulysses" else "p2p"
            fwd, bwd = (row[f"{p}_{coll}"] / args.layers for p in ("forward", "backward"))
            af, ab = _analytic(row["kind"], cp, row["seq"], args)
            print(
                f"{cp:>2} {row['kind']:>7} {row['seq']:>6} {fwd / 1024:9.1f} {af / 1024:9.1f} {fwd / af:6.2f} "
                f"{bwd / 1024:9.1f} {ab / 1024:9.1f} {bwd / ab:6.2f} {row['gather']:>8} {row['reduce']:>6}"
            )
    print(f"\nload average at the end: {_load()}")


if __name__ == "__main__":
    main()
