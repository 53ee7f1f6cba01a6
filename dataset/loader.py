"""The resumable loader of a StreamingDataset: DataLoader workers taken round-robin, and its versioned state.

    ds = StreamingDataset("shards/part-*.jsonl.zst", Tokenizer("tok"), 2048, dp_rank=rank, dp_size=world)
    loader = build_dataloader(ds, batch_size=8, num_workers=2)
    for batch in loader:                      # {"input_ids", "targets"[, "document_ids"]}: (B, seq_len) each
        ...
    state = loader.state_dict()               # json-serialisable; load_state_dict(state) continues exactly there

Worker w runs one logical stream of the rank (dataset/streaming.py: how the data is split and what a stream's
state is). Batches come round-robin from workers 0, 1, ...; each batch carries its stream's state, the loader keeps
the latest one per stream and which stream is next, and on resume worker w serves stream `(w + next) % W`, so the
round-robin goes on at the right stream. The state is only valid for the same data, seed, seq_len, dp layout and
num_workers (its fingerprint says which).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dataset.streaming import StreamingDataset

STATE_VERSION = 1


class _PassStart(NamedTuple):
    """Where a finite pass starts: the stream states, the next stream and the batch count."""

    states: list[dict | None]
    next_stream: int
    batches: int


class _WorkerBatches(IterableDataset):
    """What each DataLoader worker runs: one logical stream of the rank, whole batches tagged with its state."""

    def __init__(self, ds: StreamingDataset, batch_size: int, states: list, first: int) -> None:
        self.ds, self.batch_size, self.states, self.first = ds, batch_size, states, first

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        n = len(self.states)
        stream = ((0 if info is None else info.id) + self.first) % n
        for out in self.ds.batches(self.batch_size, stream=stream, n_streams=n, state=self.states[stream]):
            yield {**out.batch, "_stream": stream, "_state": json.dumps(out.state)}


class StreamingLoader:
    """Batches of a StreamingDataset through a DataLoader, with state_dict()/load_state_dict() and stats().

    An infinite loader's iterator continues where the last batch handed out left off (also after load_state_dict);
    a finite one starts a new pass at each iter() (from a loaded state, if any), so every evaluation sees the same
    batches. The last batch of a finite pass may have fewer rows, and its padded targets are -100.
    """

    def __init__(self, dataset: StreamingDataset, batch_size: int, num_workers: int = 0, pin_memory: bool = False):
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and num_workers={num_workers} >= 0")
        self.dataset, self.batch_size, self.num_workers, self.pin_memory = dataset, batch_size, num_workers, pin_memory
        self.n_streams = max(1, num_workers)
        self.states: list[dict | None] = [None] * self.n_streams  # latest state of each stream
        self.next_stream = self.batches_seen = 0
        self.wait_s = 0.0  # time the main process waited for batches
        self._start = _PassStart(list(self.states), next_stream=0, batches=0)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self.dataset.infinite:
            start = self._start
            self.states, self.next_stream, self.batches_seen = list(start.states), start.next_stream, start.batches
        work = _WorkerBatches(self.dataset, self.batch_size, list(self.states), self.next_stream)
        loader = DataLoader(work, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)
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
                self.next_stream, self.batches_seen = (stream + 1) % self.n_streams, self.batches_seen + 1
                yield batch
        finally:
            # Stop the workers now, not when the iterator is collected: after a worker error the traceback keeps
            # it alive in a reference cycle, and a later fork would inherit it and try to stop workers not its own.
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def state_dict(self) -> dict[str, Any]:
        """Positions of every stream (one per worker) after the last batch handed out, and which stream is next."""
        return {
            "version": STATE_VERSION,
            "fingerprint": self.dataset.fingerprint(self.n_streams),
            "streams": json.loads(json.dumps(self.states)),
            "next_stream": self.next_stream,
            "batches": self.batches_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state_dict() (call before iterating): the next batch is the one that would have come."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"data loader state version {state.get('version')!r}; this code reads {STATE_VERSION}: resume with "
                "the code that saved it, or start the data stream afresh (without the saved loader state)"
            )
        mine, saved = self.dataset.fingerprint(self.n_streams), state["fingerprint"]
        diff = [f"{k}: saved {saved.get(k)!r}, now {mine.get(k)!r}" for k in mine if saved.get(k) != mine.get(k)]
        if diff:
            raise ValueError(
                "the data loader state does not fit this dataset (num_streams = max(1, num_workers)); "
                "resume with the same data, seed, seq_len, dp layout and num_workers: " + "; ".join(diff)
            )
        self.states = json.loads(json.dumps(state["streams"]))
        self.next_stream, self.batches_seen = state["next_stream"], state["batches"]
        self._start = _PassStart(list(self.states), self.next_stream, self.batches_seen)

    @property
    def epoch(self) -> int:
        """Epochs every stream has completed of every source (the smallest current epoch)."""
        return min(min(p["epoch"] for p in s["sources"]) if s else 0 for s in self.states)

    def stats(self) -> dict[str, Any]:
        """documents, tokens, skipped (by reason), tokens_per_s (all workers), batches, epoch, wait_s (main process)."""
        done = [s["stats"] for s in self.states if s]
        skipped = Counter(self.dataset.skipped_paths)
        for st in done:
            skipped.update(st["skipped"])
        return {
            "documents": sum(st["documents"] for st in done),
            "tokens": sum(st["tokens"] for st in done),
            "skipped": dict(skipped),
            "tokens_per_s": sum(st["tokens"] / st["busy_s"] for st in done if st["busy_s"] > 0),
            "batches": self.batches_seen,
            "epoch": self.epoch,
            "wait_s": self.wait_s,
        }


def build_dataloader(
    ds: StreamingDataset, batch_size: int, num_workers: int = 0, *, pin_memory: bool = False
) -> StreamingLoader:
    """This rank's loader of `ds`: batches of `batch_size` windows, built by `num_workers` worker processes."""
    return StreamingLoader(ds, batch_size, num_workers, pin_memory)
