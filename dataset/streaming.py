"""Streaming packed windows from jsonl(.zst)/txt shards: disjoint streams, weighted mixtures, exact positions.

    ds = StreamingDataset("shards/part-*.jsonl.zst", Tokenizer("tok"), 2048)
    loader = GlobalBatchLoader(ds, micro_batch=8, grad_accum=1, dp_rank=rank, dp_size=world)   # dataset/loader.py
    for batch in loader:                      # {"input_ids", "targets"[, "document_ids"]}: (B, seq_len) each
        ...

How the data is split. The data is read as N disjoint streams; stream s of N is `open_stream(s, N, state)`. The
training loader (dataset/loader.py) reads a fixed N for the whole run (the global batch size at its start) whatever
the layout; evaluation and inspection (`batches`, dataset/rank_loader.py) read stream `dp_rank * W + w` of
`dp_size * W` per rank and worker. Per source and epoch the file list is shuffled with (seed, source, epoch).
Stream s reads whole files s, s + N, ... of that order, `F // N` of them, so it decodes only its own data; the last
`F % N` files (all of them when F < N) are shared line by line: file `F // N * N + s % r` is read by the streams
with that remainder r, each keeping every m-th line (decoding a file m times is cheap next to tokenizing it). So
streams get nearly equal shares (no stream runs through its epochs much faster than another) and every line
belongs to exactly one stream per epoch. The reshuffle is of files: documents inside a file keep their order
(a shuffle buffer would make the resume state as large as the buffer), and data/shard.py keeps the input order, so
shuffle a sorted corpus before sharding it, and write more shards than streams.

Mixtures. Each source is read on its own (its own epochs); the next document comes from the source furthest below
its share of the tokens taken so far (`taken / weight` smallest), so token fractions track the weights within one
document's length, deterministically.

Packing (see dataset/packing.py): documents `[BOS] ids [EOS]` are concatenated and cut into windows of
`seq_len + 1` tokens overlapping by one; a batch of B windows is built wholly inside one worker.

A stream's state is: per source, the position (epoch, file in the epoch's order, line, byte offset) of the next
document to read, plus the one document that straddles the last window ("carry": which source, and how many of its
tokens were used); on resume that document is read and tokenized again. How the training loader keeps one state
per stream: dataset/loader.py. What the model sees: `python -m dataset.stream_cli`.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import IterableDataset, get_worker_info

from dataset.jsonl_zst import ON_ERROR, iter_documents, resolve_paths
from dataset.lines import DataError
from dataset.loader import tokenizer_identity
from dataset.packing import boundaries_in_window, cut_windows, make_batch, pad_window
from dataset.sources import DataSource, epoch_order, plan_units
from dataset.tokenizer import Tokenizer

TOKENIZE_DOCS, TOKENIZE_CHARS = 256, 1 << 20  # documents tokenized per encode_batch call, at most


class Position(NamedTuple):
    """Where a reader's next document starts: an epoch, a unit of the stream's plan, a line and its byte offset.

    A tuple on the hot path; `_asdict()` in a state (key order epoch, unit, line, offset), `Position(**d)` back.
    """

    epoch: int
    unit: int  # index into plan_units(...) of the stream
    line: int  # 1-based line of the unit's file
    offset: int  # decompressed byte offset where that line starts

    @classmethod
    def start(cls) -> Position:
        """The first line of the first unit of epoch 0."""
        return cls(epoch=0, unit=0, line=1, offset=0)


class TokenizedDocument(NamedTuple):
    """A document a reader hands out: its token ids, where it starts, and the lines skipped before it (or None)."""

    ids: list[int]
    start: Position
    skips: Counter | None


class Window(NamedTuple):
    """One row of a batch: `seq_len + 1` ids, how many of them are data (the rest is padding), document starts."""

    ids: list[int]
    real: int
    boundaries: list[int]  # positions in the window where a document starts (see packing.boundaries_in_window)


class StreamBatch(NamedTuple):
    """A batch of one logical stream and the stream's state just after it (plain python)."""

    batch: dict[str, torch.Tensor]
    state: dict[str, Any]


class _Read(NamedTuple):
    """A document read ahead of tokenizing: its text, its start, the next one's start, the lines skipped before."""

    text: str
    start: Position
    after: Position
    skips: Counter | None


