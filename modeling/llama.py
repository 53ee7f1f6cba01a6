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

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from modeling import context, flex
from modeling.attention import Attention, LayerCache
from modeling.config import ModelConfig
from modeling.mlp import SwiGLUMLP
from modeling.moe import MoEMLP
from modeling.norm import RMSNorm
from modeling.rope import RotaryEmbedding
from parallel.cross_entropy import IGNORE_INDEX
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
    With targets and per_token=True: `token_logps` (B, T) fp32, log p(target_t | tokens <= t) at each position (0
    where the target is -100), computed from the vocab-parallel logits without gathering them; `ce_loss` is then
    the mean of -token_logps over the valid targets, and `loss` is None (the caller builds its own objective from
    the log-probabilities and `aux_loss`).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    token_logps: torch.Tensor | None = None


def _tied_copy(embedding: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    """The last pipeline stage's copy of a tied embedding, with the head weight's sharding attributes."""
    copy = nn.Parameter(embedding.detach())
    for attr in ("tp_split_dim", "tp_full_size"):
        setattr(copy, attr, getattr(like, attr))
    copy.pipeline_tied = "copy"  # type: ignore[attr-defined]
    return copy


def positions_from_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids of a packed sequence -> positions restarting at 0 at each new document."""
    T = document_ids.shape[1]
    idx = torch.arange(T, device=document_ids.device).expand_as(document_ids)  # (B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values


def causal_mask(q_idx: torch.Tensor, k_idx: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """(Tq,) query and (S,) key sequence indices -> (Tq, S) bool, True = attend: j <= i and i - j < sliding_window.

    The one definition of causal and sliding-window attention (training, documents, the KV cache): the rule of
    transformers' masking_utils (causal_mask_function and sliding_window_overlay, kv_idx > q_idx - sliding_window),
    so a window of w sees w tokens, the query's own included.
    """
    diff = q_idx.unsqueeze(1) - k_idx.unsqueeze(0)  # (Tq, S): i - j
    mask = diff >= 0
    if sliding_window is not None:
        mask = mask & (diff < sliding_window)
    return mask


def document_causal_mask(document_ids: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool mask: causal_mask (with the window), and only within the document."""
    idx = torch.arange(document_ids.shape[1], device=document_ids.device)
    same_doc = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)  # (B, T, T)
    return (same_doc & causal_mask(idx, idx, sliding_window)).unsqueeze(1)


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
    """Embedding, decoder layers and final norm (Hugging Face's `model.` prefix).

    `layers` is keyed by the global layer index, so a pipeline stage that holds layers 4-7 names them
    `model.layers.4` ... `model.layers.7`, as the whole model does. `part` says what this rank keeps (None: all);
    the parts it leaves out are still drawn from the RNG and dropped, so every layout holds the same weights for
    one seed (one dropped layer at a time is in memory).
    """

    def __init__(self, config: ModelConfig, state: ParallelState, part: ModelPart | None = None, **kw: object) -> None:
        super().__init__()
        factory = {k: v for k, v in kw.items() if k != "init_method"}
        part = part or ModelPart.whole(config)
        embed = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, state=state, init_method=kw["init_method"], **factory
        )
        self.embed_tokens = embed if part.embedding else None
        self.dropped_embedding = None if part.embedding else embed.weight  # a tied head copies it (pipeline)
        self.layers = nn.ModuleDict()
        for i in range(config.num_hidden_layers):
            layer = DecoderLayer(config, state, i, **kw)
            if i in part.layers:
                self.layers[str(i)] = layer
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, state=state, **factory) if part.head else None
        self.rotary_emb = RotaryEmbedding(config, device=factory.get("device"))


@dataclass(frozen=True)
class ModelPart:
    """What one rank holds of the model: decoder layers (global indices), the embedding, the final norm and head."""

    layers: tuple[int, ...]
    embedding: bool = True
    head: bool = True

    @classmethod
    def whole(cls, config: ModelConfig) -> ModelPart:
        """The whole model (no pipeline parallelism)."""
        return cls(tuple(range(config.num_hidden_layers)))


