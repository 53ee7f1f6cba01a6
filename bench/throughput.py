"""Training throughput of this Llama against transformers' LlamaForCausalLM (sdpa), in one process.

Both models get the same weights, the same batch, dtype and threads, and fused AdamW (ours the trainer's,
training.optim.build_optimizer; transformers' as its Trainer builds it by default); their steps alternate in rounds so
that machine noise hits both alike. Prints tokens/s of each, their ratio (of the median step times, and the median
over same-round step pairs, which stays fair when other processes load the machine for part of the run), and model
FLOPs utilisation as the trainer logs it (training.metrics.mfu: the GPU's dense datasheet peak for its exact part,
TF32 for fp32 unless --no-tf32; on the CPU a 2048^3 matmul timed before and after the rounds, the larger). On the CPU
the process keeps freed memory mapped as the trainer does (train.keep_host_memory), for both models alike.

    python bench/throughput.py --dtype fp32
    python bench/throughput.py --dtype bf16
    python bench/throughput.py --device cuda --dtype bf16 --dim 2048 --layers 16 --heads 16 --kv-heads 8 --seq 2048
    python bench/throughput.py --dtype bf16 --compile   # ours compiled (train.compile), transformers eager + compiled

With --compile, "ours" runs its decoder layers through modeling.compile (as train.compile does), "ours-eager" is the
same model uncompiled, "hf" stays eager and "hf-compiled" is a second transformers model under torch.compile (its
whole forward; same weights, same batch); each compiled model's first step, the compilation, is reported on its
own line and kept out of the rates.

Targets on the CPU for dim 512, 8 layers, 8 heads, 4 kv heads, seq 512, batch 4: ratio >= 1.0 fp32, >= 1.2 bf16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.sections import OptimSection  # noqa: E402
from modeling.compile import compile_layers  # noqa: E402
from modeling.config import ModelConfig  # noqa: E402
from modeling.llama import LlamaForCausalLM  # noqa: E402
from training.distributed import keep_host_memory, set_fp32_matmul_precision  # noqa: E402
from training.metrics import flops_per_token, gpu_peak, mfu, peak_flops  # noqa: E402
from training.optim import build_optimizer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    """Wait for queued GPU work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_is_listed(device: torch.device) -> bool:
    """Whether this GPU's peak comes from training.metrics' table of parts (else it was timed)."""
    return gpu_peak(torch.cuda.get_device_name(device)) is not None


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The two models with identical weights, and their optimizers."""
    import transformers

    cfg = ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.dim,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq),
    )
    torch.manual_seed(0)
    ours = LlamaForCausalLM(cfg, device=device).to(dtype)
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf_dict(), attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(hf_cfg).to(device=device, dtype=dtype)
    hf.load_state_dict(ours.state_dict())
    models = {"ours": ours, "hf": hf}
    if args.compile:
        ours_eager = LlamaForCausalLM(cfg, device=device).to(dtype)
        ours_eager.load_state_dict(ours.state_dict())
        models["ours-eager"] = ours_eager  # the baseline that compilation is measured against
        compile_layers(ours)  # regional, as train.compile does
        hf_compiled = transformers.LlamaForCausalLM(hf_cfg).to(device=device, dtype=dtype)
        hf_compiled.load_state_dict(ours.state_dict())
        hf_compiled.compile()  # transformers' model as a user would compile it: the whole forward
        models["hf-compiled"] = hf_compiled
    # ours: the trainer's optimizer (training.optim.build_optimizer: fused AdamW, decay on matrices only);
    # transformers: what its Trainer builds by default (optim="adamw_torch_fused": torch's AdamW, fused=True)
    optim_cfg = OptimSection(lr=1e-4, warmup_steps=0)
    opts = {
        name: build_optimizer(m, optim_cfg, max_steps=1)[0]
        if name.startswith("ours")
        else torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
        for name, m in models.items()
    }
    return cfg, models, opts


def main() -> None:
    """Parse, build, alternate timed steps, report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=None, help="default: Llama's 8/3 * dim, rounded up to 256")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds; each runs --steps steps of each model")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="ours compiled; transformers eager and compiled")
    ap.add_argument("--no-tf32", action="store_true", help="CUDA: keep fp32 matmuls exact (as train.tf32=false)")
    ap.add_argument(
        "--no-keep-host-memory", action="store_true", help="CPU: glibc's malloc defaults (keep_host_memory=false)"
    )
    args = ap.parse_args()
    if args.intermediate is None:
        args.intermediate = -(-(8 * args.dim // 3) // 256) * 256
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    set_fp32_matmul_precision(device, tf32=not args.no_tf32)  # as the trainer does at start-up
    kept = device.type == "cpu" and not args.no_keep_host_memory and keep_host_memory()  # both models, one process

    cfg, models, opts = build(args, device, dtype)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def step(name: str) -> float:
        model, opt = models[name], opts[name]
        sync(device)
        t0 = time.perf_counter()
        if name.startswith("ours"):
            loss = model(inputs, targets=targets).loss
        else:  # transformers shifts the labels itself (it predicts T-1 of the T targets: the same work)
            loss = model(inputs, labels=inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t0

    first = {name: step(name) for name in models}  # warm-up: allocator, kernels, optimizer state, compilation
    peak = peak_flops(device, dtype)  # on the CPU timed before and after the rounds: the larger is the peak
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            times[name] += [step(name) for _ in range(args.steps)]
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    peak = max(peak, peak_flops(device, dtype))

    tokens = args.batch * args.seq
    fpt = flops_per_token(cfg, args.seq)
    print(
        f"config: dim {args.dim}, layers {args.layers}, heads {args.heads}, kv heads {args.kv_heads}, "
        f"intermediate {args.intermediate}, vocab {args.vocab}, seq {args.seq}, batch {args.batch}, {args.dtype}, "
        f"{device}, threads {torch.get_num_threads()}, torch {torch.__version__}, keep_host_memory {kept}"
    )
    source = "datasheet" if device.type == "cuda" and peak_is_listed(device) else "measured"
    print(f"peak ({source}): {peak / 1e9:.1f} GFLOP/s; model FLOPs/token {fpt / 1e6:.1f} M")
    rate = {}
    for name in models:
        t = statistics.median(times[name])
        rate[name] = tokens / t
        util = mfu(rate[name], fpt, peak)
        print(f"{name:>5}: {rate[name]:9.1f} tokens/s  step {t * 1e3:8.1f} ms  MFU {100 * util:5.1f}%")
    print(f"ratio ours/hf: {rate['ours'] / rate['hf']:.3f}")
    if args.compile:
        print(f"ratio ours/hf-compiled: {rate['ours'] / rate['hf-compiled']:.3f}")
        print(f"ratio ours/ours-eager (the speed-up of train.compile): {rate['ours'] / rate['ours-eager']:.3f}")
        for name in ("ours", "hf-compiled"):  # the first step compiled: its excess over a timed step
            print(f"compile time {name}: {first[name] - statistics.median(times[name]):.1f} s (first step)")
    # the two models' steps of one round ran back to back: their ratio cancels load that drifts between rounds
    paired = [hf / ours for ours, hf in zip(times["ours"], times["hf"], strict=True)]
    print(
        f"paired ratio (median of {len(paired)} same-round step pairs): {statistics.median(paired):.3f}, "
        f"range {min(paired):.3f}-{max(paired):.3f}; load average {load_before:.1f} before, {load_after:.1f} after"
    )


if __name__ == "__main__":
    main()
