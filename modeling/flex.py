"""FlexAttention for masked attention on CUDA: one BlockMask per batch, built from document ids and the window.

    train.attention (LlamaForCausalLM.attention_backend): auto | sdpa | flex
      auto   FlexAttention on CUDA when attention needs a mask (documents, or a window shorter than the
             sequence) and head_dim >= 16; SDPA otherwise (plain causal: SDPA's is_causal flash kernel; the CPU)
      sdpa   always SDPA (with an explicit (B, 1, T, T) mask when one is needed; parallel.sdpa)
      flex   FlexAttention for every mask, plain causal included; on the CPU only without gradients (torch 2.13
             has no CPU backward for it)

The mask rule is modeling.llama.causal_mask's: the query at i attends the key at j iff j <= i, i - j < window
(when set) and doc(i) == doc(j) (when document ids are given). A BlockMask cuts the (T, T) rule into blocks of
`block` x `block` tokens and lists, per query block, the key blocks that are full (every pair visible: no mask is
evaluated there) and partial (the kernel evaluates `mask_mod` per element); the others are skipped. `block_mask`
classifies the blocks from per-block index and document-id ranges, O(B (T / block)^2) work: no (T, T) tensor is
ever built (torch's create_block_mask, uncompiled, evaluates the mask on all B x T x T pairs first). The mask is
built once per batch (LlamaForCausalLM.attention_inputs) and every layer reuses it.

Flex attention runs compiled on CUDA, as torch documents (uncompiled it is a reference implementation that
materialises the scores); elsewhere (CPU inference) it runs uncompiled: compiling its CPU kernel takes tens of
seconds, and CPU training uses SDPA anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BACKENDS = ("auto", "sdpa", "flex")
BLOCK = 128  # torch's default sparse block size (flex_attention._DEFAULT_SPARSE_BLOCK_SIZE), which its kernels tile
MIN_HEAD_DIM = 16  # inductor's CUDA flex kernel refuses smaller heads (kernel/flex/flex_attention.py: "NYI")


def choose_backend(setting: str, device: torch.device, *, masked: bool, head_dim: int) -> str:
    """The backend, "flex" or "sdpa", for attention on `device` under train.attention=`setting` (module docstring).

    `masked`: whether attention needs more than plain causal (document ids, or a window shorter than the sequence).
    `head_dim`: the CUDA kernel needs at least MIN_HEAD_DIM (inductor's flex template: tl.dot's smallest size).
    """
    if setting not in BACKENDS:
        raise ValueError(f"train.attention={setting!r}; choose one of {', '.join(BACKENDS)}")
    cuda = device.type == "cuda"
    if setting == "sdpa":
        return "sdpa"
    if setting == "auto":
        return "flex" if masked and cuda and head_dim >= MIN_HEAD_DIM else "sdpa"
    if not cuda and torch.is_grad_enabled():
        raise ValueError(
            f"train.attention=flex on {device.type}: FlexAttention has no backward there in torch "
            f"{torch.__version__}; use train.attention=auto (SDPA off CUDA), or run without gradients"
        )
    if cuda and head_dim < MIN_HEAD_DIM:
        raise ValueError(
            f"train.attention=flex with head_dim={head_dim}: FlexAttention's CUDA kernel needs a head_dim of at "
            f"least {MIN_HEAD_DIM}; use train.attention=auto or sdpa"
        )
    return "flex"


def _block_ranges(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) -> per-block min and max (B, nb), nb = ceil(T / block); the last block padded with its last value."""
    B, T = x.shape
    nb = -(-T // block)
    padded = torch.cat([x, x[:, -1:].expand(B, nb * block - T)], dim=1).view(B, nb, block)  # (B, nb, block)
    return padded.amin(dim=-1), padded.amax(dim=-1)


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, nq, nk) bool -> (count (B, 1, nq), indices (B, 1, nq, nk)) int32: each row's set blocks first, in order.

    The layout of BlockMask's kv_num_blocks / kv_indices (torch's _dense_to_ordered).
    """
    count = blocks.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return count, indices


def block_mask(
    seq_len: int,
    device: torch.device | str,
    *,
    document_ids: torch.Tensor | None = None,
    window: int | None = None,
    block: int = BLOCK,
) -> BlockMask:
    """The BlockMask of the mask rule over `seq_len` queries and keys (batch 1, broadcast, without document ids).

    document_ids: (B, T) int ids; runs of one id (packed documents) give an exact block classification, other
    layouts a correct one that may evaluate a few more blocks element by element.
    """
    T = seq_len
    if document_ids is not None and document_ids.shape[1] != T:
        raise ValueError(f"document_ids has shape {tuple(document_ids.shape)}; expected (B, {T})")
    if window is not None and window < 1:
        raise ValueError(f"sliding_window={window} must be at least 1 (or null for full causal attention)")
    nb = -(-T // block)
    first = torch.arange(nb, device=device) * block  # (nb,) first token of each block
    last = torch.clamp(first + block, max=T) - 1  # (nb,) last token of each block
    lo = first[:, None] - last[None, :]  # (nq, nk): the smallest i - j of a block pair
    hi = last[:, None] - first[None, :]  # (nq, nk): the largest i - j; every value between occurs
    some = hi >= 0
    every = lo >= 0
    if window is not None:
        some &= lo < window
        every &= hi < window
    whole = last - first + 1 == block  # (nb,): False for a last block that runs past T
    every &= whole[:, None] & whole[None, :]  # a padded block is never full (as in torch's create_block_mask)
    some, every = some[None], every[None]  # (1, nq, nk)
    if document_ids is not None:
        d_min, d_max = _block_ranges(document_ids, block)  # (B, nb) each
        overlap = (d_min[:, :, None] <= d_max[:, None, :]) & (d_min[:, None, :] <= d_max[:, :, None])  # (B, nq, nk)
        single = d_min == d_max  # (B, nb): the block holds one document
        same = single[:, :, None] & single[:, None, :] & (d_min[:, :, None] == d_min[:, None, :])  # (B, nq, nk)
        some, every = some & overlap, every & same
    partial = (some & ~every)[:, None]  # (B or 1, 1, nq, nk)
    full = every[:, None]
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod(document_ids, window),
        seq_lengths=(T, T),
    )  # fmt: skip


def mask_mod(document_ids: torch.Tensor | None, window: int | None) -> Callable[..., torch.Tensor]:
    """FlexAttention's mask_mod of the mask rule: (b, h, q_idx, kv_idx) -> bool, True = attend."""

    def rule(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        allowed = q_idx >= kv_idx
        if window is not None:
            allowed = allowed & (q_idx - kv_idx < window)
        if document_ids is not None:
            allowed = allowed & (document_ids[b, q_idx] == document_ids[b, kv_idx])
        return allowed

    return rule


_compiled: list = []  # flex_attention under torch.compile, made on first use (one per process)


def _compiled_flex():
    """flex_attention under torch.compile: one wrapper, whose graphs are reused across batches and layers."""
    if not _compiled:
        _compiled.append(torch.compile(flex_attention))
    return _compiled[0]


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask) -> torch.Tensor:
    """Attention under `mask`: q (B, Hq, T, hd), k, v (B, Hkv, T, hd), Hq a multiple of Hkv -> (B, Hq, T, hd)."""
    # inside a compiled region (train.compile) the enclosing graph compiles flex_attention itself
    eager = torch.compiler.is_compiling() or q.device.type != "cuda"
    attend = flex_attention if eager else _compiled_flex()
    return attend(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


@dataclass(frozen=True)
class FlexMask:
    """What attention gets in place of a (B, 1, T, T) mask on the FlexAttention path: the batch's BlockMask."""

    block_mask: BlockMask

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, Hq, T, hd) queries over (B, Hkv, T, hd) keys and values -> (B, Hq, T, hd)."""
        return flex_attend(q, k, v, self.block_mask)


def flex_mask(seq_len: int, device: torch.device, document_ids: torch.Tensor | None, window: int | None) -> FlexMask:
    """The FlexMask of one batch: `block_mask` of the mask rule (built once, reused by every layer)."""
    return FlexMask(block_mask(seq_len, device, document_ids=document_ids, window=window))
