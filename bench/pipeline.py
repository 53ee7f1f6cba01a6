"""Pipeline step time against the ideal (pp=1 time / p plus the analytic bubble), and activation memory per stage.

    python bench/pipeline.py                                  # p=2; m = 2 4 8; 1f1b gpipe interleaved_1f1b zbv
    python bench/pipeline.py --pp 2 4 --microbatches 4 8      # p=4 oversubscribes a 2-core machine (see below)
    python bench/pipeline.py --hidden 512 --layers 16 --steps 5

The model is this project's own decoder-only Llama (modeling.llama.LlamaForCausalLM, fp32), wired as the trainer
wires it at parallel.pp > 1 (training/pipeline_run.py): PipelinePlan.build cuts the layers, each rank builds its
`plan.part(pp_rank)`, one StageModule per stage of the rank, and parallel.pipeline.PipelineSchedule runs them with
torch.distributed.pipelining on gloo. A step is forward and backward of m microbatches through the schedule (no
optimizer). The same model and the same m microbatches run in one process at pp=1 in the same invocation
(micro-batch after micro-batch, `(loss / m).backward()`, as the trainer accumulates); every process has one thread.

Time. Step time = the slowest rank's (a barrier before and after each step), median over --steps after one warm-up
step. The ideal for p ranks and m microbatches is t1 / p plus the bubble:

    1f1b, gpipe:                   t1 / p x (m + p - 1) / m        (the bubble is (p-1)/(m+p-1) of the step)
    interleaved_1f1b, zbv (v=2):   t1 / p x (m + (p - 1) / v) / m  (zbv taken as interleaved with v=2: approximate)

and the printed ratio is measured / ideal (1.00 = the ideal; above it: p2p, the schedule's bookkeeping, and stages
that are not equally heavy). With C cores, p processes of one thread each reach t1 / p only while p <= C.

Memory. Bytes of the tensors saved for backward that are alive at once, per rank: a saved_tensors_hooks pair
counts each storage once while some autograd node holds it (parameters and their views left out; the fused loss's
exp(z - m) buffer included: parallel.cross_entropy saves it with save_for_backward). The peak over one step is
printed for the first stage's rank (rank 0) and the last stage's rank, against 1F1B's bound: p microbatches in
flight x the bytes one microbatch saves on that rank (its stages run forward on one microbatch alone, with the
same hooks).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.config import ModelConfig  # noqa: E402
from modeling.llama import LlamaForCausalLM  # noqa: E402
from modeling.pipeline import PipelinePlan, StageModule  # noqa: E402
from parallel.pipeline import MULTI_STAGE, PipelineSchedule  # noqa: E402
from parallel.state import ParallelConfigError, ParallelState  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402

SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b", "zbv")


def _config(args: argparse.Namespace) -> ModelConfig:
    """The benchmark's Llama (untied: no embedding group traffic to time)."""
    return ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )


