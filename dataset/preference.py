r"""Preference data for DPO: (prompt, chosen, rejected) records -> pairs of token ids with labels -> resumable batches.

Input: `.jsonl` or `.jsonl.zst` files (globs allowed), one pair per line, in one of three forms:

    {"prompt": "...", "chosen": "...", "rejected": "..."}                                   (optional "system")
    {"messages": [...shared conversation ending with a user turn...], "chosen": X, "rejected": X}
    {"prompt": [...messages ending with a user turn...], "chosen": X, "rejected": X}         (TRL's conversational)

where X is a reply: a string, an assistant message {"role": "assistant", "content": "..."}, or a list of one such
message (TRL). The roles of a shared conversation follow dataset/chat.py (optional system first, then user and
assistant alternating from user) and must end with a user turn; no text may hold a chat marker. A record that
breaks this, or is not JSON, is a `PreferenceDataError` naming the file and line (counted and left out with
on_error="skip"). A pair whose chosen and rejected replies are equal is kept (its DPO loss is log 2, its gradient 0).

Each side is the conversation `prompt + [reply]` rendered by `dataset.chat.ChatRenderer` (the chat template of SFT).
Label rule: only the final reply's tokens and its `<|eot_id|>` carry labels; everything before the final reply's
content is -100 (BOS, headers, system and user turns, and the earlier assistant turns of a shared conversation).
Where the final reply begins is the length of the prompt rendered with `add_generation_prompt=True` less the ids of
its trailing "\n\n"; the ids before it must equal the prompt's (checked for every side), so both sides share the
prompt token for token. Within the reply the labels are the renderer's (those of transformers' assistant mask).

A pair where either side is longer than `seq_len + 1` tokens is dropped (truncation="drop") or both sides are cut
at the right ("truncate"; the pair is dropped when a side is left without a label to predict). Pairs are kept in
file order then line order, and numbered 0, 1, ... in that order: `pair_index`, the key of precomputed reference
log-probabilities (stable for the same files, tokenizer, seq_len and truncation).

Rows are whole pairs (no packing), in the order of dataset/sft.py's `ChatDataset`: every epoch is a permutation
seeded by (seed, epoch); the training loader's stream k of K takes `[k::K]` of it, evaluation rank r of dp
`[r::dp]`. A batch holds, for B pairs (dim 1: 0 = chosen, 1 = rejected):

    input_ids   (B, 2, seq_len)  tokens[..., :-1], padded with the pad id
    targets     (B, 2, seq_len)  labels[..., 1:]: the label of the next token, -100 where masked or padding
    pair_index  (B,)             each pair's index in the data set

    ds = PreferenceDataset("prefs/*.jsonl.zst", tokenizer, 1024, dp_rank=r, dp_size=n)
    loader = build_preference_train_loader(ds, micro_batch=4, grad_accum=2, dp_rank=r, dp_size=n)  # resumable
    batch = next(build_preference_loader(ds, 8))                      # evaluation: this rank's own pairs
    for batch in iter_all_pairs(ds, 8, r, n): ...                     # every pair once (the reference pass)
"""

from __future__ import annotations

import itertools
import logging
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dataset.chat import ChatError, conversation_problem
from dataset.loader import GlobalBatchLoader
from dataset.packing import IGNORE_INDEX
from dataset.sft import RENDER_CHUNK, ChatDataset, SFTDataError, SFTLoader, chat_files
from dataset.tokenizer import CHAT_TOKENS

logger = logging.getLogger(__name__)

SIDES = ("chosen", "rejected")  # dim 1 of a batch, in this order


class PreferenceDataError(SFTDataError):
    """Preference data that cannot be used: a bad record, too few pairs, or a saved position of other data."""


PREFERENCE_FILES = chat_files("preference data", PreferenceDataError)

Messages = list[dict[str, str]]


