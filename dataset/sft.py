r"""Supervised fine-tuning data: chat records -> token ids with a loss mask -> packed, resumable batches.

Input: `.jsonl` or `.jsonl.zst` files (globs allowed), one chat record per line in one of the forms of
`dataset/chat.py`, which also renders each conversation to token ids and labels: -100 everywhere but the assistant
turns. A record that cannot be used is an `SFTDataError` naming the file and line (counted and left out with
on_error="skip").

Batches: the whole data set is read and tokenized at construction, on every rank (SFT sets are small: 5 bytes a
token, so 100k conversations of 500 tokens take 250 MB, and they load at about a million tokens a second). Conversations
longer than `seq_len + 1` are dropped or cut at the right. Every epoch is a fresh permutation seeded by (seed, epoch),
of which each data-parallel rank takes every dp_size-th conversation. Rows of `seq_len + 1` tokens are filled in
that order: with `pack=True` whole conversations are added while they fit (next fit: a conversation is never split;
the first that does not fit starts the next row), with `pack=False` one conversation per row; the rest is padding.
Each batch holds

    input_ids     (B, seq_len)  row[:-1]
    targets       (B, seq_len)  labels[1:]: the label of the next token, -100 where masked or padding
    document_ids  (B, seq_len)  0, 1, ... per conversation in the row; the padding gets its own id

    loader = build_sft_loader(SFTDataset("sft/*.jsonl.zst", tokenizer, 2048, dp_rank=r, dp_size=n), 4)
    batch = next(iter(loader)); state = loader.state_dict()   # (epoch, position): a resumed run goes on exactly
"""

from __future__ import annotations

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
from dataset.packing import IGNORE_INDEX
from dataset.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

TRUNCATION = ("drop", "truncate")
WARN_LIMIT = 10  # skipped records warned about; later ones are only counted
RENDER_CHUNK = 1024  # conversations tokenized per tokenizer call while loading


class SFTDataError(DataError):
    """SFT data that cannot be used: a bad record, too few conversations, or a saved position of other data."""


# Paths and globs of .jsonl(.zst) files; a file named twice is read once.
SFT_FILES = FileRules(
    suffixes=(".jsonl", ".jsonl.zst"),
    error=SFTDataError,
    nothing="no SFT data given: pass .jsonl or .jsonl.zst files or globs",
    missing="{path}: no such file",
    no_match="{item}: the glob matches no file",
    unsupported="{path}: unsupported file type; SFT data is .jsonl or .jsonl.zst",
    directories=None,
    others="report",
)


