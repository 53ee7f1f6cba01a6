"""Training tokens/s and MFU of the 1B preset on one GPU: pretrain_llama.py itself, synthetic data, seq 2048, bf16.

    python bench/gpu_mfu.py                          # 1b preset, 20 steps, micro-batch 4, one GPU
    python bench/gpu_mfu.py --micro-batch 8 --steps 30 parallel.deepspeed_config=configs/deepspeed/zero0.json
    python bench/gpu_mfu.py --documents train.compile=true   # compiled, attention masked to synthetic documents
    python bench/gpu_mfu.py --smoke                  # a tiny model on the CPU: checks the pipeline, not the GPU

It runs `python pretrain_llama.py` in a subprocess (one process, train.device=cuda, train.dtype=bf16, synthetic
tokens, logging every step, no checkpoint (checkpoint.save=false), in a temporary directory) and reads metrics.jsonl:
tokens/s and `mfu` per step. That MFU is training.metrics.mfu, the one definition the benchmarks share: tokens/s x
training FLOPs per token (flops_per_token: 6 x matmul parameters, the embedding's gather left out, + 12 x layers x
heads x head_dim x seq for attention) over the GPU's dense bf16 peak for its exact part (training.metrics.gpu_peak:
H100 SXM 989.4, H100 PCIe 756.5, H100 NVL 835.5 TFLOP/s, ...; a timed 8192^3 matmul for an unlisted part). The
first --skip steps (warm-up, allocator growth) are left out of the means, as is the loader's `data_wait_frac` (time
waiting for data / step time). `--documents` cuts each synthetic sequence into one to four documents
(data.document_attention: FlexAttention's block mask on CUDA). Extra arguments are dotted overrides passed to
pretrain_llama.py (the trainer enables TF32 for fp32 matmuls on CUDA; train.tf32=false keeps them exact); real text
instead of synthetic tokens: `data.synthetic=false data.train=GLOB data.tokenizer=DIR`.

Without a CUDA device it says so and exits 0 (nothing is measured); --smoke runs a tiny config on the CPU instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # training.metrics, when run as `python bench/gpu_mfu.py`

SMOKE = [
    "model.preset=tiny",
    "model.vocab_size=256",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
    "data.seq_len=32",
    "train.device=cpu",
    "train.dtype=fp32",
]


def overrides(args: argparse.Namespace, out: Path) -> list[str]:
    """The dotted overrides of the measured run."""
    common = [
        "data.synthetic=true",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.micro_batch}",
        f"train.max_steps={args.steps}",
        "optim.warmup_steps=2",
        "checkpoint.save=false",  # a 1B run would write 13 GB at its end, a 7B one over 100
        f"checkpoint.dir={out}",
        "logging.log_every=1",
        "logging.wandb_mode=disabled",
        "logging.progress_bar=false",
    ]
    if args.documents:
        common.append("data.document_attention=true")
    if args.smoke:
        return common + SMOKE + args.overrides
    model = ["model.preset=1b", f"model.vocab_size={args.vocab}", f"data.seq_len={args.seq}"]
    return common + model + ["train.device=cuda", "train.dtype=bf16"] + args.overrides


def summarize(rows: list[dict], skip: int) -> dict:
    """Means of tokens/s, MFU and data wait over the steps after the first `skip`, and the peak memory."""
    timed = [r for r in rows if r.get("loss") is not None and r["step"] > skip]
    if not timed:
        raise SystemExit(f"error: no steps after the first {skip} in metrics.jsonl: raise --steps or lower --skip")
    return {
        "steps_timed": len(timed),
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in timed),
        "mfu": statistics.mean(r["mfu"] for r in timed),
        "step_time_s": statistics.mean(r["step_time_s"] for r in timed),
        "data_wait_frac": statistics.mean(r["data_wait_frac"] for r in timed),
        "memory_gb": max(r["memory_gb"] for r in timed),
        "final_loss": timed[-1]["loss"],
        "last_step": timed[-1]["step"],
    }


def describe_peak(device_name: str) -> str:
    """The bf16 peak this GPU's MFU is measured against, and where it comes from."""
    from training.metrics import gpu_peak  # here: --smoke and the no-GPU message need no torch import up front

    peak = gpu_peak(device_name)
    if peak is None:
        return f"{device_name}: not in training.metrics.GPU_PEAKS; the trainer times an 8192^3 bf16 matmul as its peak"
    return f"{device_name}: MFU against the {peak.part}'s dense bf16 peak, {peak.bf16 / 1e12:.1f} TFLOP/s (datasheet)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps to run")
    ap.add_argument("--skip", type=int, default=5, help="first steps left out of the means (warm-up)")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per step (one GPU, no accumulation)")
    ap.add_argument("--seq", type=int, default=2048, help="sequence length (the 1b preset allows up to 2048)")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary size of the synthetic tokens")
    ap.add_argument("--documents", action="store_true", help="attention within synthetic documents (1-4 a row)")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (no GPU needed)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before the run is stopped")
    ap.add_argument("overrides", nargs="*", help="more dotted overrides for pretrain_llama.py")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the training job, then print its throughput and MFU."""
    args = parse_args(argv)
    if args.skip >= args.steps:
        sys.exit(f"error: --skip {args.skip} leaves no step of --steps {args.steps} to measure")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(
            "no CUDA device here: the 1B GPU benchmark was not run (nothing measured). "
            "Run it on a machine with a GPU, or `python bench/gpu_mfu.py --smoke` to check the pipeline on the CPU."
        )
        return
    device = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name(0)
    if not args.smoke:
        print(describe_peak(device), flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_mfu_") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "pretrain_llama.py", "--no-resume", *overrides(args, out)]
        print("$", " ".join(cmd), flush=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        stopped = ""
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, timeout=args.timeout, check=False)
        except subprocess.TimeoutExpired:  # the steps it logged still count
            stopped = f"; stopped by --timeout {args.timeout:.0f}s"
        else:
            if proc.returncode != 0:
                sys.exit(f"error: pretrain_llama.py exited {proc.returncode} (its output is above)")
        log = out / "metrics.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
        if stopped and not rows:
            sys.exit(f"error: the run logged no step within --timeout {args.timeout:.0f}s")
    s = summarize(rows, args.skip)
    print(
        f"\n{device}: {s['tokens_per_s']:,.0f} tokens/s, MFU {100 * s['mfu']:.1f}%, {s['step_time_s']:.3f} s/step, "
        f"peak memory {s['memory_gb']:.1f} GB, data wait {100 * s['data_wait_frac']:.1f}% of the step (mean over "
        f"steps {args.skip + 1}-{s['last_step']}; final loss {s['final_loss']:.3f}{stopped})"
    )
    print(
        f"| {device} | `python bench/gpu_mfu.py {' '.join(argv if argv is not None else sys.argv[1:])}` | "
        f"{s['tokens_per_s']:,.0f} | {100 * s['mfu']:.1f}% | {s['memory_gb']:.1f} | {100 * s['data_wait_frac']:.1f}% |"
    )


if __name__ == "__main__":
    main()