class _Taken(NamedTuple):
    """The last document a stream took: its source, start and length, and where it begins in the buffer."""

    source: int
    start: Position
    length: int
    at: int  # buffer index of its first token (negative once its head was dropped or skipped on resume)


class _Reader:
    """The documents of one source that one stream reads, tokenized in batches; `pos` is where the next one starts.

    Skipped lines travel with the next document handed out, so a resumed reader, which re-reads what was read
    ahead, counts them once.
    """

    def __init__(self, ds: StreamingDataset, source: int, stream: int, n_streams: int, pos: Position) -> None:
        self.ds, self.source, self.stream, self.n_streams = ds, source, stream, n_streams
        self.pos = pos
        self._queue: deque[tuple[list[int], _Read]] = deque()  # (token ids, the read document)
        self._skips: Counter = Counter()  # skips seen since the last document read
        self._docs = self._read(*pos)
        self.tail_skips: Counter = Counter()  # skips after the last document of a finite pass
        self._token_epoch = pos.epoch  # the last epoch a document with tokens came from (or the starting one)

    def _read(self, epoch: int, unit: int, line: int, offset: int) -> Iterator[_Read]:
        ds, files = self.ds, self.ds.files[self.source]
        units = plan_units(len(files), self.n_streams, self.stream)
        while ds.infinite or epoch == 0:
            order = epoch_order(len(files), seed=ds.seed, source=self.source, epoch=epoch, shuffle=ds.shuffle)
            fresh, found = unit == 0 and line == 1, False
            for k in range(unit, len(units)):
                part = units[k]
                for doc in iter_documents(
                    files[order[part.file]],
                    text_field=ds.text_field,
                    on_error=ds.on_error,
                    start_line=line,
                    start_offset=offset,
                    stride=part.stride,
                    phase=part.phase,
                    skipped=self._skips,
                ):
                    found, skips = True, None
                    if self._skips:
                        skips = Counter(self._skips)
                        self._skips.clear()
                    start = Position(epoch, k, doc.line, doc.offset)
                    yield _Read(doc.text, start=start, after=Position(epoch, k, doc.line + 1, doc.end), skips=skips)
                line, offset = 1, 0
            if fresh and not found and ds.infinite:  # an infinite loop that never yields would hang training
                raise DataError(
                    f"data source {ds.sources[self.source].name!r}: stream {self.stream} of {self.n_streams} "
                    f"got no document in epoch {epoch} from its {len(units)} file part(s) (skipped: "
                    f"{dict(self._skips) or 'nothing'}); use more data, or fewer streams (a smaller "
                    "train.global_batch_size: one stream per sequence of it; for evaluation fewer ranks or workers)"
                )
            epoch, unit = epoch + 1, 0

    def _fill(self) -> bool:
        docs: list[_Read] = []
        chars = 0
        for doc in self._docs:
            docs.append(doc)
            chars += len(doc.text)
            if len(docs) >= TOKENIZE_DOCS or chars >= TOKENIZE_CHARS:
                break
        if not docs:
            return False
        ids = self.ds.tokenizer.encode_batch([d.text for d in docs], bos=self.ds.add_bos, eos=self.ds.add_eos)
        self._queue.extend(zip(ids, docs, strict=True))
        return True

    def next(self) -> TokenizedDocument | None:
        """The next document with tokens (and the skips before it, empty texts included); None when a pass ends."""
        skips = None
        while self._queue or self._fill():
            ids, doc = self._queue.popleft()
            self.pos = doc.after
            if doc.skips:
                skips = doc.skips if skips is None else skips + doc.skips
            if ids:
                self._token_epoch = doc.start.epoch
                return TokenizedDocument(ids, doc.start, skips)
            skips = (skips or Counter()) + Counter(empty_tokens=1)  # a text that tokenizes to nothing
            if doc.start.epoch > self._token_epoch + 1:  # a whole epoch without a token: an endless loop otherwise
                name = self.ds.sources[self.source].name
                raise DataError(
                    f"data source {name!r}: stream {self.stream} of {self.n_streams} "
                    f"read a whole epoch whose every document tokenizes to no id (skipped: {dict(skips)}); "
                    "check the text field (data.text_field) and the tokenizer, or keep BOS/EOS on"
                )
        self.tail_skips.update(skips or {})
        self.tail_skips.update(self._skips)  # lines skipped after the last document
        self._skips.clear()
        return None


