r"""Supervised fine-tuning data: chat records -> token ids with a loss mask -> packed, resumable batches.

Input: `.jsonl` or `.jsonl.zst` files (globs allowed), one chat record per line in one of the forms of
`dataset/chat.py`, which also renders each conversation to token ids and labels: -100 everywhere but the assistant
turns. A record that cannot be used is an `SFTDataError` naming the file and line (counted and left out with
on_error="skip").

Batches: the whole data set is read and tokenized at construction, on every rank (SFT sets are small: 5 bytes a
token, so 100k conversations of 500 tokens take 250 MB, and they load at about a million tokens a second). Conversations
longer than `seq_len + 1` are dropped or cut at the right. Every epoch is a fresh permutation seeded by (seed, epoch).
The training loader (dataset/loader.py's GlobalBatchLoader) reads K streams, K fixed for the run whatever the
layout: stream k takes every K-th conversation of each epoch's permutation (`[k::K]`), and its state is the
(epoch, position) of its next conversation. Evaluation (`build_sft_loader`) reads per rank: rank r of dp takes
`[r::dp]`. Rows of `seq_len + 1` tokens are filled in that order: with `pack=True` whole conversations are added
while they fit (next fit: a conversation is never split; the first that does not fit starts the next row), with
`pack=False` one conversation per row; the rest is padding.
Each batch holds

    input_ids     (B, seq_len)  row[:-1]
    targets       (B, seq_len)  labels[1:]: the label of the next token, -100 where masked or padding
    document_ids  (B, seq_len)  0, 1, ... per conversation in the row; the padding gets its own id

    loader = GlobalBatchLoader(SFTDataset("sft/*.jsonl.zst", tokenizer, 2048), micro_batch=4, grad_accum=1,
                               dp_rank=r, dp_size=n)      # training: resumable at any layout
    batch = next(iter(build_sft_loader(SFTDataset(..., dp_rank=r, dp_size=n), 4)))   # evaluation: this rank's rows
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import warnings
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from dataset.chat import ChatError, ChatRenderer, normalize_record
from dataset.files import FileRules, find_files
from dataset.jsonl_zst import ON_ERROR, DataWarning
from dataset.lines import DataError, iter_lines
from dataset.loader import GlobalBatchLoader, tokenizer_identity
from dataset.packing import IGNORE_INDEX
from dataset.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

TRUNCATION = ("drop", "truncate")
WARN_LIMIT = 10  # skipped records warned about; later ones are only counted
RENDER_CHUNK = 1024  # conversations tokenized per tokenizer call while loading


class SFTDataError(DataError):
    """SFT data that cannot be used: a bad record, too few conversations, or a saved position of other data."""


def chat_files(what: str, error: type[DataError]) -> FileRules:
    """The file rules of chat data sets: paths and globs of .jsonl(.zst) files, a file named twice read once.

    `what` names the data in messages ("SFT data"), `error` is the DataError they raise.
    """
    return FileRules(
        suffixes=(".jsonl", ".jsonl.zst"),
        error=error,
        nothing=f"no {what} given: pass .jsonl or .jsonl.zst files or globs",
        missing="{path}: no such file",
        no_match="{item}: the glob matches no file",
        unsupported=f"{{path}}: unsupported file type; {what} is .jsonl or .jsonl.zst",
        directories=None,
        others="report",
    )


SFT_FILES = chat_files("SFT data", SFTDataError)


class ChatDataset:
    """What SFT and preference data share: chat records read, rendered and length-checked at construction.

    Rows come by stream (training) or by rank (evaluation); each epoch is a permutation seeded by (seed, epoch).

    A subclass sets `kind`, `unit` (what a record becomes: "conversations", "pairs"), `error` (the `DataError` it
    raises) and `file_rules`, and defines `_parse(obj, path, line)` (a parsed record -> what `_load` renders; a
    `ChatError` for a bad one), `_load()` (reads `_records` of each file into its buffers, `tokens` among them,
    and sets the counts), `__len__`, `next_row` and `collate`. The arguments are those of `SFTDataset`.
    """

    kind: str
    unit: str
    error: type[DataError]
    file_rules: FileRules

    def __init__(
        self,
        paths_or_glob: str | Path | Sequence[str | Path],
        tokenizer: Tokenizer,
        seq_len: int,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        truncation: str = "drop",
        on_error: str = "raise",
    ) -> None:
        if truncation not in TRUNCATION:
            raise ValueError(f"truncation={truncation!r}: use one of {', '.join(TRUNCATION)}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r}: use one of {', '.join(ON_ERROR)}")
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len}: must be at least 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank}, dp_size={dp_size}: need 0 <= dp_rank < dp_size")
        self.files = find_files(paths_or_glob, self.file_rules)
        self.seq_len, self.window = seq_len, seq_len + 1
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.truncation, self.on_error = truncation, on_error
        self.tokenizer, self.renderer = tokenizer, ChatRenderer(tokenizer)
        pad = next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i >= 0), 0)
        self.pad_id = pad  # padding is never a target, any id would do
        self.counts = {self.unit: 0, "dropped": 0, "truncated": 0, "skipped": 0}
        self._warned = 0
        self._load()
        if len(self) < dp_size:
            raise self._too_few(f"{dp_size} data-parallel ranks ({self.counts})")
        self._perms: dict[int, list[int]] = {}  # epoch -> its permutation (the two latest asked for)
        self._orders: dict[tuple[int, int], tuple[int, list[int]]] = {}  # (stream, streams) -> (epoch, its slice)

    def _too_few(self, needed: str, todo: str = "") -> DataError:
        return self.error(
            f"{self.files[0]}{' ...' if len(self.files) > 1 else ''}: {len(self)} usable {self.unit} for {needed}; "
            f"add data, {todo}raise seq_len or set truncation='truncate'"
        )

    def _records(self, path: Path) -> Iterator[Any]:
        """`_parse` of each record of the file; a bad one goes to `_bad_record`."""
        for line, _, _, raw in iter_lines(path):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                self._bad_record(f"{path}:{line}: invalid JSON ({e})")
                continue
            try:
                parsed = self._parse(obj, path, line)
            except ChatError as e:
                self._bad_record(str(e))
                continue
            yield parsed

    def _bad_record(self, problem: str) -> None:
        if self.on_error == "raise":
            raise self.error(f"{problem}; fix the record, or set on_error='skip' to count and skip it")
        self.counts["skipped"] += 1
        if self._warned < WARN_LIMIT:
            self._warned += 1
            more = " (further skips are counted, not shown)" if self._warned == WARN_LIMIT else ""
            warnings.warn(f"skipped: {problem}{more}", DataWarning, stacklevel=3)  # at the reader of the records

    def order(self, epoch: int, stream: int | None = None, n_streams: int | None = None) -> list[int]:
        """Records of stream `stream` of `n_streams` in `epoch`, in row order (by default this rank's).

        `[stream::n_streams]` of the (seed, epoch) permutation; this rank's is `[dp_rank::dp_size]`.
        """
        key = (self.dp_rank if stream is None else stream, n_streams or self.dp_size)
        cached = self._orders.get(key)
        if cached is None or cached[0] != epoch:  # each stream keeps its current epoch's slice; streams drift apart
            if (perm := self._perms.get(epoch)) is None:
                if len(self._perms) >= 2:
                    del self._perms[min(self._perms)]
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (1 << 63))
                perm = self._perms[epoch] = torch.randperm(len(self), generator=g).tolist()
            cached = self._orders[key] = (epoch, perm[key[0] :: key[1]])
        return cached[1]

    def stats(self) -> dict[str, int]:
        """Records kept (`unit`), dropped as too long, truncated, and skipped as bad records."""
        return dict(self.counts)

    def fingerprint(self) -> dict[str, Any]:
        """What a stream's (epoch, position) depends on, without the layout (checked when a state is loaded).

        The subclass's `_load` sets `tokens`, the kept records' token ids.
        """
        names = "\n".join(p.name for p in self.files).encode()
        return {
            "files": hashlib.sha1(names).hexdigest()[:16] + f"x{len(self.files)}",
            self.unit: len(self),
            "tokens": len(self.tokens),
            "seq_len": self.seq_len,
            "truncation": self.truncation,
            "seed": self.seed,
            "tokenizer": tokenizer_identity(self.tokenizer),
        }

    def check_streams(self, num_streams: int) -> None:
        """Every stream needs a record in each epoch."""
        if len(self) < num_streams:
            raise self._too_few(
                f"{num_streams} streams (one per sequence of train.global_batch_size; {self.counts})",
                "lower train.global_batch_size, ",
            )

    def open_stream(self, index: int, count: int, state: dict | None = None) -> _SFTStream:
        """Stream `index` of `count`: the rows of records `[index::count]` of each epoch, from `state`."""
        return _SFTStream(self, index, count, state)

    def stream_stats(self, states: list[dict]) -> dict[str, Any]:
        """The data set's counts (skipped: bad records) and the smallest epoch of these streams."""
        return {**self.counts, "epoch": min((s["epoch"] for s in states), default=0)}


class SFTDataset(ChatDataset):
    """Every conversation of the files, rendered and length-checked; rows by stream (training) or by rank (eval).

    Also a `dataset.loader.StreamSource` (kind "sft"): the training loader reads it as K streams.

    Args:
        paths_or_glob: `.jsonl` / `.jsonl.zst` files or globs.
        tokenizer: a `Tokenizer` with the chat markers.
        seq_len: tokens per row of input_ids; a row holds `seq_len + 1` tokens before the shift.
        dp_rank: this rank's index in the data-parallel group (the per-rank rows of `order` / `build_sft_loader`).
        dp_size: the data-parallel group's size; ranks get disjoint conversations (the same).
        seed: seeds each epoch's permutation together with the epoch number.
        pack: several conversations per row with document ids (True), or one per row (False).
        truncation: a conversation longer than `seq_len + 1` is dropped ("drop") or cut at the right ("truncate",
            labels cut with it; one left with no label to predict is dropped).
        on_error: a bad record raises ("raise") or is counted, warned about and left out ("skip"). Missing or
            corrupt files always raise.
    """

    kind = "sft"
    unit = "conversations"
    error = SFTDataError
    file_rules = SFT_FILES

    def __init__(
        self,
        paths_or_glob: str | Path | Sequence[str | Path],
        tokenizer: Tokenizer,
        seq_len: int,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        pack: bool = True,
        truncation: str = "drop",
        on_error: str = "raise",
    ) -> None:
        self.pack = pack
        super().__init__(
            paths_or_glob,
            tokenizer,
            seq_len,
            dp_rank=dp_rank,
            dp_size=dp_size,
            seed=seed,
            truncation=truncation,
            on_error=on_error,
        )

    def _parse(self, obj: Any, path: Path, line: int) -> list[dict[str, str]]:
        return normalize_record(obj, path, line)

    def _load(self) -> None:
        ids, mask, offsets = array("i"), bytearray(), [0]
        for path in self.files:
            records = self._records(path)
            while chunk := list(itertools.islice(records, RENDER_CHUNK)):
                for seq, labels in self.renderer.render_many(chunk):
                    if len(seq) > self.window:
                        seq, labels = seq[: self.window], labels[: self.window]
                        if self.truncation == "drop" or all(x == IGNORE_INDEX for x in labels[1:]):
                            self.counts["dropped"] += 1
                            continue
                        self.counts["truncated"] += 1
                    ids.extend(seq)
                    mask.extend(x != IGNORE_INDEX for x in labels)
                    offsets.append(len(ids))
        self.counts["conversations"] = len(offsets) - 1
        self._buffers = (ids, mask)  # the tensors below share their memory
        self.tokens = torch.frombuffer(ids, dtype=torch.int32) if ids else torch.zeros(0, dtype=torch.int32)
        self.labelled = torch.frombuffer(mask, dtype=torch.bool) if mask else torch.zeros(0, dtype=torch.bool)
        self.offsets = offsets
        logger.info("SFT data %s: %s, %d tokens", [str(f) for f in self.files], self.counts, len(ids))

    def __len__(self) -> int:
        """Number of conversations kept (all ranks together)."""
        return len(self.offsets) - 1

    def conversation(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (int32, as stored) and labels (int64, -100 where not trained) of kept conversation `index`."""
        a, b = self.offsets[index], self.offsets[index + 1]
        return self.tokens[a:b], torch.where(self.labelled[a:b], self.tokens[a:b].long(), IGNORE_INDEX)

    def next_row(
        self, epoch: int, position: int, stream: int | None = None, n_streams: int | None = None
    ) -> tuple[dict[str, torch.Tensor], int, int]:
        """The row that starts at conversation `position` of `epoch`'s order, and the (epoch, position) after it.

        The order is stream `stream` of `n_streams`'s (by default this rank's). The row dict holds `tokens`,
        `labels` and `document_ids`, each of `seq_len + 1` (int64).
        """
        tokens = torch.full((self.window,), self.pad_id, dtype=torch.long)
        labels = torch.full((self.window,), IGNORE_INDEX, dtype=torch.long)
        documents = torch.empty(self.window, dtype=torch.long)
        used = doc = 0
        while True:
            order = self.order(epoch, stream, n_streams)
            index = order[position]
            a, b = self.offsets[index], self.offsets[index + 1]
            if used + b - a > self.window:  # never on an empty row: every kept conversation fits
                break
            tokens[used : used + b - a], labels[used : used + b - a] = self.conversation(index)
            documents[used : used + b - a] = doc
            used, doc, position = used + b - a, doc + 1, position + 1
            if position == len(order):
                epoch, position = epoch + 1, 0
            if not self.pack:
                break
        documents[used:] = doc
        return {"tokens": tokens, "labels": labels, "document_ids": documents}, epoch, position

    def fingerprint(self) -> dict[str, Any]:
        """ChatDataset's, and whether rows are packed."""
        return {**super().fingerprint(), "pack": self.pack}

    @staticmethod
    def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """input_ids, targets and document_ids (B, seq_len) from rows of `next_row`."""
        tokens = torch.stack([r["tokens"] for r in rows])  # (B, seq_len + 1)
        labels = torch.stack([r["labels"] for r in rows])  # (B, seq_len + 1)
        documents = torch.stack([r["document_ids"] for r in rows])  # (B, seq_len + 1)
        return {
            "input_ids": tokens[:, :-1].contiguous(),
            "targets": labels[:, 1:].contiguous(),
            "document_ids": documents[:, :-1].contiguous(),
        }


class _SFTStream:
    """One stream of a ChatDataset: its (epoch, position) and the rows from there."""

    def __init__(self, ds: ChatDataset, index: int, count: int, state: dict | None) -> None:
        if not 0 <= index < count:
            raise ValueError(f"stream {index} of {count}: need 0 <= index < count")
        self.ds, self.index, self.count = ds, index, count
        self.epoch, self.position = (int(state["epoch"]), int(state["position"])) if state else (0, 0)

    def next_row(self) -> dict[str, torch.Tensor]:
        """The next row: tokens, labels, document_ids of seq_len + 1."""
        row, self.epoch, self.position = self.ds.next_row(self.epoch, self.position, self.index, self.count)
        return row

    def state_dict(self) -> dict[str, int]:
        """The (epoch, position) of the next conversation."""
        return {"epoch": self.epoch, "position": self.position}


class SFTLoader:
    """This rank's own infinite stream of batches (`[dp_rank::dp_size]` of each epoch): evaluation, no state.

    Reads any ChatDataset (SFT conversations, preference pairs).
    """

    def __init__(self, dataset: ChatDataset, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        self.dataset, self.batch_size = dataset, batch_size
        self.epoch = self.position = 0

    def __iter__(self) -> SFTLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(self.batch_size):
            row, self.epoch, self.position = self.dataset.next_row(self.epoch, self.position)
            rows.append(row)
        return self.dataset.collate(rows)

    def stats(self) -> dict[str, int]:
        """The dataset's counts: conversations (or pairs), dropped, truncated, skipped."""
        return self.dataset.stats()


def build_sft_loader(dataset: SFTDataset, batch_size: int) -> SFTLoader:
    """This rank's own infinite iterator of `batch_size` rows of `dataset` (evaluation; see the module docstring)."""
    return SFTLoader(dataset, batch_size)


def build_sft_train_loader(
    dataset: SFTDataset, *, micro_batch: int, grad_accum: int, dp_rank: int, dp_size: int, pin_memory: bool = False
) -> GlobalBatchLoader:
    """The training loader: the run's global stream of rows over K streams, resumable at any layout.

    `pin_memory`: rows in page-locked memory, for asynchronous copies to a CUDA device.
    """
    return GlobalBatchLoader(
        dataset, micro_batch=micro_batch, grad_accum=grad_accum, dp_rank=dp_rank, dp_size=dp_size, pin_memory=pin_memory
    )
