"""The reference policy of preference tuning (dpo.py): its sequence log-probabilities, live or precomputed.

The reference is the model the run starts from (`model.init_from`), frozen. Where it comes from:

- LoRA (`lora.enabled`): the policy itself with its adapters left out (parallel.lora.adapters_off) and in eval
  mode (no dropout, no MoE load counting): no second copy of the weights.
- Full fine-tuning: a frozen copy built from `model.init_from` on this rank, sharded exactly like the policy: the
  same tensor/expert shards, bf16 where DeepSpeed casts the policy, and partitioned over the data-parallel group by
  DeepSpeed under ZeRO-3 (parallel.deepspeed_engine.frozen_like_policy). It costs one more copy of the weights
  (1/dp of it under ZeRO-3).
- `dpo.precompute_reference: true`: before the first step, one pass over every pair of data.train and data.valid
  stores the reference's log-probabilities in `checkpoint.dir/reference_logps.safetensors` (the pairs split over
  the data-parallel ranks, then summed), and the copy is freed. A resumed run reads the file back when it was made
  from the same data, tokenizer and model; otherwise it computes it again.

A sequence's log-probability is the sum over its labelled tokens (the response and its end-of-turn) of
log p(token | everything before it), computed like the policy's (same autocast, same kernels).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from dataset.preference import PreferenceDataset, iter_all_pairs
from modeling.llama import LlamaForCausalLM
from parallel.deepspeed_engine import frozen_like_policy
from parallel.lora import adapters_off
from training import checkpoint as ckpt_io
from training.distributed import any_rank
from training.dpo_loss import sequence_logps

TABLE_FILE = "reference_logps.safetensors"

# (2B, T) input ids and targets -> (2B, T) per-token log-probabilities of the reference, without gradients
TokenLogps = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ReferencePolicy:
    """Sequence log-probabilities of the reference for a batch of pairs: from a live forward or the stored table.

    Args:
        forward: the live reference (None once a table replaced it).
        tables: {"train" | "valid": (pairs, 2) fp32 [chosen, rejected] sums}, on the training device, or None.
    """

    def __init__(self, forward: TokenLogps | None, tables: dict[str, torch.Tensor] | None = None) -> None:
        self.forward, self.tables = forward, tables

    def logps(
        self, input_ids: torch.Tensor, targets: torch.Tensor, pair_index: torch.Tensor, split: str
    ) -> torch.Tensor:
        """(2B,) summed log-probabilities: rows [chosen of pairs 0..B-1, rejected of pairs 0..B-1]."""
        if self.tables is not None:
            table = self.tables[split][pair_index.to(self.tables[split].device)]  # (B, 2)
            return torch.cat([table[:, 0], table[:, 1]])
        return sequence_logps(self.forward(input_ids, targets), targets)[0]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def lora_reference(model: nn.Module, autocast: Callable[[], Any]) -> TokenLogps:
    """The policy without its adapters, in eval mode (the LoRA reference)."""

    def forward(input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), adapters_off(model), _eval_mode(model), autocast():
            return model(input_ids, targets=targets, per_token=True).token_logps

    return forward


def frozen_reference(trainer: Any) -> TokenLogps:
    """A frozen copy of `model.init_from` placed like the trainer's policy (module docstring)."""
    cfg, state = trainer.cfg, trainer.state
    devices = [trainer.device] if trainer.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # its random init must not move the run's RNG (exact resume)
        model = LlamaForCausalLM(trainer.model_cfg, state, device=trainer.device, dtype=torch.float32)
    model.attention_backend = cfg.train.attention
    ckpt_io.load_model_weights(model, Path(trainer.init_source()), state)
    model.requires_grad_(False)
    model.eval()  # no grad: train.compile's graphs would not run here (modeling.compile compiles training forwards)
    ds_config = cfg.deepspeed_json()
    if ds_config is not None and trainer.engine.zero_stage:
        model = frozen_like_policy(
            model,
            ds_config=ds_config,
            state=state,
            micro_batch_size=cfg.train.micro_batch_size,
            grad_accum=trainer.grad_accum,
            grad_clip=cfg.optim.grad_clip,
            bf16=trainer.dtype == torch.bfloat16,
        )

    def forward(input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), trainer.autocast():
            return model(input_ids, targets=targets, per_token=True).token_logps

    return forward