def _messages(raw: Any, key: str, where: str) -> Messages:
    if not isinstance(raw, list):
        raise ChatError(f"{where}: {key!r} must be a string or a list of {{'role', 'content'}} objects")
    out = []
    for i, m in enumerate(raw):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ChatError(f"{where}: {key!r} message {i} needs string fields 'role' and 'content', found {m!r:.100}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _reply(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if isinstance(value, list) and len(value) == 1:  # TRL's conversational form
        value = value[0]
    if isinstance(value, dict) and value.get("role") == "assistant" and isinstance(value.get("content"), str):
        value = value["content"]
    if not isinstance(value, str):
        found = "missing" if key not in obj else f"{value!r:.100}"
        raise ChatError(
            f"{where}: field {key!r} must be a reply: a string, an assistant message {{'role': 'assistant', "
            f"'content': '...'}} or a list of one, found {found}"
        )
    for marker in CHAT_TOKENS:
        if marker in value:
            raise ChatError(f"{where}: {key!r} contains the chat marker {marker}; remove it (it would end a turn)")
    return value


def preference_record(obj: Any, path: str | Path, line: int) -> tuple[Messages, str, str]:
    """(prompt messages, chosen reply, rejected reply) of one parsed record (any form); ChatError names `path:line`."""
    where = f"{path}:{line}"
    if not isinstance(obj, dict):
        raise ChatError(f"{where}: a record is a JSON object, found {type(obj).__name__}")
    if "messages" in obj and "prompt" in obj:
        raise ChatError(f"{where}: both 'messages' and 'prompt'; give the shared conversation once")
    key = "messages" if "messages" in obj else "prompt"
    if key not in obj:
        raise ChatError(
            f"{where}: unknown record form (keys {sorted(obj)[:8]}); use 'prompt'/'chosen'/'rejected' or "
            "'messages'/'chosen'/'rejected'"
        )
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise ChatError(f"{where}: field 'system' must be a string, found a {type(system).__name__}")
    if isinstance(obj[key], str) and key == "prompt":
        prompt = [{"role": "system", "content": system}] if system else []
        prompt.append({"role": "user", "content": obj[key]})
    else:
        prompt = _messages(obj[key], key, where)
        if system is not None:
            raise ChatError(f"{where}: 'system' goes with a string 'prompt'; put a system message first in {key!r}")
    if prompt and prompt[-1]["role"] == "assistant":
        raise ChatError(
            f"{where}: {key!r} ends with an assistant message; the shared conversation ends with the user turn that "
            "'chosen' and 'rejected' reply to"
        )
    if problem := conversation_problem(prompt, for_generation=True):
        raise ChatError(f"{where}: {key!r}: {problem}")
    return prompt, _reply(obj, "chosen", where), _reply(obj, "rejected", where)


class PreferenceDataset(ChatDataset):
    """Every (prompt, chosen, rejected) pair of the files, rendered and length-checked; one pair a row.

    A `dataset.loader.StreamSource` (kind "preference"): the training loader reads it as K streams of pairs.

    Args (ChatDataset's constructor):
        paths_or_glob: `.jsonl` / `.jsonl.zst` files or globs.
        tokenizer: a `Tokenizer` with the chat markers.
        seq_len: tokens per side of a row of input_ids; a side holds `seq_len + 1` tokens before the shift.
        dp_rank: this rank's index in the data-parallel group (the per-rank rows of `build_preference_loader`).
        dp_size: the data-parallel group's size; ranks get disjoint pairs (the same).
        seed: seeds each epoch's permutation together with the epoch number.
        truncation: a pair with a side longer than `seq_len + 1` is dropped ("drop") or both sides are cut at the
            right ("truncate"; a pair left with a side without labels is dropped).
        on_error: a bad record raises ("raise") or is counted, warned about and left out ("skip"). Missing or
            corrupt files always raise.
    """

    kind = "preference"
    unit = "pairs"
    error = PreferenceDataError
    file_rules = PREFERENCE_FILES

    def _parse(self, obj: Any, path: Path, line: int) -> tuple[str, Messages, str, str]:
        return (f"{path}:{line}", *preference_record(obj, path, line))

    def _load(self) -> None:
        """Render the pairs chunk by chunk (two tokenizer calls a chunk) into one int32 buffer and a label mask.

        Pair i's chosen side is `offsets[2i]:offsets[2i+1]`, its rejected side `offsets[2i+1]:offsets[2i+2]`.
        """
        ids, mask, offsets = array("i"), bytearray(), [0]
        render = self.renderer.render_many
        keep = len(self.renderer.separator)  # a side's final reply starts this many ids before its prompt's end
        for path in self.files:
            records = self._records(path)
            while chunk := list(itertools.islice(records, RENDER_CHUNK)):
                heads = render([prompt for _, prompt, _, _ in chunk], add_generation_prompt=True)
                sides = render(
                    [
                        [*prompt, {"role": "assistant", "content": reply}]
                        for _, prompt, *replies in chunk
                        for reply in replies
                    ]
                )
                for i, (where, *_) in enumerate(chunk):
                    start = len(heads[i][0]) - keep
                    pair = []
                    for seq, labels in sides[2 * i : 2 * i + 2]:
                        if seq[:start] != heads[i][0][:start]:
                            raise PreferenceDataError(
                                f"{where}: the prompt's token ids are not a prefix of the pair's; the tokenizer does "
                                "not split at the chat markers: use one from `python -m dataset.train_tokenizer`"
                            )
                        pair.append((seq, [IGNORE_INDEX] * start + labels[start:]))
                    if any(len(seq) > self.window for seq, _ in pair):
                        pair = [(seq[: self.window], labels[: self.window]) for seq, labels in pair]
                        unlabelled = any(all(x == IGNORE_INDEX for x in labels[1:]) for _, labels in pair)
                        if self.truncation == "drop" or unlabelled:
                            self.counts["dropped"] += 1
                            continue
                        self.counts["truncated"] += 1
                    for seq, labels in pair:
                        ids.extend(seq)
                        mask.extend(x != IGNORE_INDEX for x in labels)
                        offsets.append(len(ids))
        self.counts["pairs"] = (len(offsets) - 1) // 2
        self._buffers = (ids, mask)  # the tensors below share their memory
        self.tokens = torch.frombuffer(ids, dtype=torch.int32) if ids else torch.zeros(0, dtype=torch.int32)
        self.labelled = torch.frombuffer(mask, dtype=torch.bool) if mask else torch.zeros(0, dtype=torch.bool)
        self.offsets = offsets
        logger.info("preference data %s: %s, %d tokens", [str(f) for f in self.files], self.counts, len(ids))

    def __len__(self) -> int:
        """Number of pairs kept (all ranks together)."""
        return (len(self.offsets) - 1) // 2

    def pair(self, index: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """(ids, labels) of the chosen and of the rejected side of kept pair `index`, unpadded.

        Ids are int32 (as stored), labels int64 (-100 where not trained).
        """
        out = []
        for side in (2 * index, 2 * index + 1):
            a, b = self.offsets[side], self.offsets[side + 1]
            out.append((self.tokens[a:b], torch.where(self.labelled[a:b], self.tokens[a:b].long(), IGNORE_INDEX)))
        return out[0], out[1]

    def row(self, index: int) -> dict[str, torch.Tensor]:
        """Pair `index` as a row: tokens and labels (2, seq_len + 1) int64 [chosen, rejected], padded; pair_index ()."""
        tokens = torch.full((2, self.window), self.pad_id, dtype=torch.long)
        labels = torch.full((2, self.window), IGNORE_INDEX, dtype=torch.long)
        for side, (ids, side_labels) in enumerate(self.pair(index)):
            tokens[side, : len(ids)], labels[side, : len(ids)] = ids, side_labels
        return {"tokens": tokens, "labels": labels, "pair_index": torch.tensor(index, dtype=torch.long)}

    def next_row(
        self, epoch: int, position: int, stream: int | None = None, n_streams: int | None = None
    ) -> tuple[dict[str, torch.Tensor], int, int]:
        """The row of the pair at `position` of `epoch`'s order, and the (epoch, position) after it.

        The order is stream `stream` of `n_streams`'s (by default this rank's); the row is `row`'s.
        """
        order = self.order(epoch, stream, n_streams)
        row = self.row(order[position])
        position += 1
        if position == len(order):
            epoch, position = epoch + 1, 0
        return row, epoch, position

    @staticmethod
    def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """input_ids and targets (B, 2, seq_len) and pair_index (B,) from rows of `next_row` (or `row`)."""
        tokens = torch.stack([r["tokens"] for r in rows])  # (B, 2, seq_len + 1)
        labels = torch.stack([r["labels"] for r in rows])  # (B, 2, seq_len + 1)
        return {
            "input_ids": tokens[..., :-1].contiguous(),
            "targets": labels[..., 1:].contiguous(),
            "pair_index": torch.stack([r["pair_index"] for r in rows]),  # (B,)
        }


def build_preference_train_loader(
    dataset: PreferenceDataset,
    *,
    micro_batch: int,
    grad_accum: int,
    dp_rank: int,
    dp_size: int,
    pin_memory: bool = False,
) -> GlobalBatchLoader:
    """The training loader: the run's global stream of pairs (a row is a pair) over K streams, resumable at any layout.

    `pin_memory`: rows in page-locked memory, for asynchronous copies to a CUDA device.
    """
    return GlobalBatchLoader(
        dataset, micro_batch=micro_batch, grad_accum=grad_accum, dp_rank=dp_rank, dp_size=dp_size, pin_memory=pin_memory
    )


def build_preference_loader(dataset: PreferenceDataset, batch_size: int) -> SFTLoader:
    """This rank's own infinite iterator of `batch_size` pairs of `dataset` (`[dp_rank::dp_size]` of each epoch)."""
    return SFTLoader(dataset, batch_size)


def iter_all_pairs(
    dataset: PreferenceDataset, batch_size: int, dp_rank: int, dp_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Every pair of rank `dp_rank`'s share, `range(dp_rank, len(dataset), dp_size)`, once, in index order.

    Batches of `batch_size` pairs (the last may be shorter), collated as in training. Batch i of every rank comes
    from pairs `[i * batch_size * dp_size, (i + 1) * batch_size * dp_size)`, so ranks whose share ends earlier
    (when `len(dataset) % (batch_size * dp_size)` is between 1 and dp_size - 1) have one batch fewer.
    """
    if batch_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"batch_size={batch_size} must be >= 1 and dp_rank={dp_rank} in [0, dp_size={dp_size})")
    share = range(dp_rank, len(dataset), dp_size)
    for i in range(0, len(share), batch_size):
        yield dataset.collate([dataset.row(index) for index in share[i : i + batch_size]])
