"""Per-rank bytes of parameters, gradients and optimizer states under ZeRO 0-3, next to the ZeRO paper's formulas.

    python bench/zero_memory.py                           # 2 ranks, fp32, stages 0 1 2 3, a 10M-parameter Llama
    python bench/zero_memory.py --ranks 4 --dtype bf16 --stages 2 3

For each stage it spawns N gloo processes on the CPU (DS_ACCELERATOR=cpu) and builds what the trainer builds: the
model (LlamaForCausalLM, fp32 parameters as under any DeepSpeed json), AdamW (training.optim.build_optimizer) and the
engine (parallel.engine.build_engine with configs/deepspeed/zero{stage}.json, "auto" values filled from the
training values), runs one training step (so that Adam's states exist), then a second one, measuring what each rank
holds. A tensor counts with its whole storage (DeepSpeed's flat buffers include their alignment padding), and each
storage once, in the first component it belongs to:

    params     parameter storage: the module's parameters (ZeRO-1/2: views of DeepSpeed's flat buffer); ZeRO-3: the
               partitions `p.ds_tensor`, plus the parameters under stage3_param_persistence_threshold that every
               rank keeps whole
    master     the fp32 master partition DeepSpeed keeps for its optimizer (single_partition_of_fp32_groups for
               ZeRO-1/2, fp32_partitioned_groups_flat for ZeRO-3); none under torch DDP (stage 0)
    optimizer  Adam's exp_avg and exp_avg_sq
    grads      gradient storage kept from the end of backward to the optimizer step, measured at the accumulation
               boundary: p.grad (stage 0: the full gradients), DeepSpeed's partitioned buffers (averaged_gradients
               for ZeRO-1/2, grad_partitions_flat_buffer for ZeRO-3)
    bucket     not in the total: DeepSpeed's reduce bucket (reduce_bucket_size elements), the largest storage seen
               during backward. A communication buffer of fixed size, allocated per backward by ZeRO-1/2 and kept by
               ZeRO-3; gradients pass through it on their way to the partition

The paper's formulas (Rajbhandari et al. 2019, Fig. 1) with Psi parameters, N data-parallel ranks:
fp32 (Adam K=8: exp_avg + exp_avg_sq, no master copy): params 4Psi (ZeRO-3: 4Psi/N), grads 4Psi (ZeRO-2/3: 4Psi/N),
optimizer 8Psi (ZeRO-1+: 8Psi/N). bf16 mixed precision (K=12: fp32 master + Adam): params 2Psi, grads 2Psi, optimizer
8Psi and master 4Psi, partitioned the same way. A component measured without a formula (DeepSpeed's fp32 master in
fp32 training) is listed with ratio "extra".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("params", "master", "optimizer", "grads")
MODEL = {  # every matrix above ZeRO-3's persistence threshold (1e5 elements), so that ZeRO-3 partitions it
    "vocab_size": 4096,
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 6,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}
SEQ_LEN = 64


def paper_formula(stage: int, ranks: int, psi: int, dtype: str) -> dict[str, float]:
    """Bytes per rank of each component by the ZeRO paper for this precision (master is 0 in fp32)."""
    n = ranks
    if dtype == "fp32":
        p, g, o, m = 4 * psi, 4 * psi, 8 * psi, 0
    else:
        p, g, o, m = 2 * psi, 2 * psi, 8 * psi, 4 * psi
    return {
        "params": p / n if stage >= 3 else p,
        "master": m / n if stage >= 1 else m,
        "optimizer": o / n if stage >= 1 else o,
        "grads": g / n if stage >= 2 else g,
    }


class _Storages:
    """Sums the bytes of distinct storages; a storage counts once, in the first component that claims it."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def claim(self, tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or t.numel() == 0:
                continue
            s = t.untyped_storage()
            if s.data_ptr() not in self.seen:
                self.seen.add(s.data_ptr())
                total += s.nbytes()
        return total


def _bucket_tensors(zero_opt) -> list:
    out = []
    for bucket in getattr(zero_opt, "ipg_buckets", {}).values():
        buf = bucket.buffer
        out += [b for b in (buf if isinstance(buf, list) else [buf]) if b is not None]
    return out


