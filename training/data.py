"""What the training loop eats: the streaming loaders of `dataset/`, or a synthetic global stream of sequences.

Every training loader satisfies `TrainData`: dataset.loader.GlobalBatchLoader (pretraining text over
dataset.streaming.StreamingDataset, SFT conversations over dataset.sft.SFTDataset) and SyntheticLoader below.

Every loader numbers the sequences of the run globally: with C sequences consumed before a step, data-parallel rank
r trains on sequences C + r*S .. C + (r+1)*S - 1 (S = micro_batch x grad_accum), micro-batch m on C + r*S + m*B ..,
so any data-parallel layout and accumulation split of one global batch sees the same sequences: runs at different
dp/tp/ZeRO settings are comparable step by step, and a checkpoint resumes at any layout (dataset/loader.py: the
state, and merge_states for the parts of the dp ranks). A synthetic sequence is an arithmetic progression modulo
the vocabulary with a random start and stride, so a model can learn it and the loss falls.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch

from configs.schema import TrainConfig
from dataset.loader import STATE_VERSION, GlobalBatchLoader, Layout, check_state, global_batch_warnings
from dataset.tokenizer import Tokenizer

MAX_AUTO_WORKERS = 4  # data.num_workers=auto on CUDA: at most this many workers per rank


@runtime_checkable
class TrainData(Protocol):
    """What the trainer needs from its data: an infinite, resumable stream of batches with counters."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches `{"input_ids", "targets"[, "document_ids"]}` of (B, seq_len), from the current position on.

        The trainer calls iter() once, after any load_state_dict(), and next() on what it returns.
        """

    def state_dict(self) -> dict[str, Any]:
        """This rank's part of the position at a step boundary (plain python; see dataset.loader.merge_states)."""

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        """Continue from a merged state (before iterating) at any layout; returns warnings (another global batch)."""

    def stats(self) -> dict[str, Any]:
        """Counters; `skipped` (a count, or counts by reason) is logged as data_skipped."""


