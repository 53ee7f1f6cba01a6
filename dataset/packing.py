"""Pure functions that pack a token stream into training windows.

Documents are concatenated into one stream (each as `[BOS] tokens [EOS]`, as configured) and cut into windows of
`seq_len + 1` tokens that overlap by one token, as Megatron does: window k covers stream positions
`[k * seq_len, (k + 1) * seq_len]`, its first `seq_len` tokens are the input and its last `seq_len` the targets, so
every token after the first is predicted exactly once and concatenating the input rows gives back the stream.

Document ids index the documents inside one row (0 for the document the row starts in, +1 at each document start,
i.e. after each EOS), so a document-aware attention mask lets a token attend only to its own document.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100  # target of a padded position: the loss skips it


def cut_windows(
    buffer: Sequence[int], start: int, seq_len: int, limit: int | None = None
) -> tuple[list[list[int]], int]:
    """Every whole window of `seq_len + 1` tokens in `buffer[start:]` (at most `limit`), and the new start.

    Consecutive windows overlap by one token, so the new start is `start + seq_len * len(windows)`.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}: must be at least 1")
    windows = []
    while len(buffer) - start >= seq_len + 1 and (limit is None or len(windows) < limit):
        windows.append(list(buffer[start : start + seq_len + 1]))
        start += seq_len
    return windows, start


def boundaries_in_window(doc_starts: Sequence[int], start: int, seq_len: int) -> list[int]:
    """Positions (relative to the window at `start`) where a document starts inside the input part of the window.

    `doc_starts` are stream positions where documents begin; a start at the window's first position changes nothing
    (the row's first document has id 0 either way), so only positions 1..seq_len-1 are returned.
    """
    return [s - start for s in doc_starts if start < s < start + seq_len]


def document_ids(boundaries: Sequence[int], length: int) -> list[int]:
    """Document index of each of `length` positions, +1 at every position in `boundaries`."""
    ids, doc, b = [], 0, sorted(boundaries)
    k = 0
    for i in range(length):
        while k < len(b) and b[k] == i:
            doc, k = doc + 1, k + 1
        ids.append(doc)
    return ids


def pad_window(tokens: Sequence[int], seq_len: int, pad_id: int) -> list[int]:
    """`tokens` (at most `seq_len + 1`) padded with `pad_id` to a full window (the last window of a finite pass)."""
    if len(tokens) > seq_len + 1:
        raise ValueError(f"{len(tokens)} tokens do not fit a window of {seq_len + 1}")
    return list(tokens) + [pad_id] * (seq_len + 1 - len(tokens))


def make_batch(
    windows: Sequence[Sequence[int]],
    *,
    real_lengths: Sequence[int] | None = None,
    boundaries: Sequence[Sequence[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """A training batch from full windows of `seq_len + 1` ids.

    Args:
        windows: B windows of `seq_len + 1` token ids.
        real_lengths: tokens of each window that are data (the rest is padding); targets past them are IGNORE_INDEX.
        boundaries: per window, the positions where a document starts (see `boundaries_in_window`); when given, the
            batch has `document_ids`.

    Returns:
        `input_ids` and `targets`, LongTensors (B, seq_len) (window[:-1] and window[1:]), and `document_ids`.
    """
    w = torch.tensor(windows, dtype=torch.long)  # (B, seq_len + 1)
    if w.ndim != 2 or w.shape[1] < 2:
        raise ValueError(f"windows must be B lists of seq_len + 1 >= 2 ids, got shape {tuple(w.shape)}")
    batch = {"input_ids": w[:, :-1].contiguous(), "targets": w[:, 1:].contiguous()}  # (B, seq_len) each
    if real_lengths is not None:
        positions = torch.arange(w.shape[1] - 1)  # (seq_len,)
        # Input position i predicts token i + 1, which is data only when i + 1 < real length.
        pad = positions[None, :] >= torch.tensor(real_lengths)[:, None] - 1  # (B, seq_len)
        batch["targets"][pad] = IGNORE_INDEX
    if boundaries is not None:
        ids = [document_ids(b, w.shape[1] - 1) for b in boundaries]
        batch["document_ids"] = torch.tensor(ids, dtype=torch.long)  # (B, seq_len)
    return batch
