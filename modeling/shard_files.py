"""Shard files (`<prefix>-<axis>NN-of-NN.safetensors`, one per rank of a tensor or expert group), sliced on read.

A rank at tensor degree tp holds rows [r * L, (r + 1) * L) of each split tensor along its split dimension, L =
padded_size(n, tp) / tp (parallel.layers.tp_chunk: the vocabulary padded with zero rows), and expert rank e the
experts [e * E / ep, (e + 1) * E / ep). The files of a set hold consecutive runs of the real rows; ShardReader
reads, from each file whose run meets the wanted rows, only those rows (safetensors' `get_slice`: a view of the
memory-mapped file, whose pages are read when the rows are copied into the rank's tensor), and opens each file only
for the read, so that neither whole files nor whole tensors pass through the host memory of a rank that needs a
slice of them, whatever degree wrote the files. The kinds of file are named here (model, experts, optimizer
state); modeling.native_format writes them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modeling.config import CheckpointError
from parallel.layers import padded_size


@dataclass(frozen=True)
class ShardSet:
    """One kind of shard file, `<prefix>-<axis>NN-of-NN.safetensors`, one file per rank of the `axis` group.

    Each file's metadata holds `format`, `<axis>_rank`, `<axis>_size` and `split_dims` (tensor name -> the dimension
    it is split along, None = replicated: read from the first file only). `error` is the exception an incomplete
    set raises, `label` how its message names the files.
    """

    prefix: str  # "model", "experts", "adapter"
    axis: str  # "tp" or "ep"
    format: str  # the metadata's "format" value
    error: type[ValueError] = CheckpointError
    label: str = "shards"

    @property
    def pattern(self) -> str:
        """The file name as the user reads it in messages: model-tpNN-of-NN.safetensors."""
        return f"{self.prefix}-{self.axis}NN-of-NN.safetensors"

    @property
    def regex(self) -> re.Pattern:
        """Matches a shard file name; group 1 is the rank, group 2 the degree."""
        return re.compile(rf"^{self.prefix}-{self.axis}(\d+)-of-(\d+)\.safetensors$")

    def file_name(self, rank: int, size: int) -> str:
        """File name of one rank's shard."""
        return f"{self.prefix}-{self.axis}{rank:02d}-of-{size:02d}.safetensors"

    def write(
        self, tensors: dict[str, torch.Tensor], dims: dict[str, int | None], out_dir: Path, rank: int, size: int
    ) -> None:
        """Write one rank's safetensors file, its metadata recording rank, degree and each tensor's split dim."""
        meta = {
            "format": self.format,
            f"{self.axis}_rank": str(rank),
            f"{self.axis}_size": str(size),
            "split_dims": json.dumps(dims),
        }
        save_file(tensors, str(out_dir / self.file_name(rank, size)), metadata=meta)

    def files(self, directory: Path) -> list[Path]:
        """This kind's shard files in `directory`, sorted by name (by rank: ranks are zero-padded)."""
        pattern = f"{self.prefix}-{self.axis}*-of-*.safetensors"
        return sorted(p for p in directory.glob(pattern) if self.regex.search(p.name))

    def complete_set(self, directory: Path) -> list[Path]:
        """The shard files, raising `error` unless they are exactly one set of one degree."""
        files = self.files(directory)
        sizes = {int(self.regex.search(p.name).group(2)) for p in files}
        if len(sizes) != 1 or len(files) != next(iter(sizes)):
            raise self.error(
                f"{directory}: {self.label} {[p.name for p in files]} do not form one complete set; remove stale "
                f"shards of another {self.axis} degree"
            )
        return files

    def read(self, directory: Path) -> dict[str, torch.Tensor]:
        """The full tensors of the complete set in `directory`: split ones concatenated along their split dim."""
        handles = [safe_open(str(p), framework="pt") for p in self.complete_set(directory)]
        dims = json.loads(handles[0].metadata()["split_dims"])
        merged = {}
        for name, dim in dims.items():
            parts = [h.get_tensor(name) for h in handles] if dim is not None else [handles[0].get_tensor(name)]
            merged[name] = torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]
        return merged


MODEL_SHARDS = ShardSet("model", "tp", "llama-tp")
EXPERT_SHARDS = ShardSet("experts", "ep", "llama-ep")
# an optimizer's per-parameter state ("<name>.exp_avg", ...), split like its parameter
OPTIMIZER_SHARDS = ShardSet("optimizer", "tp", "llama-tp-optimizer")
OPTIMIZER_EXPERT_SHARDS = ShardSet("optimizer-experts", "ep", "llama-ep-optimizer")


@dataclass(frozen=True)
class _Entry:
    """Where one tensor lives: its set's files, the dimension they split it along, each file's length along it.

    dim None: replicated, each file holds the whole tensor.
    """

    shard_set: ShardSet
    files: tuple[Path, ...]
    dim: int | None
    lengths: tuple[int, ...]
    shape: tuple[int, ...]  # the first file's shape


