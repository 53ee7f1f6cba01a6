"""One rank's own batches of a StreamingDataset, for evaluation and inspection (no saved state, no global batch).

    loader = build_dataloader(dataset, batch_size=4, num_workers=2)   # dataset built with dp_rank, dp_size
    for batch in loader: ...                                          # {"input_ids", "targets"[, ...]} (B, T)

Training reads through dataset/loader.py's GlobalBatchLoader instead, whose batches and state are the same at any
layout; this loader's streams are per rank (stream `dp_rank * W + w` of `dp_size * W`), so eval batches and
`python -m dataset.stream_cli` need nothing but the dataset.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

if TYPE_CHECKING:
    from dataset.streaming import StreamingDataset


class StreamingLoader:
    """One rank's own batches of a StreamingDataset (per-rank streams, no saved state): evaluation and inspection.

    Worker w reads stream `dp_rank * W + w` of `dp_size * W` (W = max(1, num_workers)); batches come round-robin
    from workers 0, 1, ... An infinite dataset's iter() goes on where the last batch handed out left off; a finite
    one gives one whole pass per iter() (the same every time), whose last batch may have fewer rows.
    """

    def __init__(self, dataset: StreamingDataset, batch_size: int, num_workers: int = 0, pin_memory: bool = False):
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and num_workers={num_workers} >= 0")
        self.dataset, self.batch_size, self.num_workers, self.pin_memory = dataset, batch_size, num_workers, pin_memory
        self.n_streams = max(1, num_workers)
        self.states: list[dict | None] = [None] * self.n_streams  # each stream's state after its last batch
        self.next_stream = self.batches = 0
        self.wait_s = 0.0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self.dataset.infinite:
            self.states, self.next_stream = [None] * self.n_streams, 0
        work = _RankBatches(self.dataset, self.batch_size, list(self.states), self.next_stream)
        loader = DataLoader(
            work, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, generator=torch.Generator()
        )
        it = iter(loader)
        try:
            while True:
                t0 = time.perf_counter()
                batch = next(it, None)
                self.wait_s += time.perf_counter() - t0
                if batch is None:
                    return
                stream = batch.pop("_stream")
                self.states[stream] = json.loads(batch.pop("_state"))
                self.next_stream, self.batches = (stream + 1) % self.n_streams, self.batches + 1
                yield batch
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)  # as in GlobalBatchLoader.__iter__
            if shutdown is not None:
                shutdown()

    @property
    def epoch(self) -> int:
        """Epochs every stream has completed of every source (the smallest current epoch)."""
        return self.stats()["epoch"]

    def stats(self) -> dict[str, Any]:
        """documents, tokens, skipped (by reason), tokens_per_s, epoch (of the latest states), batches, wait_s."""
        states = [s for s in self.states if s is not None]
        stats = self.dataset.stream_stats(states)
        if len(states) < self.n_streams:  # a stream not started yet is in epoch 0
            stats["epoch"] = 0
        return {**stats, "batches": self.batches, "wait_s": self.wait_s}


class _RankBatches(IterableDataset):
    """What each worker of a StreamingLoader runs: a stream's batches from its state, each with the state after it.

    Worker w serves stream `(w + first) % W`, so that the round-robin goes on at the stream whose turn it is.
    """

    def __init__(self, ds: StreamingDataset, batch_size: int, states: list, first: int) -> None:
        self.ds, self.batch_size, self.states, self.first = ds, batch_size, states, first

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        n = len(self.states)
        stream = ((0 if info is None else info.id) + self.first) % n
        for out in self.ds.batches(self.batch_size, stream=stream, n_streams=n, state=self.states[stream]):
            yield {**out.batch, "_stream": stream, "_state": json.dumps(out.state)}


def build_dataloader(
    ds: StreamingDataset, batch_size: int, num_workers: int = 0, *, pin_memory: bool = False
) -> StreamingLoader:
    """This rank's own batches of `ds` (evaluation, inspection): `batch_size` windows by `num_workers` workers."""
    return StreamingLoader(ds, batch_size, num_workers, pin_memory)
