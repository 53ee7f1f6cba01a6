"""RMSNorm as in Llama: y = w * x / sqrt(mean(x^2) + eps), the statistics computed in fp32.

Forward and backward are one autograd function: autograd through pow/mean/rsqrt/mul would store the normalised
activation and allocate about eight activation-sized temporaries per norm, which on a CPU costs memory
bandwidth and page faults. With n = x * rstd, g = dy * w (per feature) and H features, the gradients are

    dw = sum_rows(dy * n),    dx = rstd * (g - n * mean(g * n))

Under autocast the output is in the autocast dtype (bf16): every consumer of a norm's output multiplies it in that
dtype anyway (the q/k/v and gate/up projections, the head, the experts), so the values they see are unchanged,
while the sequence-parallel all-gather, the all-reduce of its gradient and the experts' all-to-all move half the
bytes (Megatron's bf16 path does the same). The statistics stay fp32 and dx keeps x's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from parallel.mappings import autocast_dtype, copy_to_region
from parallel.state import ParallelState


class _RMSNormFunction(torch.autograd.Function):
    """fwd: y = w * dtype(x32 * rstd), rstd = (mean(x32^2) + eps)^-1/2 / bwd: dx, dw by formula from x and rstd.

    With an out_dtype other than x's (autocast), y is rounded to it last: what a consumer casting y would get.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 statistics (fp64 stays fp64)
        # the 2-norm reads x once without an x^2 temporary; mean(x^2) = |x|^2 / H
        rstd = (torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square() / x.shape[-1] + eps).rsqrt()  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        if x.dtype == x32.dtype:
            y = torch.mul(x, rstd)
            # in place eagerly (one buffer less); never in a compiled forward (modeling.compile: torch 2.11)
            y = y * weight if torch.compiler.is_compiling() else y.mul_(weight)
            return y if out_dtype in (None, y.dtype) else y.to(out_dtype)
        # round the normalised x to x's dtype before the weight, as transformers does (bf16 numerics match)
        y = weight * torch.mul(x32, rstd).to(x.dtype)
        return y if out_dtype in (None, y.dtype) else y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        n = torch.mul(x.to(rstd.dtype), rstd)  # (..., H) in the statistics' dtype, recomputed instead of stored
        dw = None
        if ctx.needs_input_grad[1]:
            n_x = n.to(x.dtype)  # what multiplied the weight in forward (no copy when the dtypes agree)
            dw = (dy * n_x).reshape(-1, dy.shape[-1]).sum(0).to(weight.dtype)  # (H,)
        if not ctx.needs_input_grad[0]:
            return None, dw, None, None
        g = (dy * weight).to(rstd.dtype)  # (..., H)
        mean_gn = torch.linalg.vecdot(g, n, dim=-1).unsqueeze(-1).div_(x.shape[-1])  # (..., 1)
        dx = g.sub_(n.mul_(mean_gn)).mul_(rstd)
        return dx.to(x.dtype), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x: w * x / sqrt(mean(x^2) + eps) over the last dimension, statistics in fp32.

    The result is in x's dtype (promoted with the weight's), or in the autocast dtype where autocast is on
    (parallel.mappings.autocast_dtype).
    """
    return _RMSNormFunction.apply(x, weight, eps, autocast_dtype(x))


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
