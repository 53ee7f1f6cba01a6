"""The input side of `data.shard`: raw files -> documents, with --on-error deciding what a bad record does.

A .txt document is a paragraph (blank-line separated), a line or the whole file (--txt-mode); a .jsonl line or an
item of a .json array is a JSON object whose text field is the document and whose other keys travel in `meta`.
Files may be plain, .zst or .gz (read by `dataset.lines`: only data that passes its checksums). Positions are
(input index, line): `documents` starts after one, so an interrupted run resumes at the next document.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataset.files import FileRules, find_files
from dataset.lines import StreamFault, iter_lines

SUFFIXES = tuple(f + c for f in (".txt", ".jsonl", ".json") for c in ("", ".zst", ".gz"))
TXT_MODES = ("paragraph", "line", "file")
READ_SIZE = 1 << 20  # decompressed bytes read per step
_MAX_WARNINGS = 20
# How this tool words the reader's faults of compressed input.
_FAULTS = {
    "truncated_zstd": "truncated zstd data: the file ends inside a frame (interrupted download?)",
    "corrupt_zstd": "damaged zstd data ({})",
    "corrupt_gzip": "damaged or truncated gzip data ({})",
}


class ShardError(Exception):
    """Bad input, options or output folder; the message names the file, line or flag and what to do."""


class InputError(ShardError):
    """One bad record or unreadable file, at `path` line (or JSON array item) `line`."""

    def __init__(self, path: Path, line: int, what: str, *, unit: str = "line") -> None:
        self.path, self.line, self.what = path, line, what
        super().__init__(f"{path}, {unit} {line}: {what}")


class Unreadable(InputError):
    """A damaged compressed stream: nothing after `line` can be read from this file."""


@dataclass(frozen=True)
class InputFile:
    """One input file: its resolved path, the name documents and the manifest show, and what identifies it."""

    path: Path
    name: str
    size: int
    mtime_ns: int

    def describe(self) -> dict[str, Any]:
        """The manifest entry; name, size and mtime_ns are compared on re-runs (the path may move)."""
        return {"name": self.name, "size": self.size, "mtime_ns": self.mtime_ns, "path": str(self.path)}


class Errors:
    """--on-error: raise with a hint, or count, warn (the first few) and go on."""

    def __init__(self, mode: str) -> None:
        self.mode, self.count = mode, 0

    def __call__(self, err: ShardError) -> None:
        """Raise `err` with the --on-error hint, or count it and warn."""
        if self.mode == "raise":
            # A plain ShardError, so no `except InputError` on the way out handles it a second time.
            raise ShardError(f"{err} (fix the input, or pass --on-error skip to count and skip such input)") from err
        self.count += 1
        if self.count <= _MAX_WARNINGS:
            print(f"warning: skipped: {err}", file=sys.stderr)
        elif self.count == _MAX_WARNINGS + 1:
            print("warning: more bad input skipped; the count goes to manifest.json", file=sys.stderr)


# Inputs: directories are searched recursively; a file of another type, a missing path and a glob that matches
# nothing are bad input (--on-error); a file named twice is an error.
_INPUTS = FileRules(
    suffixes=SUFFIXES,
    error=ShardError,
    nothing="no input files: give files, directories or globs of {kinds}",
    missing="input file {item!r} does not exist (relative to {cwd})",
    no_match="input glob {item!r} matches no file (relative to {cwd})",
    unsupported="input {path}: unsupported type{hint}; supported: {suffixes}",
    directories="recursive",
    empty_dir="input directory {item!r} holds no {kinds} file",
    duplicate="input {path} is given twice (check overlapping INPUT patterns)",
    others="report",
    hints={".parquet": " (no parquet reader installed here: convert to .jsonl)"},
)


def input_files(patterns: Sequence[str | os.PathLike], exclude: Path, errors: Errors) -> list[InputFile]:
    """Files, directories and globs -> list[InputFile]; each pattern's matches sorted, files under `exclude` dropped."""
    paths = find_files(patterns, _INPUTS, exclude=exclude, report=lambda message: errors(ShardError(message)))
    found = [p.resolve() for p in paths]
    common = Path(os.path.commonpath([p.parent for p in found]))
    files = []
    for p in found:
        st = p.stat()
        files.append(InputFile(p, p.relative_to(common).as_posix(), st.st_size, st.st_mtime_ns))
    return files


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, bytes without LF/CRLF) of the verified part of one file, without a leading UTF-8 BOM."""
    n = 0
    try:
        for n, _, _, raw in iter_lines(path, block_size=READ_SIZE):
            yield n, raw
    except StreamFault as fault:  # the line that reaches into the bad frame, and everything after it, is lost
        raise Unreadable(path, n + 1, _FAULTS[fault.reason].format(fault.detail)) from fault


def _decode(raw: bytes, path: Path, n: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 4]
        raise InputError(path, n, f"invalid UTF-8 at byte {e.start} of the line ({bad!r})") from e


def _txt_documents(path: Path, start: int, mode: str, errors: Errors):
    """(first line, last line, text) of each document of a text file, from line start + 1 on."""
    lines: list[str] = []
    first = last = 0
    for n, raw in _lines(path):
        if n <= start:
            continue
        try:
            line = _decode(raw, path, n)
        except InputError as e:
            errors(e)
            continue
        blank = not line.strip()
        if mode == "line":
            if not blank:
                yield n, n, line
        elif mode == "paragraph" and blank:
            if lines:
                yield first, last, "\n".join(lines)
            lines = []
        else:
            first = first if lines else n
            lines.append(line)
            last = n
    if lines and "".join(lines).strip():
        yield first, last, "\n".join(lines)


def _json_values(path: Path, start: int, errors: Errors):
    """(line or item number, unit, parsed value) of a JSON Lines file or a JSON array file."""
    lines = _lines(path)
    head: list[tuple[int, bytes]] = []  # the lines up to the first with text, which opens a JSON array or not
    if path.name.endswith((".json", ".json.zst", ".json.gz")):
        for n, raw in lines:
            head.append((n, raw))
            if raw.strip():
                break
    lines = itertools.chain(head, lines)
    if head and head[-1][1].lstrip()[:1] == b"[":
        data = b"\n".join(raw for _, raw in lines)  # keeps the line numbers of JSON errors
        try:
            items = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            errors(InputError(path, line, f"invalid UTF-8 ({data[e.start : e.start + 4]!r}); the array is skipped"))
            return
        except json.JSONDecodeError as e:
            errors(InputError(path, e.lineno, f"invalid JSON at column {e.colno}: {e.msg}; the array is skipped"))
            return
        for i, item in enumerate(items, 1):
            if i > start:
                yield i, "item", item
        return
    for n, raw in lines:
        if n <= start or not raw.strip():
            continue
        try:
            yield n, "line", json.loads(_decode(raw, path, n))
        except InputError as e:
            errors(e)
        except json.JSONDecodeError as e:
            errors(InputError(path, n, f"invalid JSON at column {e.colno}: {e.msg}"))


def _json_documents(path: Path, start: int, field: str, errors: Errors):
    """(line, line, text, meta, other fields) of each JSON record with a string `field`."""
    for n, unit, value in _json_values(path, start, errors):
        if not isinstance(value, dict):
            errors(InputError(path, n, f"expected a JSON object, got {type(value).__name__}", unit=unit))
        elif field not in value:
            keys = ", ".join(list(value)[:12])
            what = f"no {field!r} field (keys: {keys}); choose the text field with --text-field"
            errors(InputError(path, n, what, unit=unit))
        elif not isinstance(value[field], str):
            errors(InputError(path, n, f"field {field!r} is {type(value[field]).__name__}, not a string", unit=unit))
        elif not isinstance(value.get("meta", {}), dict):
            errors(InputError(path, n, "'meta' is not a JSON object", unit=unit))
        else:
            extra = {k: v for k, v in value.items() if k not in (field, "meta")}
            yield n, n, value[field], value.get("meta", {}), extra


def _encode(text: str, inherited: list[dict], *, source: str, name: str, line: int) -> bytes:
    """One output line; inherited meta keys that collide with ours keep their value as input_<key>."""
    meta: dict[str, Any] = {"source": source, "file": name, "line": line}
    for extra in inherited:
        for key, value in extra.items():
            while key in meta and meta[key] != value:
                key = "input_" + key
            meta[key] = value
    doc = {"text": text.replace("\r\n", "\n"), "meta": meta}
    return (json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def documents(
    files: list[InputFile], start: tuple[int, int], errors: Errors, *, txt_mode: str, text_field: str, source: str
):
    """(input index, first line, last line, output line) of every document after position `start`."""
    for i in range(start[0], len(files)):
        f, skip = files[i], start[1] if i == start[0] else 0
        if f.path.name.endswith((".txt", ".txt.zst", ".txt.gz")):
            docs = ((a, b, text, []) for a, b, text in _txt_documents(f.path, skip, txt_mode, errors))
        else:
            records = _json_documents(f.path, skip, text_field, errors)
            docs = ((a, b, text, [meta, extra]) for a, b, text, meta, extra in records)
        try:
            for first, last, text, inherited in docs:
                try:
                    line = _encode(text, inherited, source=source, name=f.name, line=first)
                except UnicodeEncodeError as e:
                    what = f"unpaired surrogate {e.object[e.start]!r} (a lone \\udXXX escape), not valid UTF-8"
                    errors(InputError(f.path, first, what))
                    continue
                yield i, first, last, line
        except Unreadable as e:
            errors(e)  # --on-error skip: the rest of this file is lost, the next file goes on
