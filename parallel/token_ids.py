"""Token ids against the vocabulary: TokenIdError for an id the model has no row for, read once per training step.

The ids are checked where they enter the model: the embedding's inputs and the loss's targets. Without the check an
out-of-range target is masked and clamped by the vocab-parallel loss (a silently wrong loss), an out-of-range input id
embeds as a zero vector at tp > 1, and on a GPU an index out of range is a device-side assert that ends the process
without saying which id.

Raising needs the ids' range on the host, and on a GPU a read waits for every kernel queued before it. Outside a
training step (generation, evaluation, a notebook) `check_token_ids` reads at once: one `tolist` a call. A training
step runs inside `DeferredTokenIdChecks`: each call keeps its (min, max) and verdict on the device and returns ids
made safe to index with, and the step reads every check with its other values in its one read
(training.distributed.step_values), raising before the optimizer step. The ranks of a tensor group hold the same full
ids, so they raise together; under the deferral every other rank raises too, told that another rank's ids were bad.
"""

from __future__ import annotations

import torch


class TokenIdError(ValueError):
    """A token id (model input or loss target) outside the model's vocabulary."""


_deferred: DeferredTokenIdChecks | None = None  # the active deferral (its `with` block), else None: read at once


def check_token_ids(ids: torch.Tensor, vocab_size: int, what: str, *, ignore_index: int | None = None) -> torch.Tensor:
    """`ids`, after checking that every id is in [0, vocab_size) or equals `ignore_index`; else TokenIdError.

    Inside a DeferredTokenIdChecks nothing is read: the check is recorded and the ids come back with every
    out-of-range id replaced (by `ignore_index` where there is one, else clamped into the vocabulary), so that the
    embedding or loss computes the rest of the step without an out-of-range index before the step raises.
    """
    if ids.numel() == 0:
        return ids
    checked = ids if ignore_index is None else ids.masked_fill(ids == ignore_index, 0)  # ignored ids are in range
    lo, hi = torch.aminmax(checked)
    if _deferred is not None:
        _deferred.record(lo, hi, vocab_size, what, ignore_index)
        if ignore_index is None:
            return ids.clamp(0, vocab_size - 1)
        return torch.where((ids >= 0) & (ids < vocab_size), ids, ignore_index)
    lo, hi = torch.stack([lo, hi]).tolist()  # the read: free on the CPU, a wait for the queue on a GPU
    _raise_outside(lo, hi, vocab_size, what, ignore_index)
    return ids


def _raise_outside(lo: float, hi: float, vocab_size: int, what: str, ignore_index: int | None) -> None:
    """TokenIdError naming the first id of [lo, hi] outside [0, vocab_size); nothing when both are inside."""
    if lo >= 0 and hi < vocab_size:
        return
    bad = int(lo if lo < 0 else hi)
    ignored = f" and is not the ignore index {ignore_index}" if ignore_index is not None else ""
    raise TokenIdError(
        f"{what} id {bad} is outside the vocabulary [0, {vocab_size}){ignored}: the tokenizer or the data produces "
        f"ids this model has no row for; use the tokenizer the model was built for, or a model whose vocab_size "
        f"covers every id"
    )


class DeferredTokenIdChecks:
    """`with` block whose check_token_ids calls keep their results on the device, for one read at its end.

    with DeferredTokenIdChecks() as ids:
        ...forward and backward of the step's micro-batches...
    flag, ranges = ids.values(device)  # on the device; the flag all-reduced (MAX), both read with the step's values
    ids.raise_if_bad(ranges.tolist(), anywhere=flag.item() > 0)
    """

    def __init__(self) -> None:
        self._rows: list[torch.Tensor] = []  # per check (3,) int64: min, max, 1 if outside the vocabulary
        self._checks: list[tuple[int, str, int | None]] = []  # per check: vocab_size, what, ignore_index
        self._outer: DeferredTokenIdChecks | None = None

    def __enter__(self) -> DeferredTokenIdChecks:
        global _deferred
        self._outer, _deferred = _deferred, self
        return self

    def __exit__(self, *exc) -> None:
        global _deferred
        _deferred = self._outer

    def record(self, lo: torch.Tensor, hi: torch.Tensor, vocab_size: int, what: str, ignore_index: int | None) -> None:
        """Keep one check's range and verdict on the device (check_token_ids calls it)."""
        self._rows.append(torch.stack([lo, hi, ((lo < 0) | (hi >= vocab_size)).long()]))  # (3,)
        self._checks.append((vocab_size, what, ignore_index))

    def values(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(1,) float64 flag, 1 where a check failed; (2 * checks,) float64 min and max of each check, in order."""
        if not self._rows:  # no check on this rank (a middle pipeline stage): a zero flag, no ranges
            zero = torch.zeros(1, dtype=torch.float64, device=device)
            return zero, zero[:0]
        rows = torch.stack(self._rows).double()  # (checks, 3); ids beyond 2**53 round, still outside the vocabulary
        return rows[:, 2].amax().reshape(1), rows[:, :2].reshape(-1)

    def raise_if_bad(self, ranges: list[float], *, anywhere: bool) -> None:
        """TokenIdError for this rank's first failed check (`ranges`: values()'s second, read).

        If only another rank's failed (`anywhere`: the flag's max over the ranks), a TokenIdError that says so.
        """
        for (vocab_size, what, ignore_index), lo, hi in zip(self._checks, ranges[::2], ranges[1::2], strict=True):
            _raise_outside(lo, hi, vocab_size, what, ignore_index)
        if anywhere:
            raise TokenIdError(
                "another rank read a token id outside the vocabulary (its error names the id): the tokenizer or the "
                "data produces ids this model has no row for"
            )
