"""RMSNorm as in Llama: y = w * x / sqrt(mean(x^2) + eps), the statistics computed in fp32."""

from __future__ import annotations

import torch
from torch import nn

from parallel.mappings import copy_to_region
from parallel.state import ParallelState


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
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x32.to(x.dtype)
