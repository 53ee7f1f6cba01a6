"""The Llama decoder, written in tensor-parallel layers; parameter names are Hugging Face's.

    ids -> embed_tokens (vocab-parallel) -> N x [x + attn(norm(x)); x + mlp(norm(x))] -> norm -> lm_head
        -> training: vocab-parallel cross-entropy fused with the head (full-vocabulary logits never gathered)
        or inference: gathered logits

The mlp of layer i is a SwiGLUMLP, or a MoEMLP (modeling.moe) where config.is_moe_layer(i). The training loss of a
mixture-of-experts model is, as in Megatron-LM,

    loss = CE + sum_{MoE layers l} aux_loss_l       (aux_loss_l = aux_coef lb_l + z_coef z_l, this rank's tokens)

A vocabulary that tp does not divide is padded to a multiple of tp in the embedding and the head (zero rows,
masked out of the loss, sliced off the logits; parallel.layers): config.vocab_size stays the real size.

At tp=1 the state_dict of a dense model equals transformers' LlamaForCausalLM's, key for key; with experts, every
tensor outside the MoE layers keeps its Llama/Mixtral name (modeling.convert renames the expert tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from modeling.attention import Attention, LayerCache
from modeling.config import ModelConfig
from modeling.mlp import SwiGLUMLP
from modeling.moe import MoEMLP
from modeling.norm import RMSNorm
from modeling.rope import RotaryEmbedding
from parallel.layers import VocabParallelEmbedding, VocabParallelHead
from parallel.mappings import gather_from_region
from parallel.state import ParallelState


class Cache(Protocol):
    """What the decoder needs from a KV cache (see modeling.generation.KVCache)."""

    def layer(self, index: int) -> LayerCache:
        """Key/value buffers of one layer and the position where new entries go."""

    def attention_mask(self, num_new: int) -> torch.Tensor:
        """(B, 1, num_new, start + num_new) bool mask for the new queries over all cached keys."""


@dataclass
class CausalLMOutput:
    """With targets: `loss` = `ce_loss` + `aux_loss` (no logits then); otherwise full-vocabulary `logits` (B, T', V).

    `aux_loss` is the sum of the MoE layers' auxiliary losses (None for a dense model, whose loss is the CE alone).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def positions_from_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids of a packed sequence -> positions restarting at 0 at each new document."""
    T = document_ids.shape[1]
    idx = torch.arange(T, device=document_ids.device).expand_as(document_ids)  # (B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool mask: causal, and only within the same document."""
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()  # (T, T)
    same_doc = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)  # (B, T, T)
    return (same_doc & causal).unsqueeze(1)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, state: ParallelState, index: int, **kw: object) -> None:
        super().__init__()
        norm_kw = {k: v for k, v in kw.items() if k != "init_method"}
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, state=state, **norm_kw)
        self.self_attn = Attention(config, state, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, state=state, **norm_kw)
        mlp = MoEMLP if config.is_moe_layer(index) else SwiGLUMLP
        self.mlp = mlp(config, state, **kw)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """(B, T, H) -> (B, T, H) (T/tp under sequence parallelism)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask=mask, cache=cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm (Hugging Face's `model.` prefix)."""

    def __init__(self, config: ModelConfig, state: ParallelState, **kw: object) -> None:
        super().__init__()
        factory = {k: v for k, v in kw.items() if k != "init_method"}
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, state=state, init_method=kw["init_method"], **factory
        )
        self.layers = nn.ModuleList(DecoderLayer(config, state, i, **kw) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, state=state, **factory)
        self.rotary_emb = RotaryEmbedding(config, device=factory.get("device"))


