"""RMSNorm as in Llama: y = w * x / sqrt(mean(x^2) + eps), the statistics computed in fp32.

Forward and backward are one autograd function: autograd through pow/mean/rsqrt/mul would store the normalised
activation and allocate about eight activation-sized temporaries per norm, which on a CPU costs memory
bandwidth and page faults. With n = x * rstd, g = dy * w (per feature) and H features, the gradients are

    dw = sum_rows(dy * n),    dx = rstd * (g - n * mean(g * n))
"""

from __future__ import annotations

import torch
from torch import nn

from parallel.mappings import copy_to_region
from parallel.state import ParallelState


class _RMSNormFunction(torch.autograd.Function):
    """fwd: y = w * dtype(x32 * rstd), rstd = (mean(x32^2) + eps)^-1/2 / bwd: dx, dw by formula from x and rstd."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 statistics (fp64 stays fp64)
        # the 2-norm reads x once without an x^2 temporary; mean(x^2) = |x|^2 / H
        rstd = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        if x.dtype == x32.dtype:
            return torch.mul(x, rstd).mul_(weight)
        # round the normalised x to x's dtype before the weight, as transformers does (bf16 numerics match)
        return weight * torch.mul(x32, rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        n = torch.mul(x.to(rstd.dtype), rstd)  # (..., H) in the statistics' dtype, recomputed instead of stored
        dw = None
        if ctx.needs_input_grad[1]:
            n_x = n.to(x.dtype)  # what multiplied the weight in forward (no copy when the dtypes agree)
            dw = (dy * n_x).reshape(-1, dy.shape[-1]).sum(0).to(weight.dtype)  # (H,)
        if not ctx.needs_input_grad[0]:
            return None, dw, None
        g = (dy * weight).to(rstd.dtype)  # (..., H)
        mean_gn = torch.linalg.vecdot(g, n, dim=-1).unsqueeze(-1).div_(x.shape[-1])  # (..., 1)
        dx = g.sub_(n.mul_(mean_gn)).mul_(rstd)
        return dx.to(x.dtype), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x: w * x / sqrt(mean(x^2) + eps) over the last dimension, statistics in fp32, result in x's dtype."""
    return _RMSNormFunction.apply(x, weight, eps)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm over the last dimension.

    Under sequence parallelism each tensor rank normalises its own sequence chunk, so the replicated weight's
    gradient is a partial sum: the weight enters through copy_to_region (fwd identity, bwd all-reduce).
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        *,
        state: ParallelState | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.state = state or ParallelState()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.weight.tp_split_dim = None  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim), same dtype as x."""
        weight = copy_to_region(self.weight, self.state.tp_group) if self.state.sequence_parallel else self.weight
        return rms_norm(x, weight, self.eps)
