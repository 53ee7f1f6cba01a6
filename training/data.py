"""What the training loop eats: the streaming loaders of `dataset/`, or a synthetic global stream of sequences.

Every training loader satisfies `TrainData`: dataset.loader.StreamingLoader (pretraining text),
dataset.sft.SFTLoader (conversations) and SyntheticLoader below.

The synthetic stream numbers every sequence of the run globally (step s, position j of the global batch), so
any data-parallel layout and accumulation split of one global batch sees the same sequences: that makes runs at
different dp/tp/ZeRO settings comparable step by step. Each sequence is an arithmetic progression modulo the
vocabulary with a random start and stride, so a model can learn it and the loss falls.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch

from configs.schema import TrainConfig
from dataset.tokenizer import Tokenizer


@runtime_checkable
class TrainData(Protocol):
    """What the trainer needs from its data: an infinite, resumable stream of batches with counters."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches `{"input_ids", "targets"[, "document_ids"]}` of (B, seq_len), from the current position on.

        The trainer calls iter() once, after any load_state_dict(), and next() on what it returns.
        """

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch handed out (plain python; saved in every checkpoint)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state_dict() (before iterating): the next batch is the one that would have come."""

    def stats(self) -> dict[str, Any]:
        """Counters; `skipped` (a count, or counts by reason) is logged as data_skipped."""


class SyntheticLoader:
    """Batches of (input_ids, targets) for one rank; state = how many micro-batches it has produced."""

    def __init__(
        self, *, vocab_size: int, seq_len: int, micro_batch: int, grad_accum: int, dp_rank: int, dp_size: int, seed: int
    ) -> None:
        self.vocab, self.seq_len, self.micro, self.accum = vocab_size, seq_len, micro_batch, grad_accum
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.consumed = 0  # micro-batches produced on this rank

    def sequence(self, index: int) -> torch.Tensor:
        """Global sequence `index`: seq_len + 1 ids."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        start = torch.randint(self.vocab, (1,), generator=g)
        stride = torch.randint(1, 8, (1,), generator=g)
        return (start + stride * torch.arange(self.seq_len + 1)) % self.vocab

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        step, micro = divmod(self.consumed, self.accum)
        global_batch = self.micro * self.accum * self.dp_size
        first = step * global_batch + (self.dp_rank * self.accum + micro) * self.micro
        windows = torch.stack([self.sequence(first + i) for i in range(self.micro)])  # (B, T+1)
        self.consumed += 1
        return {"input_ids": windows[:, :-1], "targets": windows[:, 1:]}

    def state_dict(self) -> dict[str, Any]:
        """Position in the stream."""
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state_dict()."""
        self.consumed = int(state["consumed"])

    def stats(self) -> dict[str, Any]:
        """Nothing is ever skipped here."""
        return {"skipped": 0}


def build_train_loader(
    cfg: TrainConfig, tokenizer: Tokenizer | None, *, vocab_size: int, dp_rank: int, dp_size: int
) -> TrainData:
    """This rank's training batches (infinite, resumable)."""
    d, t = cfg.data, cfg.train
    if d.synthetic:
        return SyntheticLoader(
            vocab_size=vocab_size,
            seq_len=d.seq_len,
            micro_batch=t.micro_batch_size,
            grad_accum=t.global_batch_size // (t.micro_batch_size * dp_size),
            dp_rank=dp_rank,
            dp_size=dp_size,
            seed=t.seed,
        )
    from dataset.loader import build_dataloader
    from dataset.streaming import StreamingDataset

    ds = StreamingDataset(
        cfg.data_sources(),
        tokenizer,
        d.seq_len,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=t.seed,
        add_bos=d.add_bos,
        text_field=d.text_field,
        return_document_ids=d.document_attention,
        on_error=d.on_error,
    )
    return build_dataloader(ds, t.micro_batch_size, num_workers=d.num_workers)


def build_eval_batches(
    cfg: TrainConfig, tokenizer: Tokenizer, *, dp_rank: int, dp_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The first cfg.train.eval_batches batches of data.valid in file order (the same at every eval)."""
    from dataset.loader import build_dataloader
    from dataset.streaming import StreamingDataset

    d = cfg.data
    ds = StreamingDataset(
        d.valid,
        tokenizer,
        d.seq_len,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=0,
        add_bos=d.add_bos,
        text_field=d.text_field,
        return_document_ids=d.document_attention,
        on_error=d.on_error,
        infinite=True,  # every rank gets exactly eval_batches batches (ZeRO-3 forwards are collective)
        shuffle=False,
    )
    for i, batch in enumerate(build_dataloader(ds, cfg.train.micro_batch_size, num_workers=0)):
        if i >= cfg.train.eval_batches:
            return
        yield batch


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (byte-fallback pieces 1, control pieces 0), for bits per byte."""
    lengths = torch.zeros(vocab_size, dtype=torch.float64)
    if tokenizer.sp is not None:
        sp = tokenizer.sp
        for i in range(sp.get_piece_size()):
            if sp.is_byte(i):
                lengths[i] = 1
            elif not (sp.is_control(i) or sp.is_unknown(i)):
                lengths[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    else:
        for i in range(min(vocab_size, len(tokenizer.hf))):
            lengths[i] = len(tokenizer.hf.decode([i]).encode("utf-8"))
    return lengths
