"""Metrics: one JSON object per logged step in <output_dir>/metrics.jsonl, the same rows to wandb, a loss-curve PNG."""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from configs.sections import LoggingSection
from modeling.config import ModelConfig


def wandb_mode(cfg: LoggingSection) -> str:
    """The wandb mode to use: 'auto' means online with an API key (env or netrc), offline without."""
    if cfg.wandb_mode != "auto":
        return cfg.wandb_mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class MetricsLogger:
    """Rank 0 writes metrics.jsonl (appending across resumes) and mirrors every row to wandb."""

    def __init__(
        self, output_dir: Path, cfg: LoggingSection, config_dict: dict[str, Any], *, enabled: bool, resume_step: int
    ) -> None:
        self.enabled, self.path, self.run = enabled, output_dir / "metrics.jsonl", None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        mode = wandb_mode(cfg)
        if mode != "disabled":
            import wandb

            run_id_file = output_dir / "wandb_run_id"
            resuming = resume_step > 0 and run_id_file.exists()
            run_id = run_id_file.read_text().strip() if resuming else uuid.uuid4().hex[:8]
            run_id_file.write_text(run_id)
            self.run = wandb.init(
                project=cfg.wandb_project,
                name=cfg.run_name or output_dir.name,
                tags=cfg.tags,
                config=config_dict,
                dir=str(output_dir),
                mode=mode,
                id=run_id,
                resume="allow",
            )

    def _truncate_after(self, step: int) -> None:
        """Drop rows past the checkpoint we resume from, so the file holds one row per step."""
        if not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if json.loads(r).get("step", 0) <= step]
        self.path.write_text("".join(r + "\n" for r in kept))

    def log(self, row: dict[str, Any]) -> None:
        """Append one row (must contain `step`); non-finite floats are written as null."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.run is not None:
            scalars = {}
            for k, v in row.items():
                if isinstance(v, list):  # e.g. moe/layer{i}/tokens_per_expert: one wandb series per entry
                    scalars.update({f"{k}/{j}": x for j, x in enumerate(v)})
                elif k != "step" and v is not None:
                    scalars[k] = v
            self.run.log(scalars, step=row["step"])

    def log_text(self, step: int, key: str, text: str) -> None:
        """A text sample (wandb only; metrics.jsonl holds numbers and is read by tools)."""
        if self.run is not None:
            self.run.log({key: text}, step=step)

    def plot(self, out: Path) -> None:
        """Write the loss curve (train, and eval where present) as a PNG."""
        if not self.enabled or not self.path.exists():
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
        evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train, strict=True), label="train")
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", label="eval")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)

    def finish(self) -> None:
        """Close the wandb run."""
        if self.run is not None:
            self.run.finish()


def _synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a no-op on the CPU, whose matmuls return when done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    """FLOP/s of an n^3 matmul measured now: the CPU's practical peak, and the fallback for an unlisted GPU."""
    g = torch.Generator(device=device).manual_seed(0)  # not the global RNG: a resumed run must draw what it saved
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    a @ b  # warm-up (kernel selection, workspace)
    # a GPU queues the matmuls: the clock starts once the warm-up has run and stops once the timed ones have
    _synchronize(device)
    reps = 10 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


@dataclass(frozen=True)
class GpuPeak:
    """A GPU part's dense (no sparsity) peak FLOP/s from its datasheet: bf16 and TF32 tensor cores, plain fp32."""

    part: str
    bf16: float
    tf32: float
    fp32: float


# Most specific first: a name matches a row when it contains all of the row's words (torch.cuda.get_device_name,
# split at spaces and dashes, upper case). "NVIDIA H100 80GB HBM3" is the SXM part; the PCIe and NVL cards say so
# in their names ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200 NVL"); "NVIDIA GH200 480GB" is GH200, not
# H200; "NVIDIA A10G" is not an A10 (whole words only). Datasheet figures with sparsity are halved.
GPU_PEAKS: tuple[tuple[frozenset[str], GpuPeak], ...] = tuple(
    (frozenset(words.split()), GpuPeak(part, bf16 * 1e12, tf32 * 1e12, fp32 * 1e12))
    for words, part, bf16, tf32, fp32 in (
        ("H100 NVL", "H100 NVL", 835.5, 417.5, 60.0),
        ("H100 PCIE", "H100 PCIe", 756.5, 378.0, 51.2),
        ("H100", "H100 SXM", 989.4, 494.7, 66.9),
        ("H200 NVL", "H200 NVL", 835.5, 417.5, 60.0),
        ("H200", "H200 SXM", 989.4, 494.7, 66.9),
        ("GH200", "GH200", 989.4, 494.7, 66.9),
        ("B200", "B200", 2250.0, 1125.0, 75.0),
        ("A100", "A100", 312.0, 156.0, 19.5),
        ("L40S", "L40S", 362.05, 183.0, 91.6),
        ("L40", "L40", 181.05, 90.5, 90.5),
        ("L4", "L4", 121.0, 60.0, 30.3),
        ("A10", "A10", 125.0, 62.5, 31.2),
        ("RTX 4090", "RTX 4090", 165.2, 82.6, 82.6),
    )
)