class _Stream:
    """Stream `stream` of `n_streams`: its part of each source, mixed by weight, packed into windows; exact state."""

    def __init__(self, ds: StreamingDataset, stream: int, n_streams: int, state: dict | None) -> None:
        state = state or {
            "sources": [Position.start()._asdict() for _ in ds.sources],
            "taken": [0] * len(ds.sources),
            "carry": None,
            "finished": False,
            "stats": {"documents": 0, "tokens": 0, "skipped": {}, "busy_s": 0.0},
        }
        self.ds, self.seq_len, self.weights = ds, ds.seq_len, ds.weights
        positions = [Position(**p) for p in state["sources"]]
        self.readers = [_Reader(ds, j, stream, n_streams, p) for j, p in enumerate(positions)]
        self.taken, self.finished = list(state["taken"]), state["finished"]
        st = state["stats"]
        self.documents, self.tokens, self.busy_s = st["documents"], st["tokens"], st["busy_s"]
        self.skipped = Counter(st["skipped"])
        self.active = list(range(len(ds.sources)))  # sources not exhausted (a finite pass drops them as they end)
        self.buf: list[int] = []
        self.pos = 0  # buf[pos:] is not yet emitted as a window start
        self.doc_starts: deque[int] = deque()  # buf indices > pos where a document begins
        self.last: _Taken | None = None  # the last document taken
        if state["carry"] is not None:
            j, used, length = state["carry"]["source"], state["carry"]["skip"], state["carry"]["length"]
            got = self.readers[j].next()
            if got is None or len(got.ids) != length:
                raise DataError(
                    f"data source {ds.sources[j].name!r}: the document at {state['sources'][j]} no longer has "
                    f"{length} tokens; the data or tokenizer changed since this state was saved"
                )
            self.buf, self.last = got.ids[used:], _Taken(source=j, start=got.start, length=length, at=-used)

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
            if got.skips:
                self.skipped.update(got.skips)
            self.documents += 1
            self.tokens += len(got.ids)
            self.taken[j] += len(got.ids)
            self.doc_starts.append(len(self.buf))
            self.last = _Taken(source=j, start=got.start, length=len(got.ids), at=len(self.buf))
            self.buf.extend(got.ids)
            return True
        return False

    def next_window(self) -> Window | None:
        """The next window, or None once a finite pass is spent."""
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
            self.last, self.pos = self.last._replace(at=self.last.at - self.pos), 0
        return Window(window, real=real, boundaries=bounds)

    def next_row(self) -> Window:
        """The next window of an infinite stream (the training loader's rows)."""
        t0 = time.perf_counter()
        window = self.next_window()
        self.busy_s += time.perf_counter() - t0
        if window is None:
            raise DataError("a finite StreamingDataset (infinite=False) cannot feed the training loader")
        return window

    def state_dict(self) -> dict[str, Any]:
        """Where this stream is (plain python): the next document of each source and the straddling one."""
        sources, carry = [r.pos for r in self.readers], None
        if not self.finished and (last := self.last) is not None and len(self.buf) > self.pos:
            sources[last.source] = last.start
            carry = {"source": last.source, "skip": self.pos - last.at, "length": last.length}
        stats = {"documents": self.documents, "tokens": self.tokens, "skipped": dict(self.skipped)}
        stats["busy_s"] = self.busy_s
        return {
            "sources": [p._asdict() for p in sources],
            "taken": list(self.taken),
            "carry": carry,
            "finished": self.finished,
            "stats": stats,
        }

    def batches(self, batch_size: int) -> Iterator[StreamBatch]:
        """Batches and the state after each until a finite pass ends; the last batch of a pass may have fewer rows."""
        while True:
            t0 = time.perf_counter()
            rows = []
            while len(rows) < batch_size and (row := self.next_window()) is not None:
                rows.append(row)
            if not rows:
                return
            batch = self.ds.collate(rows)
            self.busy_s += time.perf_counter() - t0
            yield StreamBatch(batch, self.state_dict())


