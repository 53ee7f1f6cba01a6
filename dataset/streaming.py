"""Streaming packed batches from jsonl(.zst)/txt shards: rank/worker sharding, weighted mixtures, exact resume.

    ds = StreamingDataset("shards/part-*.jsonl.zst", Tokenizer("tok"), 2048, dp_rank=rank, dp_size=world)
    loader = build_dataloader(ds, batch_size=8, num_workers=2)
    for batch in loader:                      # {"input_ids", "targets"[, "document_ids"]}: (B, seq_len) each
        ...
    state = loader.state_dict()               # json-serialisable; load_state_dict(state) continues exactly there

How the data is split. Each data-parallel rank runs `W = max(1, num_workers)` logical streams, one per DataLoader
worker, so there are `N = dp_size * W` streams; stream `s = dp_rank * W + w`. Per source and epoch the file list
is shuffled with (seed, source, epoch). Stream s reads whole files s, s + N, ... of that order, `F // N` of them,
so it decodes only its own data; the last `F % N` files (all of them when F < N) are shared line by line: file
`F // N * N + s % r` is read by the streams with that remainder r, each keeping every m-th line (decoding a file m
times is cheap next to tokenizing it). So streams get nearly equal shares (no stream runs through its epochs much
faster than another) and every line belongs to exactly one stream per epoch. Tensor/expert-parallel peers pass
the same dp_rank, so they see the same batches. The reshuffle is of files: documents inside a file keep their order
(a shuffle buffer would make the resume state as large as the buffer), and data/shard.py keeps the input order, so
shuffle a sorted corpus before sharding it, and write more shards than streams.

Mixtures. Each source is read on its own (its own epochs); the next document comes from the source furthest below
its share of the tokens taken so far (`taken / weight` smallest), so token fractions track the weights within one
document's length, deterministically.

Packing (see dataset/packing.py): documents `[BOS] ids [EOS]` are concatenated and cut into windows of
`seq_len + 1` tokens overlapping by one; a batch of B windows is built wholly inside one worker.

Resume. A stream's state is: per source, the position (epoch, file in the epoch's order, line, byte offset) of the
next document to read, plus the one document that straddles the last window ("carry": which source, and how many
of its tokens were used); on resume that document is read and tokenized again. With workers, batches come
round-robin from workers 0, 1, ...; each batch carries its stream's state, the loader keeps the latest one per
stream and which stream is next, and on resume worker w serves stream `(w + next) % W`, so the round-robin goes on
at the right stream. The state is only valid for the same data, seed, seq_len, dp layout and num_workers.

CLI (what the model sees):
    python -m dataset.streaming --data 'shards/*.jsonl.zst' --tokenizer tok --seq-len 64 --max-seqs 4 --decode
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dataset.jsonl_zst import ON_ERROR, DataError, iter_documents, resolve_paths
from dataset.packing import boundaries_in_window, cut_windows, make_batch, pad_window
from dataset.tokenizer import Tokenizer, TokenizerError

STATE_VERSION = 1
TOKENIZE_DOCS, TOKENIZE_CHARS = 256, 1 << 20  # documents tokenized per encode_batch call, at most


@dataclass
class DataSource:
    """One source of a mixture: files (a glob, directory, path or a list of them), its token weight and a name."""

    paths: str | Path | list[str | Path]
    weight: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"data source {self.name or self.paths!r}: weight {self.weight} must be > 0")
        self.name = self.name or str(self.paths)


def plan_units(n_files: int, n_streams: int, stream: int) -> list[tuple[int, int, int]]:
    """What `stream` of `n_streams` reads of `n_files` files: `(file, stride, phase)`, lines i % stride == phase.

    Each stream gets `n_files // n_streams` whole files; the remaining `n_files % n_streams` files are shared line
    by line, so every stream has nearly the same amount of data and every line one reader.
    """
    whole, rest = divmod(n_files, n_streams)
    units = [(f, 1, 0) for f in range(stream, whole * n_streams, n_streams)]
    if rest:
        share = stream % rest
        units.append((whole * n_streams + share, len(range(share, n_streams, rest)), stream // rest))
    return units


def epoch_order(n_files: int, *, seed: int, source: int, epoch: int, shuffle: bool) -> list[int]:
    """The order of a source's files in one epoch: a permutation fixed by (seed, source, epoch), or sorted."""
    order = list(range(n_files))
    if shuffle:
        random.Random(f"{seed}/{source}/{epoch}").shuffle(order)  # str seeds hash the same in every process
    return order


