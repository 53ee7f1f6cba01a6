"""The sources of a data mixture, and which lines of which files each logical stream reads in each epoch.

A source is a set of files with a token weight. Per source and epoch the file list is put in an order fixed by
(seed, source, epoch) (`epoch_order`); `plan_units` splits that list over the streams: whole files first, the
remainder shared line by line, so that every line has exactly one reader and the shares are nearly equal.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple


@dataclass
class DataSource:
    """One source of a mixture: files (a glob, directory, path or a list of them), its token weight and a name."""

    path: str | Path | list[str | Path]
    weight: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"data source {self.name or self.path!r}: weight {self.weight} must be > 0")
        self.name = self.name or str(self.path)


class Unit(NamedTuple):
    """A part of one file that one stream reads: lines `i` (0-based) with `i % stride == phase`."""

    file: int  # index into the epoch's file order
    stride: int  # how many streams share the file (1: the whole file is this stream's)
    phase: int  # which of them this stream is


def plan_units(n_files: int, n_streams: int, stream: int) -> list[Unit]:
    """What `stream` of `n_streams` reads of `n_files` files: `(file, stride, phase)`, lines i % stride == phase.

    Each stream gets `n_files // n_streams` whole files; the remaining `n_files % n_streams` files are shared line
    by line, so every stream has nearly the same amount of data and every line one reader.
    """
    whole, rest = divmod(n_files, n_streams)
    units = [Unit(f, 1, 0) for f in range(stream, whole * n_streams, n_streams)]
    if rest:
        share = stream % rest
        units.append(Unit(whole * n_streams + share, len(range(share, n_streams, rest)), stream // rest))
    return units


def epoch_order(n_files: int, *, seed: int, source: int, epoch: int, shuffle: bool) -> list[int]:
    """The order of a source's files in one epoch: a permutation fixed by (seed, source, epoch), or sorted."""
    order = list(range(n_files))
    if shuffle:
        random.Random(f"{seed}/{source}/{epoch}").shuffle(order)  # str seeds hash the same in every process
    return order