class SyntheticLoader:
    """Batches of (input_ids, targets) for one rank: global sequence n is `sequence(n)`; state = sequences consumed.

    With `documents` (data.document_attention) each batch also has `document_ids`: every sequence is cut into one
    to four documents at positions drawn from its own generator after its ids, so the tokens are the same with
    documents or without and only the attention mask (and the positions, which restart per document) differs.
    With `pin_memory` (training on CUDA) the batches are in page-locked memory, as the streaming loader's are: a
    copy from pageable memory to the GPU first waits for the GPU's queued work, a host sync per micro-batch.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        seq_len: int,
        micro_batch: int,
        grad_accum: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        documents: bool = False,
        pin_memory: bool = False,
    ) -> None:
        self.vocab, self.seq_len, self.seed, self.documents = vocab_size, seq_len, seed, documents
        self.pin_memory = pin_memory
        self.layout = Layout(micro_batch, grad_accum, dp_rank, dp_size)
        self.layout.check()
        self.consumed = 0  # C: global sequences consumed before the current step
        self.handed = 0  # micro-batches of the current step handed out

    def sequence(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global sequence `index`: seq_len + 1 ids, and the document index of each of its seq_len input positions.

        The ids are an arithmetic progression modulo the vocabulary (learnable: the loss falls). Documents start at
        position 0 and at 0 to 3 positions drawn from [1, seq_len) (a position drawn twice starts one document).
        """
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        start = torch.randint(self.vocab, (1,), generator=g)
        stride = torch.randint(1, 8, (1,), generator=g)
        ids = (start + stride * torch.arange(self.seq_len + 1)) % self.vocab
        starts = torch.zeros(self.seq_len, dtype=torch.long)  # (T,): 1 where a document starts after position 0
        if self.seq_len > 1:
            cuts = int(torch.randint(4, (1,), generator=g))
            starts[torch.randint(1, self.seq_len, (cuts,), generator=g)] = 1
        return ids, starts.cumsum(0)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        B = self.layout.micro_batch
        first = self.layout.rows(self.consumed)[self.handed * B]
        ids, docs = zip(*(self.sequence(first + i) for i in range(B)), strict=True)
        windows = torch.stack(ids)  # (B, T+1)
        self.handed = (self.handed + 1) % self.layout.grad_accum
        if self.handed == 0:
            self.consumed += self.layout.global_batch
        batch = {"input_ids": windows[:, :-1], "targets": windows[:, 1:]}
        if self.documents:
            batch["document_ids"] = torch.stack(docs)  # (B, T)
        if self.pin_memory:  # contiguous: CUDA copies a strided view through a pageable temporary
            batch = {k: v.contiguous().pin_memory() for k, v in batch.items()}
        return batch

    def _fingerprint(self) -> dict[str, Any]:
        return {"seed": self.seed, "seq_len": self.seq_len, "vocab_size": self.vocab}

    def state_dict(self) -> dict[str, Any]:
        """Sequences consumed (the same on every rank), at a step boundary; the schema of dataset.loader."""
        if self.handed:
            raise RuntimeError(
                f"data loader state_dict() inside a step ({self.handed} of {self.layout.grad_accum} micro-batches "
                "handed out): call it at a step boundary"
            )
        return {
            "version": STATE_VERSION,
            "kind": "synthetic",
            "fingerprint": self._fingerprint(),
            "num_streams": 0,
            "consumed": self.consumed,
            "global_batch": self.layout.global_batch,
            "streams": {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        """Continue at sequence `consumed` of the state (another global batch size: with a warning)."""
        check_state(state, "synthetic", self._fingerprint())
        self.consumed, self.handed = int(state["consumed"]), 0
        return global_batch_warnings(state["global_batch"], self.layout.global_batch, self.consumed, 0)

    def stats(self) -> dict[str, Any]:
        """Nothing is ever skipped here."""
        return {"skipped": 0}


def default_num_workers(cuda: bool, cpus: int | None = None, local_ranks: int | None = None) -> int:
    """Workers per rank for data.num_workers=auto: 0 on the CPU; on CUDA min(4, cpus per rank - 1), at least 1.

    On the CPU the step's matmuls already keep every core busy (torch's intra-op threads), so a worker would take
    cores from them, and each costs a process start per run. On CUDA the main process only queues kernels while
    the cores beside each GPU sit idle: workers tokenize ahead there, leaving one core per rank to the main
    process. One worker reads about 1.5M tokens/s (bench/README.md, dataloader.py), 20x what a 1B model trains on
    an H100; up to 4 leave room for slower data (long JSON records, mixtures) without piling up processes.
    `cpus`: the cores this process may run on (its affinity), `local_ranks`: the ranks on this node (torchrun's
    LOCAL_WORLD_SIZE), both read from the system when not given.
    """
    if not cuda:
        return 0
    cpus = cpus if cpus is not None else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    local_ranks = local_ranks if local_ranks is not None else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(MAX_AUTO_WORKERS, cpus // max(1, local_ranks) - 1))


def build_train_loader(
    cfg: TrainConfig,
    tokenizer: Tokenizer | None,
    *,
    vocab_size: int,
    dp_rank: int,
    dp_size: int,
    device: torch.device | None = None,
) -> TrainData:
    """This rank's training batches (infinite, resumable at any layout), pinned for `device` when it is CUDA."""
    d, t = cfg.data, cfg.train
    grad_accum = t.global_batch_size // (t.micro_batch_size * dp_size)
    cuda = device is not None and device.type == "cuda"
    if d.synthetic:
        return SyntheticLoader(
            vocab_size=vocab_size,
            seq_len=d.seq_len,
            micro_batch=t.micro_batch_size,
            grad_accum=grad_accum,
            dp_rank=dp_rank,
            dp_size=dp_size,
            seed=t.seed,
            documents=d.document_attention,
            pin_memory=cuda,
        )
    from dataset.streaming import StreamingDataset

    ds = StreamingDataset(
        cfg.data_sources(),
        tokenizer,
        d.seq_len,
        seed=t.seed,
        add_bos=d.add_bos,
        text_field=d.text_field,
        return_document_ids=d.document_attention,
        on_error=d.on_error,
    )
    return GlobalBatchLoader(
        ds,
        micro_batch=t.micro_batch_size,
        grad_accum=grad_accum,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_workers=default_num_workers(cuda) if d.num_workers == "auto" else d.num_workers,
        pin_memory=cuda,
    )


def build_eval_batches(
    cfg: TrainConfig, tokenizer: Tokenizer, *, dp_rank: int, dp_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The first cfg.train.eval_batches batches of data.valid in file order (the same at every eval)."""
    from dataset.rank_loader import build_dataloader
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