POSITION = ("epoch", "unit", "line", "offset")  # a reader position: file `unit` of the epoch's plan, line, offset


class _Reader:
    """The documents of one source that one stream reads, tokenized in batches; `pos` is where the next one starts.

    Positions are tuples (epoch, unit, line, offset) on the hot path and dicts in states. Skipped lines travel with
    the next document handed out, so a resumed reader, which re-reads what was read ahead, counts them once.
    """

    def __init__(self, ds: StreamingDataset, source: int, stream: int, n_streams: int, pos: tuple) -> None:
        self.ds, self.source, self.stream, self.n_streams = ds, source, stream, n_streams
        self.pos = pos
        self._queue: deque = deque()  # (tokens, start, position after, skips before or None)
        self._skips: Counter = Counter()  # skips seen since the last document read
        self._docs = self._read(*pos)
        self.tail_skips: Counter = Counter()  # skips after the last document of a finite pass
        self._token_epoch = pos[0]  # the last epoch a document with tokens came from (or the starting one)

    def _read(self, epoch: int, unit: int, line: int, offset: int) -> Iterator[tuple]:
        ds, files = self.ds, self.ds.files[self.source]
        units = plan_units(len(files), self.n_streams, self.stream)
        while ds.infinite or epoch == 0:
            order = epoch_order(len(files), seed=ds.seed, source=self.source, epoch=epoch, shuffle=ds.shuffle)
            fresh, found = unit == 0 and line == 1, False
            for k in range(unit, len(units)):
                f, stride, phase = units[k]
                for doc in iter_documents(
                    files[order[f]],
                    text_field=ds.text_field,
                    on_error=ds.on_error,
                    start_line=line,
                    start_offset=offset,
                    stride=stride,
                    phase=phase,
                    skipped=self._skips,
                ):
                    found, skips = True, None
                    if self._skips:
                        skips = Counter(self._skips)
                        self._skips.clear()
                    yield doc.text, (epoch, k, doc.line, doc.offset), (epoch, k, doc.line + 1, doc.end), skips
                line, offset = 1, 0
            if fresh and not found and ds.infinite:  # an infinite loop that never yields would hang training
                raise DataError(
                    f"data source {ds.sources[self.source].name!r}: stream {self.stream} of {self.n_streams} "
                    f"(dp_rank {ds.dp_rank}) got no document in epoch {epoch} from its {len(units)} file part(s) "
                    f"(skipped: {dict(self._skips) or 'nothing'}); use fewer data-parallel ranks or workers, or "
                    "more data"
                )
            epoch, unit = epoch + 1, 0

    def _fill(self) -> bool:
        docs, chars = [], 0
        for item in self._docs:
            docs.append(item)
            chars += len(item[0])
            if len(docs) >= TOKENIZE_DOCS or chars >= TOKENIZE_CHARS:
                break
        if not docs:
            return False
        ids = self.ds.tokenizer.encode_batch([d[0] for d in docs], bos=self.ds.add_bos, eos=self.ds.add_eos)
        self._queue.extend((t, *d[1:]) for t, d in zip(ids, docs, strict=True))
        return True

    def next(self) -> tuple[list[int], tuple, Counter | None] | None:
        """(token ids, start position, skips before it or None) of the next document; None when a pass ends."""
        skips = None
        while self._queue or self._fill():
            tokens, start, self.pos, before = self._queue.popleft()
            if before:
                skips = before if skips is None else skips + before
            if tokens:
                self._token_epoch = start[0]
                return tokens, start, skips
            skips = (skips or Counter()) + Counter(empty_tokens=1)  # a text that tokenizes to nothing
            if start[0] > self._token_epoch + 1:  # a whole epoch without a token: an endless loop otherwise
                name = self.ds.sources[self.source].name
                raise DataError(
                    f"data source {name!r}: stream {self.stream} of {self.n_streams} (dp_rank {self.ds.dp_rank}) "
                    f"read a whole epoch whose every document tokenizes to no id (skipped: {dict(skips)}); "
                    "check the text field (data.text_field) and the tokenizer, or keep BOS/EOS on"
                )
        self.tail_skips.update(skips or {})
        self.tail_skips.update(self._skips)  # lines skipped after the last document
        self._skips.clear()
        return None


