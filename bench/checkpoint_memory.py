"""Peak host memory of loading a checkpoint on each rank, the whole-tensor way against the slice way.

    python bench/checkpoint_memory.py                      # a 106M-parameter (424 MB fp32) Llama, no download
    python bench/checkpoint_memory.py --layers 4 --hidden 512
    python bench/checkpoint_memory.py --parts optimizer    # only the optimizer state's figures

It writes one model's native checkpoint twice (saved at tp=1: one file; saved at tp=2: two files), then for each
layout (dp=2; tp=2, where one rank's share is half the model) and each way of loading spawns 2 fresh gloo processes.
Each builds its rank's model (parameters written once, so that their pages are resident before the load), records
its resident set, resets the kernel's peak (VmHWM, via /proc/self/clear_refs), loads, and reads the peak again:

    whole   the loader before issue 14 (modeling.convert.load_checkpoint: every full tensor of the checkpoint in
            memory, merged over the files, then split_for_rank and load_state_dict)
    slice   training.checkpoint.load_model_weights: this rank's slices only (modeling.shard_files.ShardReader,
            safetensors get_slice), then load_state_dict

and prints, per rank, the peak increase of the resident set during the load against the rank's share (the bytes of
the tensors it holds), also the peak of anonymous memory alone (a thread samples RssAnon every millisecond: the
resident set also counts pages of the memory-mapped files while a reader holds them). The loaded weights of the two
ways are compared (a checksum per rank), so a way that loads less is not counted as cheaper.

The optimizer state (`--parts optimizer`) is measured the same way at dp=2, for the torch engine and DeepSpeed ZeRO-2
(configs/deepspeed/zero2.json), built as training/loop.py builds them (training.optim.build_optimizer,
parallel.engine.build_engine). Two processes per engine take one optimizer step and write their state both ways;
then for each way 2 fresh processes build a fresh engine (no Adam state yet, as at a resume), reset the peak, load:

    whole   the loader before issue 14: torch.load of this rank's whole optimizer state_dict (rank-NNNNN.pt), then
            the optimizer's load_state_dict (under ZeRO the partition's, load_from_fp32_weights)
    slice   training.checkpoint.load_optimizer: optimizer-tpNN-of-NN.safetensors (training.checkpoint.save_optimizer)
            read one parameter at a time through ShardReader and handed to Engine.load_optimizer_tensors

A rank's share is its optimizer state: Adam's two fp32 moments of the whole model for the torch engine, the moments
and the fp32 master of its 1/dp flat partition under ZeRO-2. Both ways' loaded states are compared (a checksum of
Engine.optimizer_tensors per rank).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"dp2": {"tp": 1}, "tp2": {"tp": 2}}
WAYS = ("whole", "slice")


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (the kernel reports kB)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


class AnonPeak:
    """The highest RssAnon seen by a thread sampling /proc/self/status every millisecond while it runs."""

    def __init__(self) -> None:
        self.peak, self._stop = _status("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status("RssAnon"))
            time.sleep(0.001)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status("RssAnon"))


def _load_whole(model, ckpt: Path, state) -> None:
    """The loader as it was: the full state dict of the checkpoint, then this rank's split of it."""
    from modeling.convert import load_checkpoint
    from modeling.native_format import split_for_rank

    _, full = load_checkpoint(ckpt)
    ranks = {"ep_rank": state.ep_rank, "ep_size": state.ep_size}
    model.load_state_dict(split_for_rank(full, model.config, state.tp_rank, state.tp_size, **ranks), strict=False)