class LlamaForCausalLM(nn.Module):
    """Llama causal language model over a ParallelState (default: one process, no process group).

    Weights are drawn from N(0, initializer_range) (norms 1, biases 0), as transformers initialises Llama;
    `skip_init` leaves them uninitialised, for a model whose weights are about to be loaded.
    `activation_checkpointing` recomputes each decoder layer in backward instead of storing its activations.
    `attention_backend` (train.attention: auto | sdpa | flex) picks SDPA or FlexAttention for masked attention
    (modeling.flex.choose_backend).
    The expert-parallel degree is the state's (parallel.ep): the experts of every MoE layer are split over it.

    Under pipeline parallelism a rank builds only its `part` (modeling.pipeline cuts the stages; forward() needs the
    whole model, the stages call embed / run_layers / finish). A tied head on a last stage that does not hold the
    embedding is a copy of it: the two are marked `pipeline_tied` ("source", "copy"), the engines sum their
    gradients over the embedding group and count the copy out of the gradient norm, the checkpoint holds only the
    embedding, and loading fills the copy from it.
    """

    def __init__(
        self,
        config: ModelConfig,
        state: ParallelState | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        skip_init: bool = False,
        part: ModelPart | None = None,
    ) -> None:
        super().__init__()
        self.config, self.state = config, state or ParallelState()
        self.part = part or ModelPart.whole(config)
        config.validate_parallel(self.state.tp_size, self.state.ep_size)
        self.state.require_groups()
        std = config.initializer_range
        init = (lambda w: None) if skip_init else (lambda w: nn.init.normal_(w, 0.0, std))
        kw = {"init_method": init, "device": device, "dtype": dtype}
        self.model = LlamaModel(config, self.state, self.part, **kw)
        embedding = self.model.dropped_embedding if self.model.embed_tokens is None else self.model.embed_tokens.weight
        del self.model.dropped_embedding
        head_kw = {"state": self.state}
        if config.tie_word_embeddings:
            head = VocabParallelHead(config.hidden_size, config.vocab_size, device="meta", **head_kw)
            if self.model.embed_tokens is not None:
                head.weight = self.model.embed_tokens.weight  # same (V/tp, H) shard layout
                if not self.part.head:  # the first pipeline stage: its gradient meets the last stage's copy's
                    head.weight.pipeline_tied = "source"  # type: ignore[attr-defined]
            else:  # the last pipeline stage: its own copy, kept equal to the first stage's
                head.weight = _tied_copy(embedding, head.weight)
        else:
            head = VocabParallelHead(config.hidden_size, config.vocab_size, **head_kw, **kw)
        self.lm_head = head if self.part.head else None
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith(".bias"):
                    p.zero_()
        self.activation_checkpointing = False
        self.attention_backend = "auto"
        self._register_load_state_dict_pre_hook(self._fill_tied_copy)

    def _fill_tied_copy(self, state_dict: dict, prefix: str, *args: object) -> None:
        # a checkpoint holds a tied head only as the embedding: the pipeline's last stage loads its copy from it
        head, embed = prefix + "lm_head.weight", prefix + "model.embed_tokens.weight"
        if self.lm_head is not None and getattr(self.lm_head.weight, "pipeline_tied", None) == "copy":
            if head not in state_dict and embed in state_dict:
                state_dict[head] = state_dict[embed]

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        targets: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        num_logits_to_keep: int = 0,
        per_token: bool = False,
    ) -> CausalLMOutput:
        """Run the decoder on (B, T) ids.

        targets: (B, T) ids to predict at each position (already shifted; -100 = ignore) -> mean loss.
        per_token: with targets, return the (B, T) log-probabilities of the targets (`token_logps`) instead of
            the loss (preference losses need them per sequence); needs parallel.cp=1.
        document_ids: (B, T) ids of the packed documents -> attention stays inside each document and positions
            restart per document (unless position_ids are given).
        cache: a KV cache (generation); position_ids must then be given.
        num_logits_to_keep: without targets, return logits of the last N positions only (0 = all).
        """
        if self.part != ModelPart.whole(self.config):
            raise ValueError("this rank holds one pipeline part of the model: run it through modeling.pipeline")
        position_ids, mask = self.attention_inputs(input_ids.shape, input_ids.device, position_ids, document_ids, cache)
        x = self.embed(self.local(input_ids), cache)
        x = self.run_layers(x, position_ids, mask, cache)
        local = self.local(targets)
        aux = self.aux_loss() if targets is not None else None
        return self.finish(x, local, num_logits_to_keep, aux=aux, per_token=per_token)

    def local(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's tokens of a (B, T, ...) tensor under context parallelism (modeling.context), else `x`."""
        return context.shard(self.state, x) if context.active(self.state) else x

    def attention_inputs(
        self,
        shape: tuple[int, int],
        device: torch.device,
        position_ids: torch.Tensor | None,
        document_ids: torch.Tensor | None,
        cache: Cache | None,
    ) -> tuple[torch.Tensor, torch.Tensor | context.ContextMask | flex.FlexMask | None]:
        """(B, T) position ids (given, per document, or 0..T-1) and the attention mask (None = causal).

        The positions are the whole sequences', under context parallelism too (run_layers takes this rank's).

        The mask is causal_mask's rule: within each document when `document_ids` are given, over the last
        config.sliding_window tokens when it is set; the cache builds its own over the cached keys. Plain causal
        attention (no documents, no window) passes no mask, so that SDPA runs its is_causal kernel. Where
        `attention_backend` picks FlexAttention (modeling.flex: CUDA and a mask, by default) the mask is one
        FlexMask for the batch, and no (T, T) tensor is built.
        """
        B, T = shape
        if position_ids is None:
            if document_ids is not None:
                position_ids = positions_from_documents(document_ids)
            else:
                position_ids = torch.arange(T, device=device).expand(B, T)
        window = self.config.sliding_window
        if cache is not None:
            return position_ids, cache.attention_mask(T)
        if context.active(self.state):  # this rank's tokens; attention reads the others' from the context group
            docs = context.shard(self.state, document_ids)  # (B, T/cp)
            return position_ids, context.context_mask(self.state, T, device, docs, window)
        window = window if window is not None and window < T else None  # a window as long as T hides nothing
        masked = document_ids is not None or window is not None
        backend = flex.choose_backend(self.attention_backend, device, masked=masked, head_dim=self.config.head_dim)
        if backend == "flex":
            return position_ids, flex.flex_mask(T, device, document_ids, window)  # one BlockMask, every layer
        if document_ids is None and window is None:
            return position_ids, None
        if document_ids is None:
            idx = torch.arange(T, device=device)
            return position_ids, causal_mask(idx, idx, window)[None, None]  # (1, 1, T, T), broadcast over the batch
        return position_ids, document_causal_mask(document_ids, window)

    def embed(self, input_ids: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, H), or (B, T/tp, H) under sequence parallelism."""
        T = input_ids.shape[1]
        if self.state.sequence_parallel and (cache is not None or T % self.state.tp_size):
            raise ValueError(
                f"sequence parallelism needs no KV cache and a sequence length divisible by tp="
                f"{self.state.tp_size} (got T={T}); build the model without sequence_parallel for generation"
            )
        return self.model.embed_tokens(input_ids)

    def run_layers(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None = None,
        *,
        layers: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """Decoder layers in order (this rank's, or the given global indices): (B, T, H) -> (B, T, H).

        T/tp under sequence parallelism.
        """
        # this rank's positions under context parallelism; dynamic scaling's length is the whole sequence's
        cos, sin = self.model.rotary_emb(self.local(position_ids), x.dtype, sequence=position_ids)  # (B, T, hd)
        keys = self.model.layers.keys() if layers is None else [str(i) for i in layers]
        for key in keys:
            layer, layer_cache = self.model.layers[key], cache.layer(int(key)) if cache is not None else None
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, layer_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, layer_cache)
        return x

    def finish(
        self,
        x: torch.Tensor,
        targets: torch.Tensor | None,
        num_logits_to_keep: int = 0,
        *,
        aux: torch.Tensor | None = None,
        per_token: bool = False,
    ) -> CausalLMOutput:
        """Final norm and head: given targets the loss, cross-entropy + `aux` (MoE aux losses), else the logits.

        per_token (targets given, no context parallelism): the (B, T) target log-probabilities, no loss.
        """
        split = context.active(self.state)  # x holds this rank's tokens of each sequence (targets too)
        if per_token and targets is None:
            raise ValueError("per_token=True returns the log-probabilities of the targets: pass targets=(B, T) ids")
        if per_token and split:
            raise ValueError(
                f"per-token log-probabilities need parallel.cp=1 (got cp={self.state.cp_size}): each context rank "
                f"holds only its chunks of a sequence; set parallel.cp=1 for preference tuning (dpo.py)"
            )
        x = self.model.norm(x)
        if per_token:
            # (B*T,) on every tensor rank: under sequence parallelism the head gathers the sequence first
            nll = self.lm_head(x, targets, reduction="none")
            token_logps = -nll.view(targets.shape)  # (B, T)
            ce = nll.sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)
            return CausalLMOutput(ce_loss=ce, aux_loss=aux, token_logps=token_logps)
        if targets is not None:
            ce = self.lm_head(x, targets)  # fused head + vocab-parallel loss: logits neither gathered nor kept
            if split:  # this chunk's share of the whole sequence's loss (modeling.context)
                loss, mean = context.loss_share(self.state, ce, targets, aux=aux)
                return CausalLMOutput(loss=loss, ce_loss=mean, aux_loss=aux)
            return CausalLMOutput(loss=ce if aux is None else ce + aux, ce_loss=ce, aux_loss=aux)
        if num_logits_to_keep and not (self.state.sequence_parallel or split):
            x = x[:, -num_logits_to_keep:]  # (B, N, H)
        logits = self.lm_head(x)  # (B, T', V'/tp), V' the vocabulary padded to a multiple of tp
        if num_logits_to_keep and not split:
            logits = logits[:, -num_logits_to_keep:]
        logits = gather_from_region(logits, self.state.tp_group, -1)  # (B, T', V')
        if split:
            logits = context.gather_logits(self.state, logits)  # (B, T, V') in sequence order
            logits = logits[:, -num_logits_to_keep:] if num_logits_to_keep else logits
        return CausalLMOutput(logits=logits[..., : self.config.vocab_size])  # (B, T', V): padding sliced off

    def aux_loss(self, layers: Iterable[int] | None = None) -> torch.Tensor | None:
        """Sum of the aux losses of this rank's MoE layers (those in `layers` when given); None without any."""
        wanted = None if layers is None else set(layers)
        losses = [m.aux_loss for i, m in self.moe_layers() if wanted is None or i in wanted]
        return torch.stack(losses).sum() if losses else None

    def moe_layers(self) -> list[tuple[int, MoEMLP]]:
        """(layer index, MoEMLP) of every mixture-of-experts layer, in layer order (empty for a dense model)."""
        layers = self.model.layers.items()
        return [(int(i), layer.mlp) for i, layer in layers if isinstance(layer.mlp, MoEMLP)]

    def update_expert_bias(self) -> None:
        """After an optimizer step: each MoE layer's auxiliary-loss-free bias update (collective; see MoEMLP)."""
        for _, moe in self.moe_layers():
            moe.update_expert_bias()
