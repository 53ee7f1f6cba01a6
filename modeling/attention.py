"""Causal self-attention with grouped key/value heads (MHA, GQA, MQA), heads sharded over the tensor group."""

from __future__ import annotations

import torch
from torch import nn

from modeling.config import ModelConfig
from modeling.context import ContextMask
from modeling.flex import FlexMask
from modeling.rope import apply_rotary
from parallel.layers import (
    ColumnParallelLinear,
    InitMethod,
    RowParallelLinear,
    emulated_bf16,
    fused_column_parallel,
)
from parallel.sdpa import sdpa
from parallel.state import ParallelState

LayerCache = tuple[torch.Tensor, torch.Tensor, int]  # (keys, values) buffers (B, kv_heads/tp, max_len, hd), start


class Attention(nn.Module):
    """softmax(q k^T / sqrt(hd) + mask) v over heads/tp query heads and kv_heads/tp key/value heads per rank.

    q, k, v are column-parallel (each rank computes whole heads), o is row-parallel (partial sums over heads are
    all-reduced), so attention itself needs no communication. Query head j attends with key/value head
    j // (heads / kv_heads), the grouping of Hugging Face's repeat_kv, which sharding by whole groups preserves.
    """

    def __init__(
        self, config: ModelConfig, state: ParallelState, *, init_method: InitMethod, **factory: object
    ) -> None:
        super().__init__()
        config.validate_parallel(state.tp_size)
        h, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.n_heads = config.num_attention_heads // state.tp_size
        self.n_kv_heads = config.num_key_value_heads // state.tp_size
        self.head_dim = hd
        kw = {"state": state, "bias": bias, "init_method": init_method, **factory}
        self.q_proj = ColumnParallelLinear(h, config.num_attention_heads * hd, **kw)
        self.k_proj = ColumnParallelLinear(h, config.num_key_value_heads * hd, **kw)
        self.v_proj = ColumnParallelLinear(h, config.num_key_value_heads * hd, **kw)
        self.o_proj = RowParallelLinear(config.num_attention_heads * hd, h, **kw)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        mask: torch.Tensor | ContextMask | FlexMask | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """(B, T, H) -> (B, T, H); `mask` (B, 1, T, S) bool, True = attend; None = causal over T.

        A FlexMask (modeling.flex: FlexAttention's block mask, CUDA) or a ContextMask (context parallelism) attends
        through its own kernel. With `cache`, the new keys and values are written at [start, start + T) and
        attention runs over [0, start + T); `mask` must then be given.
        """
        q, k, v = fused_column_parallel(x, (self.q_proj, self.k_proj, self.v_proj))  # (B, T, heads/tp * hd) etc.
        B, T = q.shape[:2]  # the full sequence, also when x holds a sequence-parallel chunk
        q = apply_rotary(q.view(B, T, self.n_heads, self.head_dim), cos, sin)  # (B, T, nh, hd)
        k = apply_rotary(k.view(B, T, self.n_kv_heads, self.head_dim), cos, sin)  # (B, T, nkv, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        # heads-first views of the (B, T, heads, hd) memory, the layout transformers gives sdpa too
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh or nkv, T, hd)
        if cache is not None:
            k_buf, v_buf, start = cache
            k_buf[:, :, start : start + T] = k
            v_buf[:, :, start : start + T] = v
            k, v = k_buf[:, :, : start + T], v_buf[:, :, : start + T]  # (B, nkv, S, hd)
        dtype = q.dtype
        if emulated_bf16(q):  # without bf16 hardware torch's CPU attention runs bf16 several times slower than fp32
            with torch.autocast("cpu", enabled=False):  # autocast would cast the fp32 inputs back to bf16
                y = self._attend(q.float(), k.float(), v.float(), mask)
        else:
            y = self._attend(q, k, v, mask)
        y = y.to(dtype).transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh * hd)
        return self.o_proj(y)

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
        """(B, nh, Tq, hd) q, (B, nkv, S, hd) k, v -> (B, nh, Tq, hd) by the mask's kernel (Tq = T/cp under cp)."""
        if isinstance(mask, ContextMask):  # the sequence is split over the context group (modeling.context)
            return mask.attend(q, k, v)  # (B, nh, T/cp, hd)
        if isinstance(mask, FlexMask):  # one block mask per batch, no (T, T) tensor (modeling.flex)
            return mask.attend(q, k, v)  # (B, nh, T, hd)
        return sdpa(q, k, v, mask)  # on CUDA, k and v are repeated to the query heads under a mask (parallel.sdpa)