class StreamingDataset(IterableDataset):  # also a dataset.loader.StreamSource
    """Packed `seq_len + 1` windows from shards or a weighted mixture of sources; see the module docstring.

    Args:
        sources: a glob, directory or path, a list of them, or a list of `DataSource` for a weighted mixture.
        tokenizer: a `dataset.tokenizer.Tokenizer`.
        seq_len: tokens per row of input_ids / targets (windows hold seq_len + 1).
        dp_rank: this data-parallel rank, for the per-rank streams of `batches` / `__iter__` (evaluation); the
            training loader (dataset/loader.py) reads streams by global index and ignores it.
        dp_size: number of data-parallel ranks (the same).
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
        self.files = [resolve_paths(s.path, on_error=on_error, skipped=self.skipped_paths) for s in self.sources]
        total = sum(s.weight for s in self.sources)
        self.weights = [s.weight / total for s in self.sources]
        self.pad_id = next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i is not None and i >= 0), 0)

    kind = "text"

    def fingerprint(self) -> dict[str, Any]:
        """What a stream state depends on, without the layout; loading a state of another fingerprint is an error."""
        sources = [
            {
                "name": s.name,
                "weight": round(w, 12),
                "files": hashlib.sha1("\n".join(p.name for p in f).encode()).hexdigest()[:16] + f"x{len(f)}",
            }
            for s, w, f in zip(self.sources, self.weights, self.files, strict=True)
        ]
        keys = ("seed", "seq_len", "add_bos", "add_eos", "text_field", "infinite", "shuffle")
        fingerprint = {k: getattr(self, k) for k in keys}
        return {**fingerprint, "sources": sources, "tokenizer": tokenizer_identity(self.tokenizer)}

    def check_streams(self, num_streams: int) -> None:
        """The training loader reads infinite streams (any number: the files are split line by line if need be)."""
        if not self.infinite:
            raise ValueError("the training loader reads an infinite StreamingDataset (infinite=True)")

    def open_stream(self, index: int, count: int, state: dict | None = None) -> _Stream:
        """Stream `index` of `count` (its windows: `next_row()`, `state_dict()`), from `state` or its beginning."""
        if not 0 <= index < count:
            raise ValueError(f"stream {index} of {count}: need 0 <= index < count")
        return _Stream(self, index, count, state)

    def collate(self, rows: list[Window]) -> dict[str, torch.Tensor]:
        """A batch of windows: input_ids, targets (-100 past a padded window's data)[, document_ids]: (B, seq_len)."""
        padded = any(row.real < self.seq_len + 1 for row in rows)
        return make_batch(
            [row.ids for row in rows],
            real_lengths=[row.real for row in rows] if padded else None,
            boundaries=[row.boundaries for row in rows] if self.return_document_ids else None,
        )

    def stream_stats(self, states: list[dict]) -> dict[str, Any]:
        """documents, tokens, skipped (by reason), tokens_per_s and epoch (the smallest) over these stream states."""
        done = [s["stats"] for s in states]
        skipped = Counter(self.skipped_paths)
        for st in done:
            skipped.update(st["skipped"])
        return {
            "documents": sum(st["documents"] for st in done),
            "tokens": sum(st["tokens"] for st in done),
            "skipped": dict(skipped),
            "tokens_per_s": sum(st["tokens"] / st["busy_s"] for st in done if st["busy_s"] > 0),
            "epoch": min((min(p["epoch"] for p in s["sources"]) for s in states), default=0),
        }

    def batches(
        self, batch_size: int, *, stream: int = 0, n_streams: int = 1, state: dict | None = None
    ) -> Iterator[StreamBatch]:
        """Batches and states of this rank's stream `stream` of `n_streams` (global stream dp_rank * n + stream)."""
        g, n = self.dp_rank * n_streams + stream, self.dp_size * n_streams
        return _Stream(self, g, n, state).batches(batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Single windows (for a plain DataLoader; each worker reads its own stream). Use dataset.loader to resume."""
        info = get_worker_info()
        stream, n = (0, 1) if info is None else (info.id, info.num_workers)
        for batch, _ in self.batches(1, stream=stream, n_streams=n):
            yield {k: v[0] for k, v in batch.items()}