def table_identity(trainer: Any, datasets: dict[str, PreferenceDataset]) -> str:
    """A hash of what a stored table depends on: the reference's weights and model, and each data set's content.

    The weights are model.init_from's files (names, sizes, modification times), the model its resolved config and
    the compute dtype; a data set's content is its pairs' token ids, labels and boundaries (a swapped pair or an
    edited reply changes it), and its fingerprint (files, seq_len, tokenizer, ...).
    """
    source = Path(trainer.init_source()).resolve()
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in source.rglob("*") if p.is_file())
    h = hashlib.sha1(json.dumps([str(source), files, trainer.model_cfg.to_hf_dict(), str(trainer.dtype)]).encode())
    for name in sorted(datasets):
        d = datasets[name]
        h.update(json.dumps([name, d.fingerprint()], sort_keys=True, default=str).encode())
        for part in (d.tokens.numpy(), d.labelled.numpy(), torch.tensor(d.offsets).numpy()):
            h.update(part.tobytes())
    return h.hexdigest()


def compute_table(forward: TokenLogps, dataset: PreferenceDataset, trainer: Any, batch_size: int) -> torch.Tensor:
    """(pairs, 2) reference log-probabilities [chosen, rejected] of every pair of `dataset`.

    The pairs are split over the data-parallel ranks, then summed over them. Every rank runs the same number of
    forwards (ZeRO-3's are collective): a rank with fewer pairs repeats its last batch and keeps nothing of it.
    """
    state, device = trainer.state, trainer.device
    table = torch.zeros(len(dataset), 2, dtype=torch.float64, device=device)
    share = math.ceil(len(dataset) / state.dp_size)  # pairs of the largest share
    batches, batch = iter_all_pairs(dataset, batch_size, state.dp_rank, state.dp_size), None
    for _ in range(math.ceil(share / batch_size)):
        mine = next(batches, None)
        batch = mine if mine is not None else batch  # every rank has a pair (ChatDataset: len >= dp)
        ids, targets = flatten_pairs(batch["input_ids"].to(device)), flatten_pairs(batch["targets"].to(device))
        sums = sequence_logps(forward(ids, targets), targets)[0].double()  # (2B,)
        if mine is not None:  # a repeated batch only keeps the ranks in step
            B = ids.shape[0] // 2
            table[batch["pair_index"].to(device)] = torch.stack([sums[:B], sums[B:]], dim=1)
    if state.dp_size > 1:
        dist.all_reduce(table, group=state.dp_group)
    return table.float()


def flatten_pairs(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, T) pairs -> (2B, T): the chosen rows of the B pairs, then their rejected rows."""
    return x.transpose(0, 1).reshape(-1, x.shape[-1])  # (2B, T)


def precomputed_reference(
    trainer: Any, live: Callable[[], TokenLogps], datasets: dict[str, PreferenceDataset], say: Callable[[str], None]
) -> ReferencePolicy:
    """The tables of `datasets`, read from checkpoint.dir when they match, else computed (rank 0 writes them).

    `live()` builds the live reference for the pass; it is dropped after it (a frozen copy with it).
    """
    path = Path(trainer.cfg.checkpoint.dir) / TABLE_FILE
    identity = table_identity(trainer, datasets)
    tables = _read_table(path, identity, say)
    if not any_rank(tables is None, trainer.device):  # every rank reads it, or all compute (the pass is collective)
        say(f"reference log-probabilities: read {path}")
        return ReferencePolicy(None, {k: v.to(trainer.device) for k, v in tables.items()})
    forward, batch = live(), trainer.cfg.train.micro_batch_size
    tables = {k: compute_table(forward, d, trainer, batch) for k, d in datasets.items()}
    del forward  # a frozen copy goes with it
    gc.collect()
    if trainer.device.type == "cuda":
        torch.cuda.empty_cache()
    if trainer.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.cpu().contiguous() for k, v in tables.items()}, str(tmp), metadata={"identity": identity})
        os.replace(tmp, path)  # atomic: a crash leaves the old file or none
        say(f"reference log-probabilities: {sum(len(t) for t in tables.values())} pairs written to {path}")
    if dist.is_initialized():
        dist.barrier()
    return ReferencePolicy(None, tables)


def _read_table(path: Path, identity: str, say: Callable[[str], None]) -> dict[str, torch.Tensor] | None:
    """The stored tables when `path` holds those of `identity`, else None (saying why when there is a file)."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("identity") != identity:
                say(f"reference log-probabilities: {path} was made from other data or weights; computing them again")
                return None
            return {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        say(f"reference log-probabilities: {path} cannot be read ({e}); computing them again")
        return None