class _Stream:
    """One logical stream of one rank: sources mixed by weight, packed into windows, with an exact state."""

    def __init__(self, ds: StreamingDataset, stream: int, n_streams: int, state: dict | None) -> None:
        g = ds.dp_rank * n_streams + stream  # global stream index
        state = state or {
            "sources": [dict.fromkeys(POSITION, 0) | {"line": 1} for _ in ds.sources],
            "taken": [0] * len(ds.sources),
            "carry": None,
            "finished": False,
            "stats": {"documents": 0, "tokens": 0, "skipped": {}, "busy_s": 0.0},
        }
        self.ds, self.seq_len, self.weights = ds, ds.seq_len, ds.weights
        positions = [tuple(p[k] for k in POSITION) for p in state["sources"]]
        self.readers = [_Reader(ds, j, g, ds.dp_size * n_streams, p) for j, p in enumerate(positions)]
        self.taken, self.finished = list(state["taken"]), state["finished"]
        st = state["stats"]
        self.documents, self.tokens, self.busy_s = st["documents"], st["tokens"], st["busy_s"]
        self.skipped = Counter(st["skipped"])
        self.active = list(range(len(ds.sources)))  # sources not exhausted (a finite pass drops them as they end)
        self.buf: list[int] = []
        self.pos = 0  # buf[pos:] is not yet emitted as a window start
        self.doc_starts: deque[int] = deque()  # buf indices > pos where a document begins
        self.last: tuple | None = None  # (source, start position, length, buf index) of the last document taken
        if state["carry"] is not None:
            j, used, length = state["carry"]["source"], state["carry"]["skip"], state["carry"]["length"]
            got = self.readers[j].next()
            if got is None or len(got[0]) != length:
                raise DataError(
                    f"data source {ds.sources[j].name!r}: the document at {state['sources'][j]} no longer has "
                    f"{length} tokens; the data or tokenizer changed since this state was saved"
                )
            self.buf, self.last = got[0][used:], (j, got[1], length, -used)

    def _deficit(self, j: int) -> float:
        return self.taken[j] / self.weights[j]

    def _take(self) -> bool:
        """Append the next document of the mixture to the buffer; False when every source has ended."""
        while self.active:
            j = self.active[0] if len(self.active) == 1 else min(self.active, key=self._deficit)
            got = self.readers[j].next()
            if got is None:
                self.active.remove(j)
                self.skipped.update(self.readers[j].tail_skips)
                continue
            tokens, start, skips = got
            if skips:
                self.skipped.update(skips)
            self.documents += 1
            self.tokens += len(tokens)
            self.taken[j] += len(tokens)
            self.doc_starts.append(len(self.buf))
            self.last = (j, start, len(tokens), len(self.buf))
            self.buf.extend(tokens)
            return True
        return False

    def next_window(self) -> tuple[list[int], int, list[int]] | None:
        """(window, real tokens in it, document starts in it), or None once a finite pass is spent."""
        T = self.seq_len
        if self.finished:
            return None
        while len(self.buf) - self.pos < T + 1 and self._take():
            pass
        windows, new_pos = cut_windows(self.buf, self.pos, T, limit=1)
        if windows:
            window, real = windows[0], T + 1
        elif len(self.buf) - self.pos >= 2:  # the end of a finite pass: pad the last, partial window
            real = len(self.buf) - self.pos
            window, new_pos = pad_window(self.buf[self.pos :], T, self.ds.pad_id), len(self.buf)
            self.finished = True
        else:
            self.finished = True
            return None
        bounds = boundaries_in_window(self.doc_starts, self.pos, T)
        self.pos = new_pos
        while self.doc_starts and self.doc_starts[0] <= self.pos:
            self.doc_starts.popleft()
        if self.pos > 1 << 16:  # drop emitted tokens now and then, not at every window
            del self.buf[: self.pos]
            self.doc_starts = deque(s - self.pos for s in self.doc_starts)
            j, start, length, at = self.last
            self.last, self.pos = (j, start, length, at - self.pos), 0
        return window, real, bounds

    def state_dict(self) -> dict[str, Any]:
        """Where this stream is (plain python): the next document of each source and the straddling one."""
        sources, carry = [r.pos for r in self.readers], None
        if not self.finished and self.last is not None and len(self.buf) > self.pos:
            j, start, length, at = self.last
            sources[j], carry = start, {"source": j, "skip": self.pos - at, "length": length}
        stats = {"documents": self.documents, "tokens": self.tokens, "skipped": dict(self.skipped)}
        stats["busy_s"] = self.busy_s
        sources = [dict(zip(POSITION, p, strict=True)) for p in sources]
        return {
            "sources": sources,
            "taken": list(self.taken),
            "carry": carry,
            "finished": self.finished,
            "stats": stats,
        }

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """(batch, state after it) until a finite pass ends; the last batch of a pass may have fewer rows."""
        while True:
            t0 = time.perf_counter()
            rows = []
            while len(rows) < batch_size and (row := self.next_window()) is not None:
                rows.append(row)
            if not rows:
                return
            padded = any(real < self.seq_len + 1 for _, real, _ in rows)
            batch = make_batch(
                [w for w, _, _ in rows],
                real_lengths=[r for _, r, _ in rows] if padded else None,
                boundaries=[b for _, _, b in rows] if self.ds.return_document_ids else None,
            )
            self.busy_s += time.perf_counter() - t0
            yield batch, self.state_dict()


