"""Metrics: one JSON object per logged step in <output_dir>/metrics.jsonl, the same rows to wandb, a loss-curve PNG."""

from __future__ import annotations

import json
import math
import os
import time
import uuid
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


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    """FLOP/s of an n^3 matmul measured now (the CPU's practical peak, for MFU)."""
    g = torch.Generator(device=device).manual_seed(0)  # not the global RNG: a resumed run must draw what it saved
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    a @ b  # warm-up
    reps, t0 = 3, time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The GPU's dense bf16 peak from its name (timed when unknown); on CPU a timed matmul in the training dtype."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_BF16.items():
            if key in name:
                return flops if dtype == torch.bfloat16 else flops / 2
        return matmul_peak_flops(device, dtype, 8192)
    from parallel.layers import cpu_has_native_bf16

    # bf16 linears run as fp32 matmuls on CPUs without bf16 hardware: fp32 is then the relevant peak
    measure = dtype if dtype != torch.bfloat16 or cpu_has_native_bf16() else torch.float32
    return matmul_peak_flops(device, measure)


def memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated, or the process's resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import psutil

    return psutil.Process().memory_info().rss


def flops_per_token(mc: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active parameters (forward + backward) + attention's 12 x layers x width x seq."""
    return 6 * mc.num_active_params() + 12 * mc.num_hidden_layers * mc.num_attention_heads * mc.head_dim * seq_len


def data_skipped(loader: Any) -> int:
    """Records the training loader skipped so far (its stats()' `skipped`: a count, or counts by reason)."""
    skipped = loader.stats().get("skipped", 0)
    return sum(skipped.values()) if isinstance(skipped, dict) else int(skipped)