def _worker(rank: int, port: int, tp: int, way: str, ckpt: str, model_cfg: dict, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO_ROOT))
    from modeling.config import ModelConfig
    from modeling.llama import LlamaForCausalLM
    from modeling.native_format import model_tensors
    from parallel.state import ParallelState
    from training.checkpoint import load_model_weights

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(minutes=5))
    state = ParallelState.build(tp=tp)
    model = LlamaForCausalLM(ModelConfig(**model_cfg), state, dtype=torch.float32, skip_init=True)
    tensors = model_tensors(model)
    with torch.no_grad():
        for t in tensors.values():
            t.fill_(-1.0)  # resident now: the load's copy into them is not counted as new memory
    share = sum(t.numel() * t.element_size() for t in tensors.values())
    dist.barrier()
    base_rss = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    with AnonPeak() as anon:
        base_anon = _status("RssAnon")
        if way == "whole":
            _load_whole(model, Path(ckpt), state)
        else:
            load_model_weights(model, Path(ckpt), state)
    seconds = time.perf_counter() - start
    result = {
        "rank": rank,
        "share": share,
        "peak": _status("VmHWM") - base_rss,
        "anon_peak": anon.peak - base_anon,
        "kept": _status("RssAnon") - base_anon,
        "seconds": seconds,
        "checksum": sum(float(t.detach().double().sum()) for t in tensors.values()),
    }
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def measure(tp: int, way: str, ckpt: Path, model_cfg: dict) -> list[dict]:
    """Spawn 2 fresh gloo processes at this tensor degree that load `ckpt` one way; each rank's figures."""
    import torch.multiprocessing as mp

    from training.distributed import free_port

    with tempfile.TemporaryDirectory() as out:
        args = (free_port(), tp, way, str(ckpt), model_cfg, out)
        mp.spawn(_worker, args=args, nprocs=2, join=True)
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(2)]


def write_checkpoints(model_cfg: dict, root: Path) -> dict[int, Path]:
    """The same random model saved at tp=1 (save_native) and at tp=2 (the files a tp=2 run writes)."""
    import torch

    from modeling.config import ModelConfig
    from modeling.llama import LlamaForCausalLM
    from modeling.native_format import model_tensors, write_shards
    from parallel.state import ParallelDims, ParallelState

    torch.manual_seed(0)
    config = ModelConfig(**model_cfg)
    model = LlamaForCausalLM(config)
    dirs = {1: root / "saved_tp1", 2: root / "saved_tp2"}
    for tp, out in dirs.items():
        for rank in range(tp):  # each rank of a tp-way run writes its file (write_shards, as save_native does)
            state = ParallelState(dims=ParallelDims(world_size=tp, tp=tp), rank=rank)
            shard = {name: _shard_like(p, rank, tp) for name, p in model_tensors(model).items()}
            write_shards(shard, shard, out, state, config=config)
    return dirs


def _shard_like(p, rank: int, tp: int):
    """Rank `rank`'s shard of a full parameter, carrying its split attributes (what that rank's parameter is)."""
    from parallel.layers import tp_chunk

    dim = getattr(p, "tp_split_dim", None)
    shard = p.detach() if dim is None or tp == 1 else tp_chunk(p.detach(), dim, rank, tp)
    for attr in ("tp_split_dim", "tp_full_size"):
        if hasattr(p, attr):
            setattr(shard, attr, getattr(p, attr))
    return shard


# ---- the optimizer state ----

ENGINES = {"torch": None, "zero2": "configs/deepspeed/zero2.json"}


def _deepspeed_safe_globals() -> list:
    """DeepSpeed's plain classes in a ZeRO state_dict, which the old loader allowed torch.load to build."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _build_engine(kind: str, model_cfg: dict, state, *, skip_init: bool):
    """A dp=2 model under the torch engine or ZeRO-2, built as training/loop.py builds it."""
    import torch

    from configs.sections import OptimSection
    from modeling.config import ModelConfig
    from modeling.llama import LlamaForCausalLM
    from parallel.engine import build_engine
    from training.optim import build_optimizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**model_cfg), state, dtype=torch.float32, skip_init=skip_init)
    if skip_init:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(-1.0)  # resident now, as the model file's weights would be before the optimizer loads
    ds_config = json.loads((REPO_ROOT / ENGINES[kind]).read_text()) if ENGINES[kind] else None
    optimizer, scheduler = build_optimizer(model, OptimSection(), max_steps=10)
    return build_engine(
        model, optimizer, scheduler, state=state, grad_accum=1, grad_clip=1.0, ds_config=ds_config, micro_batch_size=1
    )


def _optimizer_share(engine) -> int:
    """Bytes of this rank's optimizer state: 2 fp32 moments per parameter, or moments and master of its partition."""
    if engine.zero_stage == 0:
        return sum(2 * p.numel() * 4 for p in engine.module.parameters() if p.requires_grad)
    from parallel.optimizer_state import zero_groups

    return sum(3 * flat.numel() * 4 for _, flat in zero_groups(engine.optimizer))