class StreamingDataset(IterableDataset):
    """Packed `seq_len + 1` windows from shards or a weighted mixture of sources; see the module docstring.

    Args:
        sources: a glob, directory or path, a list of them, or a list of `DataSource` for a weighted mixture.
        tokenizer: a `dataset.tokenizer.Tokenizer`.
        seq_len: tokens per row of input_ids / targets (windows hold seq_len + 1).
        dp_rank: this data-parallel rank (tensor/expert-parallel peers pass the same one).
        dp_size: number of data-parallel ranks.
        seed: fixes the file order of every epoch.
        add_bos: put BOS before each document.
        add_eos: put EOS after each document.
        text_field: JSON key of the text in jsonl lines.
        return_document_ids: add `document_ids` (B, seq_len) to batches, for document-aware attention.
        on_error: "raise" or "skip" (count and warn) for bad lines and files; see dataset/jsonl_zst.py.
        infinite: epoch after epoch (training), or one pass and stop (evaluation).
        shuffle: shuffle the file order per epoch; False reads files in sorted order.
    """

    def __init__(
        self,
        sources: str | Path | list,
        tokenizer: Tokenizer,
        seq_len: int,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        add_bos: bool = True,
        add_eos: bool = True,
        text_field: str = "text",
        return_document_ids: bool = False,
        on_error: str = "raise",
        infinite: bool = True,
        shuffle: bool = True,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len}: must be at least 1 (data.seq_len / --seq-len)")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size}) (--dp-rank / --dp-size)")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r}: use one of {', '.join(ON_ERROR)} (data.on_error / --on-error)")
        if isinstance(sources, list) and sources and all(isinstance(s, DataSource) for s in sources):
            self.sources = list(sources)
        elif isinstance(sources, list) and any(isinstance(s, DataSource) for s in sources):
            raise TypeError("sources: give either paths/globs or DataSource objects, not a mix of both")
        else:
            self.sources = [DataSource(sources)]
        self.tokenizer, self.seq_len, self.dp_rank, self.dp_size, self.seed = tokenizer, seq_len, dp_rank, dp_size, seed
        self.add_bos, self.add_eos, self.text_field, self.on_error = add_bos, add_eos, text_field, on_error
        self.return_document_ids, self.infinite, self.shuffle = return_document_ids, infinite, shuffle
        self.skipped_paths: Counter = Counter()  # globs that matched nothing (on_error="skip")
        self.files = [resolve_paths(s.paths, on_error=on_error, skipped=self.skipped_paths) for s in self.sources]
        total = sum(s.weight for s in self.sources)
        self.weights = [s.weight / total for s in self.sources]
        self.pad_id = next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i is not None and i >= 0), 0)

    def fingerprint(self, n_streams: int) -> dict[str, Any]:
        """What a saved state depends on; loading a state into a dataset with another fingerprint is an error."""
        sources = [
            {
                "name": s.name,
                "weight": round(w, 12),
                "files": hashlib.sha1("\n".join(p.name for p in f).encode()).hexdigest()[:16] + f"x{len(f)}",
            }
            for s, w, f in zip(self.sources, self.weights, self.files, strict=True)
        ]
        keys = ("dp_rank", "dp_size", "seed", "seq_len", "add_bos", "add_eos", "text_field", "infinite", "shuffle")
        return {**{k: getattr(self, k) for k in keys}, "num_streams": n_streams, "sources": sources}

    def batches(
        self, batch_size: int, *, stream: int = 0, n_streams: int = 1, state: dict | None = None
    ) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """(batch, stream state after it) of logical stream `stream` of `n_streams` on this rank, from `state`."""
        return _Stream(self, stream, n_streams, state).batches(batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Single windows (for a plain DataLoader; each worker reads its own stream). Use build_dataloader to resume."""
        info = get_worker_info()
        stream, n = (0, 1) if info is None else (info.id, info.num_workers)
        for batch, _ in self.batches(1, stream=stream, n_streams=n):
            yield {k: v[0] for k, v in batch.items()}


class _WorkerBatches(IterableDataset):
    """What each DataLoader worker runs: one logical stream of the rank, whole batches tagged with its state."""

    def __init__(self, ds: StreamingDataset, batch_size: int, states: list, first: int) -> None:
        self.ds, self.batch_size, self.states, self.first = ds, batch_size, states, first

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        n = len(self.states)
        stream = ((0 if info is None else info.id) + self.first) % n
        for batch, state in self.ds.batches(self.batch_size, stream=stream, n_streams=n, state=self.states[stream]):
            yield {**batch, "_stream": stream, "_state": json.dumps(state)}


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
        self._start = (list(self.states), 0, 0)  # where a finite pass starts

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self.dataset.infinite:
            self.states, self.next_stream, self.batches_seen = list(self._start[0]), *self._start[1:]
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
        self._start = (list(self.states), self.next_stream, self.batches_seen)

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


def _render(ids: list[int], tokenizer: Tokenizer) -> str:
    """Text of `ids` with special tokens shown by name (decode alone would drop them)."""
    special = {tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>", tokenizer.pad_id: "<pad>"}
    special.pop(-1, None)
    out, run = [], []
    for i in ids:
        if i in special:
            out += [tokenizer.decode(run), special[i]]
            run = []
        else:
            run.append(i)
    return "".join(out + [tokenizer.decode(run)])


def main(argv: list[str] | None = None) -> None:
    """CLI: write or print the first packed sequences a rank would train on."""
    p = argparse.ArgumentParser(description="Show the packed sequences the model sees.")
    p.add_argument("--data", required=True, nargs="+", help="glob(s), directories or files of jsonl(.zst)/txt(.zst)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (dataset/tokenizer.py)")
    p.add_argument("--seq-len", type=int, required=True, help="input tokens per sequence (windows hold one more)")
    p.add_argument("--dp-rank", type=int, default=0)
    p.add_argument("--dp-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (each reads its own part)")
    p.add_argument("--max-seqs", type=int, required=True, help="how many sequences to show")
    p.add_argument("--dump-ids", type=Path, help="write each sequence (seq_len + 1 ids) as a JSON line here")
    p.add_argument("--decode", action="store_true", help="print the sequences as text (special tokens by name)")
    p.add_argument("--text-field", default="text", help="JSON key of the text in jsonl lines")
    p.add_argument("--on-error", choices=ON_ERROR, default="raise", help="bad lines/files: stop, or count and skip")
    p.add_argument("--no-bos", action="store_true", help="no BOS before each document")
    args = p.parse_args(argv)
    if args.dump_ids is None and not args.decode:
        p.error("give --dump-ids FILE, --decode, or both")
    try:
        tokenizer = Tokenizer(args.tokenizer)
        ds = StreamingDataset(
            args.data,
            tokenizer,
            args.seq_len,
            dp_rank=args.dp_rank,
            dp_size=args.dp_size,
            seed=args.seed,
            add_bos=not args.no_bos,
            text_field=args.text_field,
            on_error=args.on_error,
        )
        loader = build_dataloader(ds, 1, num_workers=args.num_workers)
        with open(args.dump_ids, "w") if args.dump_ids else contextlib.nullcontext() as out:
            for n, batch in enumerate(itertools.islice(loader, args.max_seqs)):
                window = batch["input_ids"][0].tolist() + batch["targets"][0, -1:].tolist()
                if out:
                    out.write(json.dumps(window) + "\n")
                if args.decode:
                    print(f"--- sequence {n} (dp_rank {args.dp_rank}, {len(window)} tokens) ---")
                    print(_render(window, tokenizer))
    except (DataError, TokenizerError, ValueError, OSError) as e:  # OSError: --dump-ids cannot be written
        sys.exit(f"error: {e}")
    print(json.dumps(loader.stats()), file=sys.stderr)


if __name__ == "__main__":
    main()