class SFTDataset:
    """Every conversation of the files, rendered and length-checked, and the rows of one data-parallel rank.

    Args:
        paths_or_glob: `.jsonl` / `.jsonl.zst` files or globs.
        tokenizer: a `Tokenizer` with the chat markers.
        seq_len: tokens per row of input_ids; a row holds `seq_len + 1` tokens before the shift.
        dp_rank: this rank's index in the data-parallel group.
        dp_size: the data-parallel group's size; ranks get disjoint conversations.
        seed: seeds each epoch's permutation together with the epoch number.
        pack: several conversations per row with document ids (True), or one per row (False).
        truncation: a conversation longer than `seq_len + 1` is dropped ("drop") or cut at the right ("truncate",
            labels cut with it; one left with no label to predict is dropped).
        on_error: a bad record raises ("raise") or is counted, warned about and left out ("skip"). Missing or
            corrupt files always raise.
    """

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
        if truncation not in TRUNCATION:
            raise ValueError(f"truncation={truncation!r}: use one of {', '.join(TRUNCATION)}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r}: use one of {', '.join(ON_ERROR)}")
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len}: must be at least 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank}, dp_size={dp_size}: need 0 <= dp_rank < dp_size")
        self.files = find_files(paths_or_glob, SFT_FILES)
        self.seq_len, self.window = seq_len, seq_len + 1
        self.dp_rank, self.dp_size, self.seed, self.pack = dp_rank, dp_size, seed, pack
        self.truncation, self.on_error = truncation, on_error
        self.renderer = ChatRenderer(tokenizer)
        pad = next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i >= 0), 0)
        self.pad_id = pad  # padding is never a target, any id would do
        self.counts = {"conversations": 0, "dropped": 0, "truncated": 0, "skipped": 0}
        self._warned = 0
        self._load()
        if len(self) < dp_size:
            raise SFTDataError(
                f"{self.files[0]}{' ...' if len(self.files) > 1 else ''}: {len(self)} usable conversations for "
                f"{dp_size} data-parallel ranks ({self.counts}); add data, raise seq_len or set truncation='truncate'"
            )
        self._order: tuple[int, list[int]] | None = None

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

    def _records(self, path: Path) -> Iterator[list[dict[str, str]]]:
        for line, _, _, raw in iter_lines(path):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                self._bad_record(f"{path}:{line}: invalid JSON ({e})")
                continue
            try:
                messages = normalize_record(obj, path, line)
            except ChatError as e:
                self._bad_record(str(e))
                continue
            yield messages

    def _bad_record(self, problem: str) -> None:
        if self.on_error == "raise":
            raise SFTDataError(f"{problem}; fix the record, or set on_error='skip' to count and skip it")
        self.counts["skipped"] += 1
        if self._warned < WARN_LIMIT:
            self._warned += 1
            more = " (further skips are counted, not shown)" if self._warned == WARN_LIMIT else ""
            warnings.warn(f"skipped: {problem}{more}", DataWarning, stacklevel=3)  # at the reader of the records

    def __len__(self) -> int:
        """Number of conversations kept (all ranks together)."""
        return len(self.offsets) - 1

    def conversation(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (int32, as stored) and labels (int64, -100 where not trained) of kept conversation `index`."""
        a, b = self.offsets[index], self.offsets[index + 1]
        return self.tokens[a:b], torch.where(self.labelled[a:b], self.tokens[a:b].long(), IGNORE_INDEX)

    def order(self, epoch: int) -> list[int]:
        """This rank's conversations in `epoch`, in row order: every dp_size-th of a (seed, epoch) permutation."""
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (1 << 63))
            self._order = (epoch, torch.randperm(len(self), generator=g)[self.dp_rank :: self.dp_size].tolist())
        return self._order[1]

    def next_row(self, epoch: int, position: int) -> tuple[dict[str, torch.Tensor], int, int]:
        """The row that starts at conversation `position` of `epoch`'s order, and the (epoch, position) after it.

        The row dict holds `tokens`, `labels` and `document_ids`, each of `seq_len + 1` (int64).
        """
        tokens = torch.full((self.window,), self.pad_id, dtype=torch.long)
        labels = torch.full((self.window,), IGNORE_INDEX, dtype=torch.long)
        documents = torch.empty(self.window, dtype=torch.long)
        used = doc = 0
        while True:
            index = self.order(epoch)[position]
            a, b = self.offsets[index], self.offsets[index + 1]
            if used + b - a > self.window:  # never on an empty row: every kept conversation fits
                break
            tokens[used : used + b - a], labels[used : used + b - a] = self.conversation(index)
            documents[used : used + b - a] = doc
            used, doc, position = used + b - a, doc + 1, position + 1
            if position == len(self.order(epoch)):
                epoch, position = epoch + 1, 0
            if not self.pack:
                break
        documents[used:] = doc
        return {"tokens": tokens, "labels": labels, "document_ids": documents}, epoch, position

    def stats(self) -> dict[str, int]:
        """Conversations kept, dropped as too long, truncated, and skipped as bad records."""
        return dict(self.counts)


class SFTLoader:
    """This rank's infinite stream of batches; its state is the (epoch, position) of the next conversation."""

    def __init__(self, dataset: SFTDataset, batch_size: int) -> None:
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
        tokens = torch.stack([r["tokens"] for r in rows])  # (B, seq_len + 1)
        labels = torch.stack([r["labels"] for r in rows])  # (B, seq_len + 1)
        documents = torch.stack([r["document_ids"] for r in rows])  # (B, seq_len + 1)
        return {
            "input_ids": tokens[:, :-1].contiguous(),
            "targets": labels[:, 1:].contiguous(),
            "document_ids": documents[:, :-1].contiguous(),
        }

    def _identity(self) -> dict[str, Any]:
        ds = self.dataset
        return {
            "conversations": len(ds),
            "tokens": len(ds.tokens),
            "seq_len": ds.seq_len,
            "pack": ds.pack,
            "seed": ds.seed,
            "dp_rank": ds.dp_rank,
            "dp_size": ds.dp_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """Position of the next batch, with what it depends on (checked when loaded)."""
        return {"epoch": self.epoch, "position": self.position, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()` taken with the same data and settings."""
        mine = self._identity()
        if changed := [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]:
            raise SFTDataError(
                f"the saved SFT data position does not fit this data set ({'; '.join(changed)}); resume with the same "
                "data and settings, or start without the saved data state"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def stats(self) -> dict[str, int]:
        """The dataset's counts: conversations, dropped, truncated, skipped."""
        return self.dataset.stats()


def build_sft_loader(dataset: SFTDataset, batch_size: int) -> SFTLoader:
    """An infinite, resumable iterator of `batch_size` rows of `dataset` (see the module docstring)."""
    return SFTLoader(dataset, batch_size)