def _measure_rank(rank: int, ranks: int, stage: int, dtype: str, grad_accum: int) -> dict:
    """Build model, optimizer and engine as the trainer does, train two steps, measure this rank's storages."""
    import torch

    from configs.sections import OptimSection, resolve_path
    from modeling.config import ModelConfig
    from modeling.llama import LlamaForCausalLM
    from parallel.engine import build_engine
    from parallel.state import ParallelState
    from training.optim import build_optimizer

    state = ParallelState.build()
    torch.manual_seed(0)
    mc = ModelConfig(**MODEL)
    model = LlamaForCausalLM(mc, state, dtype=torch.float32)  # the trainer's parameter dtype under a DeepSpeed json
    psi = sum(p.numel() for p in model.parameters())
    params = list(model.parameters())
    optimizer, scheduler = build_optimizer(model, OptimSection(), max_steps=10)
    ds_config = json.loads(resolve_path(f"configs/deepspeed/zero{stage}.json").read_text())
    bf16 = dtype == "bf16"
    engine = build_engine(
        model,
        optimizer,
        scheduler,
        state=state,
        grad_accum=grad_accum,
        grad_clip=1.0,
        ds_config=ds_config,
        micro_batch_size=1,
        bf16=bf16,
    )
    zero_opt = engine.ds.optimizer if stage > 0 else None
    bucket_peak = 0

    def track_bucket(_: torch.Tensor) -> None:
        nonlocal bucket_peak
        bucket_peak = max(bucket_peak, _Storages().claim(_bucket_tensors(zero_opt)))

    if zero_opt is not None and stage < 3:  # ZeRO-3 keeps its bucket: read it after the step
        for p in params:
            p.register_post_accumulate_grad_hook(track_bucket)

    g = torch.Generator().manual_seed(1234 + rank)
    grads = 0
    for _step in range(2):
        for _micro in range(grad_accum):
            ids = torch.randint(mc.vocab_size, (1, SEQ_LEN + 1), generator=g)
            engine.backward(engine.forward(ids[:, :-1], targets=ids[:, 1:]).loss)
        # the accumulation boundary: what is kept for the optimizer step
        seen = _Storages()
        bucket_ids = {t.untyped_storage().data_ptr() for t in _bucket_tensors(zero_opt)} if zero_opt else set()
        seen.seen |= bucket_ids  # p.grad views into the bucket are the bucket, not a kept gradient
        kept = [p.grad for p in params]
        if stage in (1, 2):
            kept += [t for ts in zero_opt.averaged_gradients.values() for t in (ts or [])]
        if stage == 3:
            kept.append(zero_opt.grad_partitions_flat_buffer)
        grads = seen.claim(kept)
        engine.step()

    seen = _Storages()
    persistent = 0
    if stage == 3:
        param_tensors = [p.ds_tensor for p in params] + [p.data for p in params]
        persistent = sum(p.numel() for p in params if p.data.numel() > 0)
        bucket_peak = _Storages().claim(_bucket_tensors(zero_opt))
    else:
        param_tensors = [p.data for p in params]
    measured = {"params": seen.claim(param_tensors)}
    if stage in (1, 2):
        measured["master"] = seen.claim(zero_opt.single_partition_of_fp32_groups)
    elif stage == 3:
        measured["master"] = seen.claim(zero_opt.fp32_partitioned_groups_flat)
    else:
        measured["master"] = 0
    inner = zero_opt.optimizer if zero_opt is not None else engine.optimizer
    states = [s[k] for s in inner.state.values() for k in ("exp_avg", "exp_avg_sq") if k in s]
    measured["optimizer"] = seen.claim(states)
    measured["grads"] = grads
    return {
        "rank": rank,
        "psi": psi,
        "measured": measured,
        "bucket": bucket_peak,
        "persistent_params": persistent,
        "param_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def _worker(rank: int, ranks: int, port: int, stage: int, dtype: str, grad_accum: int, out_dir: str) -> None:
    import logging
    import warnings

    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO_ROOT))
    # the tables are the output: DeepSpeed's info lines and torch's deprecation notices would bury them
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(ranks))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=ranks, timeout=timedelta(minutes=5))
    try:
        result = _measure_rank(rank, ranks, stage, dtype, grad_accum)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
    # measured and written: leave without the interpreter's teardown, in which about one ZeRO-3 worker in five
    # aborted here ("terminate called without an active exception", a C++ thread still joinable at exit)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def measure(stage: int, ranks: int, dtype: str = "fp32", grad_accum: int = 1) -> list[dict]:
    """Spawn `ranks` gloo processes, train two steps at this ZeRO stage, return each rank's measurements."""
    import torch.multiprocessing as mp

    sys.path.insert(0, str(REPO_ROOT))
    from training.distributed import free_port

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the children inherit it before they import DeepSpeed
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(ranks, free_port(), stage, dtype, grad_accum, out), nprocs=ranks, join=True)
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(ranks)]


def _mb(x: float) -> str:
    return f"{x / 2**20:9.3f}"


def report(stage: int, ranks: int, dtype: str, results: list[dict]) -> str:
    """The table of one stage: the largest rank's bytes per component next to the paper's, and their ratio."""
    psi = results[0]["psi"]
    formula = paper_formula(stage, ranks, psi, dtype)
    worst = {c: max(r["measured"][c] for r in results) for c in COMPONENTS}
    lines = [
        f"ZeRO-{stage}, {ranks} ranks, {dtype} (parameters stored as {results[0]['param_dtype']}), "
        f"Psi = {psi:,} parameters; MiB on the largest rank",
        f"  {'component':<10} {'measured':>9} {'paper':>9}  ratio",
    ]
    for c in COMPONENTS:
        ratio = "-" if worst[c] == formula[c] == 0 else "extra" if formula[c] == 0 else f"{worst[c] / formula[c]:.3f}"
        lines.append(f"  {c:<10} {_mb(worst[c])} {_mb(formula[c])}  {ratio}")
    total_m, total_f = sum(worst.values()), sum(formula.values())
    lines.append(f"  {'total':<10} {_mb(total_m)} {_mb(total_f)}  {total_m / total_f:.3f}")
    bucket = max(r["bucket"] for r in results)
    if stage:
        lines.append(f"  reduce bucket (transient, not in the total): {_mb(bucket).strip()} MiB")
    if stage == 3:
        kept = max(r["persistent_params"] for r in results)
        lines.append(f"  parameters kept whole under stage3_param_persistence_threshold: {kept:,} elements")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2, help="data-parallel ranks (gloo processes)")
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="training precision (train.dtype)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (DeepSpeed keeps more at >1)")
    ap.add_argument("--json", type=Path, help="also write every rank's measurements to this file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Measure each requested stage and print its table."""
    args = parse_args(argv)
    if args.ranks < 1 or args.grad_accum < 1:
        sys.exit("error: --ranks and --grad-accum must be >= 1")
    everything = {}
    for stage in args.stages:
        results = measure(stage, args.ranks, args.dtype, args.grad_accum)
        everything[f"zero{stage}"] = {"formula": paper_formula(stage, args.ranks, results[0]["psi"], args.dtype)}
        everything[f"zero{stage}"]["ranks"] = results
        print(report(stage, args.ranks, args.dtype, results), flush=True)
        print(flush=True)
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