class ShardReader:
    """The tensors of a directory's `model_set` files (and `expert_set` files, if any), read slice by slice.

    Only the headers are read on construction: each set must be one complete set of one degree
    (ShardSet.complete_set), its files must carry the set's format and agree on the tensors they hold.
    """

    def __init__(
        self, directory: str | Path, model_set: ShardSet = MODEL_SHARDS, expert_set: ShardSet = EXPERT_SHARDS
    ) -> None:
        self.directory = Path(directory)
        self._entries: dict[str, _Entry] = {}
        sets = [model_set] + ([expert_set] if expert_set.files(self.directory) else [])
        for shard_set in sets:
            files = tuple(shard_set.complete_set(self.directory))
            for name, entry in self._scan(shard_set, files).items():
                if name in self._entries:
                    raise shard_set.error(
                        f"{self.directory}: tensor {name} is in both the {self._entries[name].shard_set.pattern} and "
                        f"the {shard_set.pattern} files; remove the stale ones"
                    )
                self._entries[name] = entry

    def _scan(self, shard_set: ShardSet, files: tuple[Path, ...]) -> dict[str, _Entry]:
        """Each tensor's entry, from the files' headers; raises shard_set.error on a file that disagrees."""
        dims: dict[str, int | None] = {}
        shapes: list[dict[str, list[int]]] = []
        for rank, path in enumerate(files):
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != shard_set.format or meta.get(f"{shard_set.axis}_rank") != str(rank):
                    raise shard_set.error(
                        f"{path}: its metadata says format {meta.get('format')!r}, {shard_set.axis} rank "
                        f"{meta.get(f'{shard_set.axis}_rank')!r}; expected {shard_set.format!r}, rank {rank}: the "
                        f"file is not a {shard_set.pattern} shard, remove or replace it"
                    )
                file_dims = json.loads(meta["split_dims"])
                if rank == 0:
                    dims = file_dims
                if file_dims != dims or set(f.keys()) != set(dims):
                    raise shard_set.error(
                        f"{path}: holds other tensors or split dimensions than {files[0].name}; the {shard_set.label} "
                        f"are not one set, write the checkpoint again"
                    )
                shapes.append({name: f.get_slice(name).get_shape() for name in dims})
        return {
            name: _Entry(
                shard_set,
                files,
                dim,
                tuple(s[name][dim] for s in shapes) if dim is not None else (),
                tuple(shapes[0][name]),
            )
            for name, dim in dims.items()
        }

    def keys(self) -> set[str]:
        """The names of every tensor the files hold."""
        return set(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        """The full (saved, unpadded) shape of tensor `key`, from the headers."""
        entry = self._entry(key)
        if entry.dim is None:
            return entry.shape
        return (*entry.shape[: entry.dim], sum(entry.lengths), *entry.shape[entry.dim + 1 :])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's full shape."""
        return {key: self.shape(key) for key in self._entries}

    def _entry(self, key: str) -> _Entry:
        if key not in self._entries:
            raise CheckpointError(
                f"{self.directory}: no tensor {key} in its shard files (they hold {len(self._entries)} tensors, e.g. "
                f"{sorted(self._entries)[:4]}); was the checkpoint written for another model?"
            )
        return self._entries[key]

    def read(self, key: str, *, tp_rank: int, tp_size: int, ep_rank: int = 0, ep_size: int = 1) -> torch.Tensor:
        """This rank's shard of tensor `key` as the model holds it: padded rows included (parallel.layers.tp_chunk).

        A tensor of the tensor set is cut by (tp_rank, tp_size), one of the expert set by (ep_rank, ep_size);
        a replicated one is read whole from the first file.
        """
        entry = self._entry(key)
        if entry.dim is None:
            with safe_open(str(entry.files[0]), framework="pt") as f:
                return f.get_tensor(key)
        dim, n = entry.dim, sum(entry.lengths)
        rank, size = (tp_rank, tp_size) if entry.shard_set.axis == "tp" else (ep_rank, ep_size)
        if not 0 <= rank < size:
            raise ValueError(f"read({key!r}): rank {rank} is not in 0..{size - 1}")
        if entry.shard_set.axis == "tp":
            local = padded_size(n, size) // size  # the last ranks' rows may be padding
        elif n % size:
            raise CheckpointError(
                f"{self.directory}: tensor {key} holds {n} experts, which ep={size} does not divide; choose "
                f"parallel.ep dividing {n}"
            )
        else:
            local = n // size
        start = min(rank * local, n)
        stop = min(start + local, n)
        pieces, offset = [], 0
        for path, length in zip(entry.files, entry.lengths, strict=True):
            lo, hi = max(start, offset), min(stop, offset + length)
            if lo < hi:
                pieces.append(_read_rows(path, key, dim, lo - offset, hi - offset))
            offset += length
        if not pieces:  # a rank whose rows are all padding (a small vocabulary over many ranks)
            pieces.append(_read_rows(entry.files[0], key, dim, 0, 0))
        chunk = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)
        missing = local - chunk.shape[dim]
        if missing:  # zero rows past the real vocabulary, as tp_chunk pads
            zeros = chunk.new_zeros((*chunk.shape[:dim], missing, *chunk.shape[dim + 1 :]))
            chunk = torch.cat([chunk, zeros], dim=dim)
        return chunk.contiguous()


def _read_rows(path: Path, key: str, dim: int, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) along `dim` of tensor `key` in one file: only those bytes are copied out of the mapping."""
    with safe_open(str(path), framework="pt") as f:
        return f.get_slice(key)[(slice(None),) * dim + (slice(lo, hi),)]