def _opt_worker(rank: int, port: int, kind: str, way: str, ckpt: str, model_cfg: dict, out_dir: str) -> None:
    """One rank: `way` "save" steps once and writes both formats; "whole" / "slice" load one and measure."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO_ROOT))
    from parallel.state import ParallelState
    from training.checkpoint import load_optimizer, save_optimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(minutes=10))
    state = ParallelState.build(tp=1)  # dp=2
    engine = _build_engine(kind, model_cfg, state, skip_init=way != "save")
    old_file = Path(ckpt) / f"rank-{rank:05d}.pt"
    if way == "save":
        ids = torch.randint(model_cfg["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(rank))
        engine.backward(engine.forward(ids[:, :-1], targets=ids[:, 1:]).loss)
        engine.step()
        torch.save({"optimizer": engine.optimizer.state_dict()}, old_file)  # what a rank wrote before issue 14
        save_optimizer(engine, Path(ckpt), state)
        dist.barrier()
        dist.destroy_process_group()
        return
    share = _optimizer_share(engine)
    dist.barrier()
    base_rss = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    with AnonPeak() as anon:
        base_anon = _status("RssAnon")
        if way == "whole":
            globals_ = _deepspeed_safe_globals() if engine.zero_stage else []
            with torch.serialization.safe_globals(globals_):
                sd = torch.load(old_file, map_location="cpu", weights_only=True)["optimizer"]
            if engine.zero_stage:  # ZeRO indexes the list by data-parallel rank
                engine.optimizer.load_state_dict([sd] * 2, load_optimizer_states=True, load_from_fp32_weights=True)
            else:
                engine.optimizer.load_state_dict(sd)
            del sd
        else:
            load_optimizer(engine, Path(ckpt), state)
    seconds = time.perf_counter() - start
    result = {
        "rank": rank,
        "share": share,
        "peak": _status("VmHWM") - base_rss,
        "anon_peak": anon.peak - base_anon,
        "kept": _status("RssAnon") - base_anon,  # what stays: the state the load created
        "seconds": seconds,
        "file": old_file.stat().st_size
        if way == "whole"
        else sum(f.stat().st_size for f in Path(ckpt).glob("optimizer-*.safetensors")),
    }
    tensors = engine.optimizer_tensors()  # collective under ZeRO: whole over dp
    result["checksum"] = sum(float(t.double().sum()) for entry in tensors.values() for t in entry.values())
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def measure_optimizer(kind: str, way: str, ckpt: Path, model_cfg: dict) -> list[dict]:
    """Spawn 2 fresh gloo processes (dp=2) that save (way "save") or load the optimizer state one way."""
    import torch.multiprocessing as mp

    from training.distributed import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_opt_worker, args=(free_port(), kind, way, str(ckpt), model_cfg, out), nprocs=2, join=True)
        return [] if way == "save" else [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(2)]


def optimizer_part(model_cfg: dict, root: Path) -> tuple[list[tuple], dict]:
    """For each engine: one step and both formats written, then each way's load measured; rows for the table."""
    rows, everything = [], {}
    for kind in ENGINES:
        ckpt = root / f"optimizer_{kind}"
        ckpt.mkdir()
        measure_optimizer(kind, "save", ckpt, model_cfg)
        results = {way: measure_optimizer(kind, way, ckpt, model_cfg) for way in WAYS}
        everything[f"dp2_{kind}"] = results
        for rank in range(2):
            sums = [results[way][rank]["checksum"] for way in WAYS]
            if not math.isclose(*sums, rel_tol=1e-9):
                sys.exit(f"error: {kind} rank {rank}: the two ways loaded different optimizer states ({sums})")
        rows += [("dp2", kind, way, r) for way in WAYS for r in results[way]]
    return rows, everything