class LlamaForCausalLM(nn.Module):
    """Llama causal language model over a ParallelState (default: one process, no process group).

    Weights are drawn from N(0, initializer_range) (norms 1, biases 0), as transformers initialises Llama;
    `skip_init` leaves them uninitialised, for a model whose weights are about to be loaded.
    `activation_checkpointing` recomputes each decoder layer in backward instead of storing its activations.
    The expert-parallel degree is the state's (parallel.ep): the experts of every MoE layer are split over it.
    """

    def __init__(
        self,
        config: ModelConfig,
        state: ParallelState | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        skip_init: bool = False,
    ) -> None:
        super().__init__()
        self.config, self.state = config, state or ParallelState()
        config.validate_parallel(self.state.tp_size, self.state.ep_size)
        self.state.require_groups()
        std = config.initializer_range
        init = (lambda w: None) if skip_init else (lambda w: nn.init.normal_(w, 0.0, std))
        kw = {"init_method": init, "device": device, "dtype": dtype}
        self.model = LlamaModel(config, self.state, **kw)
        if config.tie_word_embeddings:
            self.lm_head = VocabParallelHead(config.hidden_size, config.vocab_size, state=self.state, device="meta")
            self.lm_head.weight = self.model.embed_tokens.weight  # same (V/tp, H) shard layout
        else:
            self.lm_head = VocabParallelHead(config.hidden_size, config.vocab_size, state=self.state, **kw)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith(".bias"):
                    p.zero_()
        self.activation_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        targets: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        num_logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """Run the decoder on (B, T) ids.

        targets: (B, T) ids to predict at each position (already shifted; -100 = ignore) -> mean loss.
        document_ids: (B, T) ids of the packed documents -> attention stays inside each document and positions
            restart per document (unless position_ids are given).
        cache: a KV cache (generation); position_ids must then be given.
        num_logits_to_keep: without targets, return logits of the last N positions only (0 = all).
        """
        B, T = input_ids.shape
        if self.state.sequence_parallel and (cache is not None or T % self.state.tp_size):
            raise ValueError(
                f"sequence parallelism needs no KV cache and a sequence length divisible by tp="
                f"{self.state.tp_size} (got T={T}); build the model without sequence_parallel for generation"
            )
        if position_ids is None:
            if document_ids is not None:
                position_ids = positions_from_documents(document_ids)
            else:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        mask = None
        if cache is not None:
            mask = cache.attention_mask(T)
        elif document_ids is not None:
            mask = document_causal_mask(document_ids)

        x = self.model.embed_tokens(input_ids)  # (B, T, H), or (B, T/tp, H) under sequence parallelism
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)  # (B, T, hd)
        for i, layer in enumerate(self.model.layers):
            layer_cache = cache.layer(i) if cache is not None else None
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, layer_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, layer_cache)
        x = self.model.norm(x)

        if targets is not None:
            ce = self.lm_head(x, targets)  # fused head + vocab-parallel loss: logits neither gathered nor kept
            moe = self.moe_layers()
            if not moe:
                return CausalLMOutput(loss=ce, ce_loss=ce)
            aux = torch.stack([m.aux_loss for _, m in moe]).sum()
            return CausalLMOutput(loss=ce + aux, ce_loss=ce, aux_loss=aux)
        if num_logits_to_keep and not self.state.sequence_parallel:
            x = x[:, -num_logits_to_keep:]  # (B, N, H)
        logits = self.lm_head(x)  # (B, T', V'/tp), V' the vocabulary padded to a multiple of tp
        if num_logits_to_keep:
            logits = logits[:, -num_logits_to_keep:]
        logits = gather_from_region(logits, self.state.tp_group, -1)  # (B, T', V')
        return CausalLMOutput(logits=logits[..., : self.config.vocab_size])  # (B, T', V): padding sliced off

    def moe_layers(self) -> list[tuple[int, MoEMLP]]:
        """(layer index, MoEMLP) of every mixture-of-experts layer, in layer order (empty for a dense model)."""
        return [(i, layer.mlp) for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, MoEMLP)]

    def update_expert_bias(self) -> None:
        """After an optimizer step: each MoE layer's auxiliary-loss-free bias update (collective; see MoEMLP)."""
        for _, moe in self.moe_layers():
            moe.update_expert_bias()
