"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate/up column-parallel, down row-parallel.

The product silu(g) * u is one autograd function that stores only g and u (views of the fused gate/up matmul's
output, alive anyway) and recomputes silu in backward, where autograd would also keep silu(g):

    d u = dh * silu(g),    d g = dh * u * sigma(g) (1 + g (1 - sigma(g)))    (aten's silu_backward)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modeling.config import ModelConfig
from parallel.layers import ColumnParallelLinear, InitMethod, RowParallelLinear, fused_column_parallel
from parallel.state import ParallelState


class _SwiGLUFunction(torch.autograd.Function):
    """fwd: h = silu(gate) * up / bwd: dgate = silu'(gate) dh up, dup = silu(gate) dh, silu recomputed."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        h = F.silu(gate)
        # in place eagerly (one buffer less); never in a compiled forward (modeling.compile: torch 2.11)
        return h * up if torch.compiler.is_compiling() else h.mul_(up)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate, up = ctx.saved_tensors
        dgate = torch.mul(dh, up)
        # silu_backward(g, x) = g * silu'(x), one fused pass, written over its own input
        torch.ops.aten.silu_backward.grad_input(dgate, gate, grad_input=dgate)
        dup = F.silu(gate).mul_(dh)
        return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise."""
    return _SwiGLUFunction.apply(gate, up)


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
        return self.down_proj(swiglu(gate, up))
