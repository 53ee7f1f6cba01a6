"""Rotary position embeddings in the rotate-half layout of Hugging Face Llama (no permutation on load).

For a head vector x = [x1, x2] (halves of head_dim d) at position p with frequencies f_i = theta^(-2i/d):

    rope(x) = x * cos(p f) + rotate_half(x) * sin(p f),   rotate_half([x1, x2]) = [-x2, x1]

Scaling of the frequencies:
    linear   f_i / factor                                  (position interpolation)
    dynamic  theta' = theta (factor L / L0 - (factor - 1))^(d / (d - 2)) once the length L passes L0
             (dynamic NTK; L0 = max_position_embeddings, L = the largest position + 1 in this forward, of the
             whole sequence under context parallelism)
    llama3   low frequencies / factor, high frequencies kept, a smooth ramp between (Llama 3.1)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from modeling.config import ModelConfig


def _frequencies(theta: float | torch.Tensor, d: int, device: torch.device | None) -> torch.Tensor:
    """theta^(-2i/d) for i < d/2: the (d/2,) fp32 frequencies of base `theta` (a number or a 0-d device tensor)."""
    return 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))


def inv_frequencies(config: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """The d/2 rotary frequencies up to max_position_embeddings positions (beyond: dynamic_frequencies)."""
    d, theta, s = config.head_dim, config.rope_theta, config.rope_scaling or {}
    inv_freq = _frequencies(theta, d, device)
    if config.rope_type == "linear":
        inv_freq = inv_freq / s["factor"]
    elif config.rope_type == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def dynamic_frequencies(config: ModelConfig, length: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Dynamic NTK's d/2 frequencies for sequences of `length` positions, `base` (inv_frequencies) up to L0.

    `length` is a scalar tensor on the device: the choice between the two is a `where`, not a read of the length on
    the host (which would wait for the GPU's queue every forward).
    """
    d, l0, factor = config.head_dim, config.max_position_embeddings, config.rope_scaling["factor"]
    ratio = (factor * length.double() / l0 - (factor - 1)) ** (d / (d - 2))  # theta' / theta (NaN far below L0)
    scaled = _frequencies((config.rope_theta * ratio).float(), d, base.device)
    return torch.where(length > l0, scaled, base)


class RotaryEmbedding(nn.Module):
    """Computes (cos, sin) tables for position ids; frequencies are cached unless dynamic scaling needs new ones."""

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = config
        inv_freq = inv_frequencies(config)  # computed on the CPU, even for meta
        self.register_buffer("inv_freq", inv_freq.to(device) if device is not None else inv_freq, persistent=False)

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype, *, sequence: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) positions -> cos, sin of shape (B, T, head_dim), computed in fp32 then cast to `dtype`.

        `sequence`: the whole sequences' positions where `position_ids` are a context-parallel chunk of them; dynamic
        scaling's length is theirs, the same on every rank (default: position_ids).
        """
        inv_freq = self.inv_freq
        if self.config.rope_type == "dynamic":
            sequence = position_ids if sequence is None else sequence
            inv_freq = dynamic_frequencies(self.config, sequence.amax() + 1, inv_freq)
        B = position_ids.shape[0]
        if B > 1 and position_ids.stride(0) == 0:
            # one row of positions expanded over the batch: compute it once and return stride-0 tables, which
            # also lets every rotation broadcast over the batch instead of reading B copies
            position_ids = position_ids[:1]
        freqs = position_ids.unsqueeze(-1).float() * inv_freq.float()  # (B or 1, T, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B or 1, T, d)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        return cos.expand(B, -1, -1), sin.expand(B, -1, -1)  # (B, T, d)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """[x1, x2] -> [x1 c - sign x2 s, x2 c + sign x1 s] for halves x1, x2 and (.., d/2) tables c, s."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous whatever x's strides
    torch.mul(x1, cos, out=out[..., :h]).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=out[..., h:]).addcmul_(x1, sin, value=sign)
    return out


class _Rotary(torch.autograd.Function):
    """fwd: rotate each pair (x1_i, x2_i) by +p f_i / bwd: rotate the gradient by -p f_i (the transpose).

    Written into one output in two half-passes each: autograd through x cos + rotate_half(x) sin would allocate
    the negated half, the concatenation and two products, and store nothing it needs less than cos and sin.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, heads, d) by (B, T, d) tables: x cos + rotate_half(x) sin, as a contiguous tensor."""
    h = x.shape[-1] // 2
    if torch.compiler.is_compiling():  # out= into slices does not trace (torch 2.13); inductor fuses this form
        x1, x2 = x[..., :h], x[..., h:]
        c, s = cos[..., :h].unsqueeze(2), sin[..., :h].unsqueeze(2)  # (B, T, 1, d/2)
        # in x's dtype, as eagerly: under bf16 autocast q, k are bf16 and the tables fp32 (the residual stream's
        # dtype), whose products would promote q, k and everything after them to fp32
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)  # (B, T, heads, d)
    # the tables repeat their first half (emb = [freqs, freqs]): the rotation needs only that half
    return _Rotary.apply(x, cos[..., :h].unsqueeze(2), sin[..., :h].unsqueeze(2))  # tables (B, T, 1, d/2)
