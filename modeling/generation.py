"""Autoregressive generation with a preallocated KV cache: greedy, temperature, top-k, top-p, EOS stop.

A batch of prompts of different lengths is left-padded; padded keys are masked out and positions count real
tokens only, so each row generates what it would alone. Under tensor parallelism every rank runs the same loop;
the gathered logits are identical on all tensor ranks and the chosen tokens are broadcast from tensor rank 0; a
model trained with sequence parallelism generates with whole sequences (whole_sequences).
Expert-parallel ranks (a mixture-of-experts model run with ep > 1) all run the same prompts, exchanging tokens with
their experts' ranks in every MoE layer; the chosen tokens are broadcast from expert rank 0 first. Under pipeline
parallelism (modeling.pipeline.PipelinedCausalLM) every stage gets the last stage's logits and the first stage's
choice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from modeling.attention import LayerCache
from modeling.llama import LlamaForCausalLM, causal_mask
from parallel.mappings import group_size
from parallel.state import ParallelState


class KVCache:
    """Keys and values of every layer, (B, kv_heads/tp, max_len, head_dim) each, plus which slots hold real tokens."""

    def __init__(self, model: LlamaForCausalLM, batch_size: int, max_len: int) -> None:
        cfg, p = model.config, next(model.parameters())
        shape = (batch_size, cfg.num_key_value_heads // model.state.tp_size, max_len, cfg.head_dim)
        self.keys = [p.new_empty(shape) for _ in range(cfg.num_hidden_layers)]
        self.values = [p.new_empty(shape) for _ in range(cfg.num_hidden_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=p.device)  # (B, max_len)
        self.length = 0
        self.sliding_window = cfg.sliding_window

    def layer(self, index: int) -> LayerCache:
        """Buffers of one layer and the first free position."""
        return self.keys[index], self.values[index], self.length

    def attention_mask(self, num_new: int) -> torch.Tensor:
        """(B, 1, T, S) bool: causal_mask over cache slots, padded keys hidden, each query sees itself.

        Slots are absolute indices of the sequence (prompts are left-padded, so the distance between two real tokens
        is the same in slots and in positions): the model's sliding window applies to the cached keys as in training.
        """
        S = self.length + num_new
        q_pos = torch.arange(self.length, S, device=self.valid.device)  # (T,)
        k_pos = torch.arange(S, device=self.valid.device)  # (S,)
        mask = causal_mask(q_pos, k_pos, self.sliding_window) & self.valid[:, None, :S]  # (B, T, S)
        return (mask | (k_pos == q_pos[:, None])).unsqueeze(1)  # a padded query attends to itself: no all-masked row

    def forward(self, model: LlamaForCausalLM, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor):
        """Feed (B, T) new tokens, return the (B, V) logits of the last one, and advance the cache."""
        T = ids.shape[1]
        self.valid[:, self.length : self.length + T] = valid
        logits = model(ids, position_ids=positions, cache=self, num_logits_to_keep=1).logits  # (B, 1, V)
        self.length += T
        return logits[:, -1].float()


@contextmanager
def whole_sequences(model: nn.Module) -> Iterator[None]:
    """Sequence and context parallelism off in every module of `model` for the duration, back on after.

    A KV cache feeds a few tokens at a time, which cannot be split over the tensor or the context group: generation
    runs the layers with whole sequences (the same weights, the same results) on every rank, also in a model trained
    with parallel.sequence_parallel or parallel.cp > 1.
    """
    swapped = []
    for module in model.modules():
        state = getattr(module, "state", None)
        if isinstance(state, ParallelState) and (state.sequence_parallel or state.context_parallel):
            swapped.append((module, state))
            module.state = dataclasses.replace(state, sequence_parallel=False, context_parallel=False)
    try:
        yield
    finally:
        for module, state in swapped:
            module.state = state


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. temperature 0 is greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the tokens before this one already reach top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def eos_ids(eos_token_id: int | list[int] | None) -> set[int]:
    """The stop ids of an eos_token_id as configs give it: one id, a list of ids, or None (no stop)."""
    return set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])


def generate(
    model: LlamaForCausalLM,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (EOS included when reached), at most `max_new_tokens` each.

    `on_token(row, token)` is called for each new token as soon as it is chosen (streaming), on every rank.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, L, dtype=torch.long, device=device)
    valid = torch.zeros(B, L, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):  # left padding
        ids[b, L - len(p) :] = torch.tensor(p, device=device)
        valid[b, L - len(p) :] = True
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, L): real tokens count from 0

    model.eval()
    eos = eos_ids(eos_token_id)
    with whole_sequences(model):
        cache = KVCache(model, B, L + max_new_tokens)
        logits = cache.forward(model, ids, positions, valid)  # (B, V)
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        tp_group, ep_group, pp_group = model.state.tp_group, model.state.ep_group, model.state.pp_group
        for step in range(max_new_tokens):
            token = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)  # (B,)
            if group_size(pp_group) > 1:  # pipeline stages sampled on their own generators: stage 0's token
                dist.broadcast(token, src=dist.get_global_rank(pp_group, 0), group=pp_group)
            if group_size(ep_group) > 1:  # expert ranks must feed the same tokens: their all-to-alls pair up
                dist.broadcast(token, src=dist.get_global_rank(ep_group, 0), group=ep_group)
            if group_size(tp_group) > 1:
                dist.broadcast(token, src=dist.get_global_rank(tp_group, 0), group=tp_group)
            for b, t in enumerate(token.tolist()):
                if not done[b]:
                    out[b].append(t)
                    done[b] = t in eos
                    if on_token is not None:
                        on_token(b, t)
            if all(done) or step == max_new_tokens - 1:
                break
            positions = positions[:, -1:] + 1  # (B, 1)
            logits = cache.forward(
                model, token.unsqueeze(1), positions, torch.ones_like(token, dtype=torch.bool)[:, None]
            )
        return out
