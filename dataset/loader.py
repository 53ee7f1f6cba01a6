"""The training loader: one global stream of sequences over a fixed set of streams, and its layout-free state.

    loader = GlobalBatchLoader(dataset, micro_batch=2, grad_accum=4, dp_rank=rank, dp_size=world, num_workers=2)
    batches = iter(loader)                    # next(batches) A times a step: {"input_ids", "targets"[, ...]} (B, T)
    part = loader.state_dict()                # at a step boundary: this rank's part of the state
    state = merge_states(parts_of_every_dp_rank); warnings = loader.load_state_dict(state)   # at any layout

How the data is split. A run has K streams (`num_streams`: the global batch size G = micro_batch x grad_accum x dp
when it starts fresh, kept from the state on resume); stream k of K is a source's own disjoint part of the data
(dataset/streaming.py, dataset/sft.py: `open_stream(k, K, state)`). Sequence n of the run (n = 0, 1, ...) is
window n // K of stream n % K. With C sequences consumed before a step, the step's global batch is sequences
C .. C+G-1; data-parallel rank r trains on C + r*S .. C + (r+1)*S - 1 (S = G / dp) and its micro-batch m on
C + r*S + m*B .. + B-1, so the global batch of a step is the same at any dp and any micro/accum split of one G.
With K = G each rank reads only its own S streams. After a resume with another G, a stream's windows go to several
ranks: a rank reads and drops the windows other ranks train on (correct, but slower).

Workers. Stream k is read by DataLoader worker k % W of the rank (W = max(1, num_workers); 0: the main process).
Each worker yields exactly one item a step (its streams' rows of the step, maybe none), so torch's round-robin over
workers stays in step; the main process joins the W items and hands out the step's micro-batches in order. A row
carries its stream's state just after its window, which the loader takes when the row's micro-batch is handed out.
Each worker reads PREFETCH_STEPS steps ahead of the one being trained on, so a step waits for its data only when
reading is slower than training (`data_wait_frac` in the trainer's metrics says so). With `pin_memory` (the trainer
asks on CUDA) a step's rows are joined straight into page-locked memory: the micro-batches are views of it, and
their copies to the GPU (`non_blocking=True`) run asynchronously.

The state (plain python, json-serialisable; the same for text, SFT and synthetic data):
    {"version": 2, "kind": "text" | "sft" | "synthetic", "fingerprint": {what the data depends on, no layout},
     "num_streams": K, "consumed": C, "global_batch": G, "streams": {"k": {"windows": n, "state": {...}}}}
A rank's `state_dict()` holds the streams it advanced (dp rank 0: also every other stream it knows);
`merge_states` joins the parts of all dp ranks and checks each stream's windows against C.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

if TYPE_CHECKING:
    from dataset.tokenizer import Tokenizer

STATE_VERSION = 2
PREFETCH_STEPS = 2  # steps each worker reads ahead (DataLoader's prefetch_factor: items in flight per worker)

# Fingerprint keys as the user knows them, for the error of a refused resume.
KEY_NAMES = {
    "tokenizer": "the tokenizer (data.tokenizer)",
    "seq_len": "data.seq_len",
    "seed": "train.seed",
    "add_bos": "data.add_bos",
    "add_eos": "EOS after each document",
    "tokens": "the conversations' tokens (data.train or the tokenizer's chat template)",
    "text_field": "data.text_field",
    "sources": "the data sources (data.train: files, names or weights)",
    "files": "the data files (data.train)",
    "pack": "data.pack",
    "truncation": "data.truncation",
    "conversations": "the conversations kept (data.train or data.truncation)",
    "pairs": "the preference pairs kept (data.train or data.truncation)",
    "vocab_size": "the vocabulary size",
}


def tokenizer_identity(tokenizer: Tokenizer) -> dict[str, Any]:
    """What identifies a tokenizer in a fingerprint: its vocabulary size and a hash of its model (or its pieces)."""
    if getattr(tokenizer, "sp", None) is not None:
        blob = tokenizer.sp.serialized_model_proto()
    elif getattr(tokenizer, "hf", None) is not None:
        blob = json.dumps(sorted(tokenizer.hf.get_vocab().items())).encode()
    else:
        blob = b""
    return {"vocab_size": tokenizer.vocab_size, "sha1": hashlib.sha1(blob).hexdigest()[:16]}


class RowStream(Protocol):
    """One stream of a source: rows (windows) in order, and the exact state after the last one read."""

    def next_row(self) -> Any:
        """The next row (a window of seq_len + 1 tokens, in the source's own form)."""

    def state_dict(self) -> dict[str, Any]:
        """Plain python; `open_stream(k, K, state)` continues right after the last row read."""


class StreamSource(Protocol):
    """A data set that can be read as K disjoint streams (StreamingDataset, SFTDataset)."""

    kind: str

    def fingerprint(self) -> dict[str, Any]:
        """What a saved stream state depends on, without the layout (no dp rank, dp size or workers)."""

    def check_streams(self, num_streams: int) -> None:
        """Raise when the data cannot feed `num_streams` streams."""

    def open_stream(self, index: int, count: int, state: dict | None) -> RowStream:
        """Stream `index` of `count`, from `state` (None: its beginning)."""

    def collate(self, rows: list) -> dict[str, torch.Tensor]:
        """A batch {"input_ids", "targets"[, "document_ids"]} of (len(rows), seq_len) from rows."""

    def stream_stats(self, states: list[dict]) -> dict[str, Any]:
        """Counters over these stream states (skipped included)."""


class Layout(NamedTuple):
    """A rank's place in the global batch: B rows a micro-batch, A micro-batches a step, rank r of dp."""

    micro_batch: int
    grad_accum: int
    dp_rank: int
    dp_size: int

    @property
    def global_batch(self) -> int:
        """G = B x A x dp sequences a step."""
        return self.micro_batch * self.grad_accum * self.dp_size

    def rows(self, consumed: int) -> range:
        """Global sequence numbers this rank trains on in the step after `consumed` sequences, in order."""
        per_rank = self.micro_batch * self.grad_accum
        return range(consumed + self.dp_rank * per_rank, consumed + (self.dp_rank + 1) * per_rank)

    def check(self) -> None:
        """Raise on sizes that cannot be a layout."""
        if self.micro_batch < 1 or self.grad_accum < 1 or not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(
                f"micro_batch={self.micro_batch} and grad_accum={self.grad_accum} must be >= 1 and dp_rank="
                f"{self.dp_rank} in [0, dp_size={self.dp_size})"
            )


def windows_before(consumed: int, num_streams: int, stream: int) -> int:
    """Windows of `stream` among sequences 0 .. consumed-1 (sequence n is window n // K of stream n % K)."""
    return max(0, -(-(consumed - stream) // num_streams))


def check_state(state: dict[str, Any], kind: str, fingerprint: dict[str, Any]) -> None:
    """Refuse a state of another version, kind or fingerprint, naming each changed key (saved vs now)."""
    if state.get("version") != STATE_VERSION or state.get("kind") != kind:
        raise ValueError(
            f"data loader state version {state.get('version')!r} of {state.get('kind')!r} data; this code reads "
            f"version {STATE_VERSION} of {kind!r} data: resume with the code and data that saved it, or start the "
            "data stream afresh (without the saved loader state)"
        )
    saved = state.get("fingerprint", {})
    changed = [
        f"{KEY_NAMES.get(k, k)} changed (saved {saved.get(k)!r}, now {fingerprint.get(k)!r})"
        for k in sorted(set(saved) | set(fingerprint))
        if saved.get(k) != fingerprint.get(k)
    ]
    if changed:
        raise ValueError(
            "the saved data loader state does not fit this data: " + "; ".join(changed) + "; resume with the same "
            "data, tokenizer and settings, or start the data stream afresh (without the saved loader state)"
        )


def check_windows(state: dict[str, Any]) -> None:
    """Every stream's window count must be what `consumed` implies; raise naming the stream otherwise."""
    K, C = state["num_streams"], state["consumed"]
    for k in state["streams"]:
        if not 0 <= int(k) < K:
            raise ValueError(f"data loader state: stream {k} is not one of the {K} streams of the state")
    for k in range(K):
        got = state["streams"].get(str(k), {"windows": 0})["windows"]
        if got != (want := windows_before(C, K, k)):
            raise ValueError(
                f"data loader state: stream {k} has {got} windows consumed, but {C} sequences consumed over {K} "
                f"streams mean {want}: the ranks' states are of different steps or one is missing"
            )


def merge_states(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Join the `state_dict()` parts of all data-parallel ranks into the state any layout loads."""
    if not parts:
        raise ValueError("merge_states: no data loader state given (one per data-parallel rank)")
    for r, part in enumerate(parts[1:], 1):
        for key in ("version", "kind", "fingerprint", "num_streams", "consumed", "global_batch"):
            if part.get(key) != parts[0].get(key):
                raise ValueError(
                    f"data loader states of data-parallel ranks 0 and {r} differ in {key!r} ({parts[0].get(key)!r} "
                    f"vs {part.get(key)!r}): they are not of the same run and step"
                )
    streams: dict[str, dict] = {}
    for part in parts:
        for k, entry in part["streams"].items():
            if k not in streams or entry["windows"] > streams[k]["windows"]:
                streams[k] = entry
    merged = {**parts[0], "streams": {k: streams[k] for k in sorted(streams, key=int)}}
    check_windows(merged)
    return json.loads(json.dumps(merged))


def global_batch_warnings(saved_global: int, global_batch: int, consumed: int, num_streams: int) -> list[str]:
    """What follows from resuming with another global batch size (empty when it is the same)."""
    if saved_global == global_batch:
        return []
    if num_streams == 0:  # synthetic sequences are numbered globally: nothing to read twice
        return [
            f"train.global_batch_size changed from {saved_global} to {global_batch} since the checkpoint: the data "
            f"continues at sequence {consumed}, so no sequence is repeated or lost"
        ]
    return [
        f"train.global_batch_size changed from {saved_global} to {global_batch} since the checkpoint: the data "
        f"continues at sequence {consumed} of the same {num_streams} streams (sequence n is window n // "
        f"{num_streams} of stream n % {num_streams}), so no sequence is repeated or lost; where a stream's windows "
        "now go to several ranks, each of them reads and drops the windows of the others (slower data loading)"
    ]


class _StepRows(IterableDataset):
    """What each worker runs: one item a step, the rows of this rank's step whose stream the worker owns."""

    def __init__(self, source: StreamSource, layout: Layout, num_streams: int, consumed: int, streams: dict, W: int):
        self.source, self.layout, self.K, self.consumed, self.streams = source, layout, num_streams, consumed, streams
        self.W = W  # workers of the rank: worker w reads the streams k with k % W == w

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, K, consumed = 0 if info is None else info.id, self.K, self.consumed
        opened: dict[int, list] = {}  # stream -> [RowStream, windows read]
        while True:
            rows, meta = [], []
            for i, n in enumerate(self.layout.rows(consumed)):
                k, window = n % K, n // K
                if k % self.W != worker:
                    continue
                if k not in opened:
                    saved = self.streams.get(k) or {"windows": 0, "state": None}
                    opened[k] = [self.source.open_stream(k, K, saved["state"]), saved["windows"]]
                stream = opened[k][0]
                if opened[k][1] > window:
                    raise RuntimeError(f"stream {k} is past window {window} (at {opened[k][1]}): a loader bug")
                for _ in range(window - opened[k][1]):  # windows that other ranks train on
                    stream.next_row()
                rows.append(stream.next_row())
                opened[k][1] = window + 1
                meta.append([i, k, window + 1, stream.state_dict()])
            yield {**(self.source.collate(rows) if rows else {}), "_meta": json.dumps(meta)}
            consumed += self.layout.global_batch


class GlobalBatchLoader:
    """This rank's micro-batches of the run's global stream of sequences (see the module docstring).

    Args:
        source: a `StreamSource` (StreamingDataset with infinite=True, SFTDataset).
        micro_batch: B rows a micro-batch.
        grad_accum: A micro-batches a step on each rank.
        dp_rank, dp_size: this data-parallel rank and the degree (tensor/context/pipeline peers pass the same).
        num_workers: DataLoader worker processes (0: read in the main process).
        pin_memory: join each step's rows into page-locked memory (when CUDA is there), for asynchronous copies.
    """

    def __init__(
        self,
        source: StreamSource,
        *,
        micro_batch: int,
        grad_accum: int,
        dp_rank: int,
        dp_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.layout = Layout(micro_batch, grad_accum, dp_rank, dp_size)
        self.layout.check()
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers}: must be >= 0 (data.num_workers)")
        self.source, self.num_workers, self.pin_memory = source, num_workers, pin_memory
        self.num_streams, self.consumed = self.layout.global_batch, 0  # K (fixed when a run starts), C
        self.source.check_streams(self.num_streams)
        self.streams: dict[int, dict] = {}  # stream -> {"windows", "state"} after the last row handed out
        self.advanced: set[int] = set()  # streams this rank moved since it was built or loaded
        self.handed = 0  # micro-batches of the current step handed out
        self.batches, self.wait_s = 0, 0.0  # micro-batches handed out; time the main process waited for data

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.handed:
            raise RuntimeError(f"iter() inside a step ({self.handed} of {self.layout.grad_accum} micro-batches out)")
        W, A, B = max(1, self.num_workers), self.layout.grad_accum, self.layout.micro_batch
        work = _StepRows(self.source, self.layout, self.num_streams, self.consumed, dict(self.streams), W)
        # its own generator: the iterator's base seed would otherwise be drawn from the global RNG, which a resumed
        # run restores before building the iterator while an uninterrupted one built it long before (LoRA dropout)
        # (torch refuses a prefetch_factor without workers)
        workers = {"num_workers": self.num_workers, "prefetch_factor": PREFETCH_STEPS if self.num_workers else None}
        it = iter(DataLoader(work, batch_size=None, generator=torch.Generator(), **workers))
        try:
            while True:
                t0 = time.perf_counter()
                items = [next(it) for _ in range(W)]  # one per worker, in worker order: one step
                self.wait_s += time.perf_counter() - t0
                metas = [json.loads(item.pop("_meta")) for item in items]
                step = self._join(items, metas)  # (S, T) each
                meta = sorted((m for meta in metas for m in meta), key=lambda m: m[0])
                for m in range(A):
                    for _, k, windows, state in meta[m * B : (m + 1) * B]:
                        self.streams[k] = {"windows": windows, "state": state}
                        self.advanced.add(k)
                    self.batches, self.handed = self.batches + 1, (self.handed + 1) % A
                    if self.handed == 0:
                        self.consumed += self.layout.global_batch
                    yield {k: v[m * B : (m + 1) * B] for k, v in step.items()}  # (B, T) views each
        finally:
            # Stop the workers now, not when the iterator is collected: after a worker error the traceback keeps
            # it alive in a reference cycle, and a later fork would inherit it and try to stop workers not its own.
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _join(self, items: list[dict[str, torch.Tensor]], metas: list[list]) -> dict[str, torch.Tensor]:
        """The workers' rows of one step in the step's order, a (S, T) tensor per key, pinned when asked.

        Each row is copied once, to its place in the step (its meta's first entry), straight into page-locked
        memory on CUDA: pinning the micro-batches afterwards would copy them again, on the step's critical path.
        """
        pin = self.pin_memory and torch.cuda.is_available()
        rows = sum(len(meta) for meta in metas)
        step: dict[str, torch.Tensor] = {}
        for item, meta in zip(items, metas, strict=True):
            if not meta:  # a worker none of whose streams has a row in this rank's step
                continue
            places = torch.tensor([m[0] for m in meta])  # (rows of this worker,)
            for k, v in item.items():
                if k not in step:
                    step[k] = torch.empty((rows, *v.shape[1:]), dtype=v.dtype, pin_memory=pin)  # (S, T)
                step[k].index_copy_(0, places, v)
        return step

    def state_dict(self) -> dict[str, Any]:
        """This rank's part of the state (at a step boundary): its streams, and on dp rank 0 every stream known."""
        if self.handed:
            raise RuntimeError(
                f"data loader state_dict() inside a step ({self.handed} of {self.layout.grad_accum} micro-batches "
                "handed out): call it at a step boundary"
            )
        keep = set(self.streams) if self.layout.dp_rank == 0 else self.advanced
        return json.loads(
            json.dumps(
                {
                    "version": STATE_VERSION,
                    "kind": self.source.kind,
                    "fingerprint": self.source.fingerprint(),
                    "num_streams": self.num_streams,
                    "consumed": self.consumed,
                    "global_batch": self.layout.global_batch,
                    "streams": {str(k): self.streams[k] for k in sorted(keep)},
                }
            )
        )

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        """Continue from a merged state (before iter()); returns warnings (another global batch size: what follows)."""
        check_state(state, self.source.kind, self.source.fingerprint())
        check_windows(state)
        self.source.check_streams(state["num_streams"])
        self.num_streams, self.consumed = state["num_streams"], state["consumed"]
        self.streams = {int(k): v for k, v in json.loads(json.dumps(state["streams"])).items()}
        self.advanced, self.handed = set(), 0
        return global_batch_warnings(state["global_batch"], self.layout.global_batch, self.consumed, self.num_streams)

    def stats(self) -> dict[str, Any]:
        """The source's counters over the streams this rank read (skipped included), plus batches and wait_s."""
        states = [self.streams[k]["state"] for k in sorted(self.advanced)]
        return {**self.source.stream_stats(states), "batches": self.batches, "wait_s": self.wait_s}