def gpu_peak(name: str) -> GpuPeak | None:
    """The datasheet peaks of the GPU `name` (as torch.cuda.get_device_name returns it); None for an unlisted part."""
    words = set(name.upper().replace("-", " ").replace("_", " ").split())
    return next((peak for required, peak in GPU_PEAKS if required <= words), None)


def tf32_enabled() -> bool:
    """Whether fp32 matmuls on CUDA run on TF32 tensor cores (training.distributed.set_fp32_matmul_precision)."""
    precision = torch.backends.cuda.matmul.fp32_precision
    if precision == "none":  # inherits the global setting (set_float32_matmul_precision("high") makes it tf32)
        precision = torch.backends.fp32_precision
    return precision == "tf32"


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The per-device FLOP/s an MFU is measured against, for matmuls in the training `dtype`.

    CUDA: the part's dense datasheet peak (gpu_peak) for bf16, or for fp32 its TF32 peak when TF32 is enabled
    (tf32_enabled) and its fp32 peak when not; an unlisted GPU gets an 8192^3 matmul timed now. CPU: a 2048^3
    matmul timed now in `dtype` (in fp32 where bf16 linears run as fp32 matmuls, on CPUs without bf16 hardware).
    """
    if device.type == "cuda":
        peak = gpu_peak(torch.cuda.get_device_name(device))
        if peak is None:
            return matmul_peak_flops(device, dtype, 8192)
        if dtype == torch.bfloat16:
            return peak.bf16
        return peak.tf32 if tf32_enabled() else peak.fp32
    from parallel.layers import cpu_has_native_bf16

    measure = dtype if dtype != torch.bfloat16 or cpu_has_native_bf16() else torch.float32
    return matmul_peak_flops(device, measure)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float, devices: int = 1) -> float:
    """Model FLOPs utilisation: tokens/s x training FLOPs per token over `devices` x the per-device `peak` FLOP/s.

    The one definition of the trainer's `mfu` and the benchmarks': `flops_per_token` from flops_per_token(),
    `peak` from peak_flops(), `tokens_per_s` and `devices` over the same set of devices (all ranks of a run).
    """
    return tokens_per_s * flops_per_token / (peak * devices)


def memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated, or the process's resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import psutil

    return psutil.Process().memory_info().rss


def flops_per_token(mc: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (PaLM, appendix B): 6 x matmul parameters + 12 x layers x heads x head_dim x seq.

    Matmul parameters are those a token multiplies by: attention and MLP projections (a MoE layer's router, its
    top-k routed and its shared experts) and the output head. Not the embedding table, which is a gather (its
    rows are read, not multiplied; a tied table still counts once, as the head), nor the norms' weights. 6 = 2
    for the forward's multiply-add and 4 for the backward's two products; attention's scores and weighted sum
    add 12 x layers x heads x head_dim x seq, over the full sequence (the causal half is not discounted).
    """
    h, layers = mc.hidden_size, mc.num_hidden_layers
    gather = 0 if mc.tie_word_embeddings else mc.vocab_size * h
    norms = 2 * h * layers + h
    matmul_params = mc.num_active_params() - gather - norms
    return 6 * matmul_params + 12 * layers * mc.num_attention_heads * mc.head_dim * seq_len


def data_skipped(loader: Any) -> int:
    """Records the training loader skipped so far (its stats()' `skipped`: a count, or counts by reason)."""
    skipped = loader.stats().get("skipped", 0)
    return sum(skipped.values()) if isinstance(skipped, dict) else int(skipped)


class StepTimer:
    """The steps' wall time and the part of it the trainer waited for data: `data_wait_frac` of a logged row.

    The trainer reads its batches through `batches()`, which counts the time each next() takes, and brackets each
    step with `start()` / `stop()`. On CUDA a step ends in host syncs (the non-finite check, the gradient norm), so
    the host's clock follows the device's, and time spent in next() is time the device had nothing to do.
    `clock` is any monotonic clock in seconds (a test passes a fake one).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._t0 = self._wait = 0.0  # the running step's start and its time in next()
        self._window_time = self._window_wait = 0.0  # the steps since the last data_wait_frac()

    def batches(self, it: Iterator[Any]) -> Iterator[Any]:
        """`it`'s items, the time each next() takes counted as waiting for data."""
        try:
            while True:
                t0 = self.clock()
                try:
                    item = next(it)
                except StopIteration:
                    return
                self._wait += self.clock() - t0
                yield item
        finally:
            close = getattr(it, "close", None)  # a loader's generator stops its workers on close
            if close is not None:
                close()

    def start(self) -> None:
        """A step begins."""
        self._t0, self._wait = self.clock(), 0.0

    def stop(self) -> float:
        """The step ends: its wall time in seconds."""
        elapsed = self.clock() - self._t0
        self._window_time += elapsed
        self._window_wait += min(self._wait, elapsed)
        return elapsed

    def data_wait_frac(self) -> float:
        """Time waited for data over the step time, since the last call (0 before any step); in [0, 1]."""
        frac = self._window_wait / self._window_time if self._window_time > 0 else 0.0
        self._window_time = self._window_wait = 0.0
        return frac