def cpu_name() -> str:
    """The CPU model, as /proc/cpuinfo names it, and the number of cores this process may use."""
    try:
        name = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M).group(1)
    except (OSError, AttributeError):
        name = platform.processor() or "unknown CPU"
    return f"{name}, {len(os.sched_getaffinity(0))} cores"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments: the model's shape, which parts to measure."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--parts", nargs="+", choices=("model", "optimizer"), default=["model", "optimizer"])
    ap.add_argument("--json", type=Path, help="also write every rank's figures to this file")
    return ap.parse_args(argv)


def model_part(model_cfg: dict, root: Path) -> tuple[list[tuple], dict]:
    """The model's checkpoints written, then every (layout, saved degree, way) measured; rows for the table."""
    rows, everything = [], {}
    dirs = write_checkpoints(model_cfg, root)
    total = sum(f.stat().st_size for f in dirs[1].glob("*.safetensors"))
    print(f"model checkpoint {total / 2**20:.1f} MiB (fp32)", flush=True)
    for layout, saved in (("dp2", 1), ("tp2", 1), ("tp2", 2)):
        results = {way: measure(LAYOUTS[layout]["tp"], way, dirs[saved], model_cfg) for way in WAYS}
        everything[f"{layout}_saved_tp{saved}"] = results
        for rank in range(2):
            sums = {results[way][rank]["checksum"] for way in WAYS}
            if len(sums) != 1:
                sys.exit(f"error: {layout} rank {rank}: the two ways loaded different weights ({sums})")
        rows += [(layout, f"tp={saved}", way, r) for way in WAYS for r in results[way]]
    return rows, everything


def print_table(title: str, second: str, rows: list[tuple]) -> None:
    """One line per (layout, `second` column, way, rank): share, peaks and their ratios to the share, in MiB."""
    print(f"\n{title}; MiB")
    head = f"{'layout':<7}{second:<8}{'way':<7}{'rank':>4}{'share':>9}{'peak RSS':>10}{'ratio':>7}"
    print(head + f"{'peak anon':>11}{'ratio':>7}{'kept':>8}{'seconds':>9}")
    for layout, col, way, r in rows:
        mib = {k: r.get(k, float("nan")) / 2**20 for k in ("share", "peak", "anon_peak", "kept")}
        print(
            f"{layout:<7}{col:<8}{way:<7}{r['rank']:>4}{mib['share']:>9.1f}{mib['peak']:>10.1f}"
            f"{r['peak'] / r['share']:>7.2f}{mib['anon_peak']:>11.1f}{r['anon_peak'] / r['share']:>7.2f}"
            f"{mib['kept']:>8.1f}{r['seconds']:>9.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    """Write the checkpoints, measure every (layout or engine, way), print the tables."""
    import torch

    args = parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # inherited by the spawned processes, before DeepSpeed's import
    model_cfg = {
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
    }
    print(f"{cpu_name()}; torch {torch.__version__}", flush=True)
    everything = {}
    with tempfile.TemporaryDirectory() as root:
        if "model" in args.parts:
            rows, everything["model"] = model_part(model_cfg, Path(root))
            print_table(
                "peak increase of each process's memory during the model's load, against its share", "saved", rows
            )
        if "optimizer" in args.parts:
            rows, everything["optimizer"] = optimizer_part(model_cfg, Path(root))
            title = "peak increase of each process's memory during the optimizer state's load (dp=2), against its share"
            print_table(title, "engine", rows)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "model": model_cfg, "runs": everything}, indent=2))


if __name__ == "__main__":
    main()
