"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate/up column-parallel, down row-parallel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modeling.config import ModelConfig
from parallel.layers import ColumnParallelLinear, InitMethod, RowParallelLinear, fused_column_parallel
from parallel.state import ParallelState


class SwiGLUMLP(nn.Module):
    """SwiGLU with the intermediate dimension split over the tensor group.

    Each rank holds intermediate_size/tp columns of gate and up and the matching rows of down, so the only
    communication is the row-parallel all-reduce (or reduce-scatter) at the end.
    """

    def __init__(
        self, config: ModelConfig, state: ParallelState, *, init_method: InitMethod, **factory: object
    ) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        kw = {"state": state, "bias": bias, "init_method": init_method, **factory}
        self.gate_proj = ColumnParallelLinear(h, i, **kw)
        self.up_proj = ColumnParallelLinear(h, i, **kw)
        self.down_proj = RowParallelLinear(i, h, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, T, H) (T/tp under sequence parallelism)."""
        gate, up = fused_column_parallel(x, (self.gate_proj, self.up_proj))  # (B, T, intermediate/tp) each
        return self.down_proj(F.silu(gate) * up)