def _batch(args: argparse.Namespace, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's (m x B, T) input ids and targets, the same in every process."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(args.vocab, (m * args.micro_batch, args.seq + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


class _Held:
    """A saved tensor as packed by _SavedBytes: alive exactly as long as autograd keeps it."""

    __slots__ = ("tensor", "owner", "key")

    def __init__(self, owner: _SavedBytes, tensor: torch.Tensor, key: int, nbytes: int) -> None:
        self.tensor, self.owner, self.key = tensor, owner, key
        owner.add(key, nbytes)

    def __del__(self) -> None:
        self.owner.remove(self.key)


class _SavedBytes:
    """Live bytes of the storages saved for backward (each storage once), and their peak."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.refs: dict[int, list[int]] = {}  # storage ptr -> [references, bytes]
        self.live = self.peak = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def add(self, key: int, nbytes: int) -> None:
        """One more reference to a storage; its bytes count from the first."""
        entry = self.refs.setdefault(key, [0, nbytes])
        entry[0] += 1
        if entry[0] == 1:
            self.live += nbytes
            self.peak = max(self.peak, self.live)

    def remove(self, key: int) -> None:
        """One reference less; the bytes go with the last."""
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[key]

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.params:  # parameters (and their views) are not activations
            return t
        return _Held(self, t, key, storage.nbytes())

    @staticmethod
    def _unpack(held):
        return held.tensor if isinstance(held, _Held) else held


def _stage_bytes(stages: list[StageModule], args: argparse.Namespace, params: list) -> int:
    """Bytes one microbatch saves for backward on this rank: each of its stages' forward on one microbatch alone."""
    inputs, targets = _batch(args, 1)
    tracker = _SavedBytes(params)
    outs = []
    for stage in stages:
        if stage.first:
            x = inputs
        else:
            x = torch.randn(args.micro_batch, args.seq, args.hidden, requires_grad=True)
        with tracker.hooks:
            outs.append(stage(x, targets=targets))
        stage.ce_losses.clear()
    live = tracker.live
    del outs
    return live


def _pp1_step(model: LlamaForCausalLM, inputs: torch.Tensor, targets: torch.Tensor, m: int, b: int) -> None:
    """The step at pp=1: micro-batch after micro-batch, `(loss / m).backward()`, as the trainer accumulates."""
    for j in range(m):
        rows = slice(j * b, (j + 1) * b)
        (model(inputs[rows], targets=targets[rows]).loss / m).backward()


def _pp_rank(rank: int, world: int, args: argparse.Namespace) -> list[dict]:
    """At pp=world: for every (schedule, m), step times at pp=1 and pp=world, and this rank's peak saved bytes.

    The pp=1 step runs on rank 0 alone (the other ranks wait at a barrier, their cores idle), alternating with the
    pipeline's steps, so that load that comes and goes on the machine hits both alike.
    """
    torch.set_num_threads(1)
    state = ParallelState.build(pp=world)
    config = _config(args)
    whole = None
    if rank == 0:
        torch.manual_seed(0)
        whole = LlamaForCausalLM(config, ParallelState(), dtype=torch.float32)
    out = []
    for schedule in args.schedules:
        v = 2 if schedule in MULTI_STAGE else 1
        for m in args.microbatches:
            row = {"schedule": schedule, "m": m, "v": v, "rank": rank}
            try:  # the plan's checks, and PipelineSchedule's of this torch (zbv needs 2.13)
                plan = PipelinePlan.build(config, pp=world, schedule=schedule, stages_per_rank=v, microbatches=m)
                torch.manual_seed(0)
                model = LlamaForCausalLM(config, state, dtype=torch.float32, part=plan.part(rank))
                stages = [StageModule(model, plan, s, microbatches=m) for s in plan.rank_stages(rank)]
                io = [st.io_meta(args.micro_batch, args.seq, torch.float32) for st in stages]
                pipe = PipelineSchedule(
                    stages,
                    [st.stage for st in stages],
                    io,
                    state=state,
                    schedule=schedule,
                    microbatches=m,
                    device=torch.device("cpu"),
                )
            except ParallelConfigError as e:
                out.append({**row, "refused": str(e)})
                continue
            inputs, targets = _batch(args, m)
            times, times1 = [], []
            for _round in range(1 + args.steps):  # the first round is a warm-up
                if whole is not None:
                    whole.zero_grad(set_to_none=True)
                    t0 = time.perf_counter()
                    _pp1_step(whole, inputs, targets, m, args.micro_batch)
                    times1.append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
                dist.barrier(group=state.pp_group)
                t0 = time.perf_counter()
                pipe.step(inputs, targets)
                dist.barrier(group=state.pp_group)
                times.append(time.perf_counter() - t0)
                for st in stages:
                    st.ce_losses.clear()
            params = list(model.parameters())
            tracker = _SavedBytes(params)
            model.zero_grad(set_to_none=True)
            with tracker.hooks:
                pipe.step(inputs, targets)
            for st in stages:
                st.ce_losses.clear()
            per_micro = _stage_bytes(stages, args, params)
            dist.barrier(group=state.pp_group)
            row.update(
                times=times[1:],
                times1=times1[1:],
                peak=tracker.peak,
                per_micro=per_micro,
                stages=[st.stage for st in stages],
                layers=[len(plan.layers[s]) for s in plan.rank_stages(rank)],
            )
            out.append(row)
    return out


def _ideal(t1: float, p: int, m: int, v: int) -> float:
    """t1 / p plus the analytic bubble: (p-1)/v of m + (p-1)/v microbatch slots are idle."""
    return t1 / p * (m + (p - 1) / v) / m


def _cpu() -> str:
    """The CPU model, as /proc/cpuinfo names it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _mib(n: float) -> str:
    return f"{n / 2**20:7.2f}"


def main() -> None:
    """Parse arguments, time pp=1 and every pp, print the tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", type=int, nargs="+", default=[2], help="pipeline degrees (one gloo process per rank)")
    ap.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8], help="m: microbatches per step")
    ap.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    ap.add_argument("--steps", type=int, default=3, help="timed steps per case, after one warm-up step")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=2)
    args = ap.parse_args()
    if min(args.pp) < 2 or args.steps < 1 or min(args.microbatches) < 1:
        sys.exit("error: --pp must be >= 2 (pp=1 is always measured), --steps and --microbatches >= 1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the children inherit it: one thread per process

    cores = os.cpu_count()
    print(f"{_cpu()}, {cores} cores, torch {torch.__version__}, gloo, fp32, one thread per process")
    print(f"load average at start: {_load()} (other work on the machine slows the pipeline's ranks)")
    print(
        f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, intermediate {args.intermediate}, "
        f"vocab {args.vocab}; micro-batch {args.micro_batch} x seq {args.seq}; median of {args.steps} steps"
    )
    for p in args.pp:
        if cores is not None and p > cores:
            print(f"\npp={p} > {cores} cores: the processes share cores, the ideal t1/p cannot be reached")
        results = run_distributed(_pp_rank, p, args, timeout=1800)
        print(f"\npp={p}: t1 = the pp=1 step, pp = the pipeline's step, alternating (medians)")
        print("ideal = t1/p x (m + (p-1)/v) / m; ratio = pp / ideal, median over the pairs (range); speedup = t1 / pp")
        head = ("schedule", "m", "v", "t1 ms", "pp ms", "ideal ms", "ratio", "(range)", "speedup")
        print(" ".join(f"{h:>{w}}" for h, w in zip(head, (16, 3, 2, 8, 8, 8, 6, 11, 7), strict=True)))
        for row in results[0]:
            if "refused" in row:
                print(f"{row['schedule']:>16} {row['m']:>3}  refused: {row['refused']}")
                continue
            m, v = row["m"], row["v"]
            ratios = [t / _ideal(t1, p, m, v) for t, t1 in zip(row["times"], row["times1"], strict=True)]
            t, t1 = statistics.median(row["times"]), statistics.median(row["times1"])
            print(
                f"{row['schedule']:>16} {m:>3} {v:>2} {t1 * 1e3:8.0f} {t * 1e3:8.0f} {_ideal(t1, p, m, v) * 1e3:8.0f} "
                f"{statistics.median(ratios):6.2f} ({min(ratios):.2f}-{max(ratios):.2f}) {t1 / t:7.2f}"
            )
        print(f"\npp={p}: peak saved-for-backward MiB per rank over one step; bound = p x (one microbatch alone)")
        head = ("schedule", "m", "rank", "stages", "layers", "1 mb", "peak", "bound", "peak/bound", "in flight")
        print(" ".join(f"{h:>{w}}" for h, w in zip(head, (16, 3, 4, 7, 7, 7, 7, 7, 10, 9), strict=True)))
        for i, row in enumerate(results[0]):
            if "refused" in row:
                continue
            for r in sorted({0, p - 1}):
                x = results[r][i]
                stages, layers = ",".join(map(str, x["stages"])), ",".join(map(str, x["layers"]))
                bound = p * x["per_micro"]
                print(
                    f"{x['schedule']:>16} {x['m']:>3} {r:>4} {stages:>7} {layers:>7} {_mib(x['per_micro'])} "
                    f"{_mib(x['peak'])} {_mib(bound)} {x['peak'] / bound:10.2f} {x['peak'] / x['per_micro']:9.2f}"
                )

    print(f"\nload average at the end: {_load()}")


if __name__ == "__main__":
    main()
