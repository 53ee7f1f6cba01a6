"""Documents of `.jsonl.zst`, `.jsonl`, `.txt.zst` and `.txt` files, and the data files a path or glob names.

Lines come from `dataset.lines`, which decodes zstd incrementally in bounded memory and reads only whole frames that
pass their checksums. A line of a `.jsonl` file is one JSON object whose `text_field` holds the document; a line of
a `.txt` file is one document. Line numbers are 1-based and offsets count bytes of the decompressed stream, so
`path:line` in an error points at the line to look at, and `(line, offset)` is a position a resumed reader can
start from.

    for text in iter_texts("shards/part-00000.jsonl.zst"):
        ...
    for line, text in iter_records(path, start_line=1201, start_offset=3_450_112):   # resume
        ...

`resolve_paths` names the data files to read (`dataset.files.find_files` under the data loader's rules).
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from dataset.files import FileRules, find_files
from dataset.lines import DataError, StreamFault, iter_lines

FORMATS = {".jsonl": "jsonl", ".jsonl.zst": "jsonl", ".txt": "txt", ".txt.zst": "txt"}
ON_ERROR = ("raise", "skip")
# Reasons a line or a file yields no document. Only the first two are normal content; the rest are errors
# (raised with on_error="raise", counted and warned about with on_error="skip").
NOT_ERRORS = ("blank_line", "empty_text")
WARN_LIMIT = 10  # skips warned about per file; later ones are only counted


class DataWarning(UserWarning):
    """A bad line or file that was skipped because on_error="skip"."""


class Document(NamedTuple):
    """One document: its 1-based line number, its text, and the byte offsets where its line starts and ends."""

    line: int
    text: str
    offset: int  # decompressed byte offset of the line's first byte
    end: int  # decompressed byte offset just past the line's newline: where the next line starts


class _BadLine(Exception):
    """Internal: one line that yields no document, with a skip reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def file_format(path: str | Path) -> str | None:
    """`"jsonl"` or `"txt"` for a supported file name, else None."""
    name = str(path)
    for suffix, fmt in FORMATS.items():
        if name.endswith(suffix):
            return fmt
    return None


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}: use one of {', '.join(ON_ERROR)}")


def parse_line(raw: bytes, fmt: str, text_field: str) -> str:
    """The document text of one raw line of a `fmt` ("jsonl" or "txt") file; raises _BadLine with a reason."""
    if not raw.strip():
        raise _BadLine("blank_line", "blank line")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadLine("invalid_utf8", f"invalid UTF-8 at byte {e.start} of the line ({e.reason})") from None
    if fmt == "txt":
        return line
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _BadLine("invalid_json", f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or text_field not in obj:
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise _BadLine(
            "missing_field",
            f"no {text_field!r} field (found {keys}); set text_field (data.text_field) to the key holding the text",
        )
    text = obj[text_field]
    if not isinstance(text, str):
        raise _BadLine("missing_field", f"field {text_field!r} is {type(text).__name__}, not a string")
    if not text:
        raise _BadLine("empty_text", f"field {text_field!r} is empty")
    return text


def iter_documents(
    path: str | Path,
    *,
    text_field: str = "text",
    on_error: str = "raise",
    start_line: int = 1,
    start_offset: int | None = None,
    stride: int = 1,
    phase: int = 0,
    skipped: Counter | None = None,
) -> Iterator[Document]:
    """Yield the `Document`s of one file, from a position on, optionally only every `stride`-th line.

    Args:
        path: a `.jsonl[.zst]` or `.txt[.zst]` file.
        text_field: the JSON key holding the text (jsonl only).
        on_error: "raise" stops at the first bad line or file with a DataError naming file and line; "skip" counts
            it in `skipped` under its reason, warns (DataWarning, the first few per file) and goes on. Blank lines
            and empty texts are never errors: they are only counted.
        start_line: first line to read (1-based); see `iter_lines` for `start_offset`.
        start_offset: decompressed byte offset where `start_line` begins, or None to scan up to it.
        stride: keep only lines whose 0-based index i has `i % stride == phase` (how readers share one file).
        phase: see `stride`.
        skipped: a Counter to add skip counts to (reason -> lines or files).

    Raises:
        DataError: bad data with on_error="raise", or a missing file / bad resume position in any mode.
    """
    _check_on_error(on_error)
    path = Path(path)
    fmt = file_format(path)
    if fmt is None:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(FORMATS)}")
    skipped = Counter() if skipped is None else skipped
    warned = 0

    def skip(reason: str, message: str) -> None:
        nonlocal warned
        if reason not in NOT_ERRORS and on_error == "raise":
            raise DataError(f"{message}; fix the data or set on_error=skip (data.on_error) to count and skip it")
        skipped[reason] += 1
        if reason not in NOT_ERRORS and warned < WARN_LIMIT:
            warned += 1
            more = " (further skips in this file are counted, not shown)" if warned == WARN_LIMIT else ""
            warnings.warn(f"skipped: {message}{more}", DataWarning, stacklevel=3)

    content = start_offset not in (None, 0) or start_line > 1  # lines before the start had content
    line_no = start_line - 1
    try:
        for line_no, offset, end, raw in iter_lines(path, start_line=start_line, start_offset=start_offset):
            if not content and raw.strip():
                content = True
            if (line_no - 1) % stride != phase:
                continue
            try:
                text = parse_line(raw, fmt, text_field)
            except _BadLine as bad:
                skip(bad.reason, f"{path}:{line_no}: {bad}")
                continue
            yield Document(line_no, text, offset, end)
    except StreamFault as fault:
        # Lines before the fault were whole and are kept; nothing after it can be decoded. Readers that share the
        # file by stride all stop here; phase 0 counts the fault, so a skipped file is counted once.
        if phase == 0 or on_error == "raise":
            skip(fault.reason, f"{fault} after line {line_no}, the rest of the file is unreadable")
        return
    if not content and phase == 0:
        skip("empty_file", f"{path}: empty shard (no documents)")


def iter_records(
    path: str | Path,
    *,
    text_field: str = "text",
    on_error: str = "raise",
    start_line: int = 1,
    start_offset: int | None = None,
    skipped: Counter | None = None,
) -> Iterator[tuple[int, str]]:
    """Yield `(line_number, text)` of each document of a file, from `start_line` (at `start_offset`) on."""
    for doc in iter_documents(
        path,
        text_field=text_field,
        on_error=on_error,
        start_line=start_line,
        start_offset=start_offset,
        skipped=skipped,
    ):
        yield doc.line, doc.text


def iter_texts(
    path: str | Path, *, text_field: str = "text", on_error: str = "raise", skipped: Counter | None = None
) -> Iterator[str]:
    """Yield the text of each document of a `.jsonl[.zst]` or `.txt[.zst]` file, in file order."""
    for doc in iter_documents(path, text_field=text_field, on_error=on_error, skipped=skipped):
        yield doc.text


# The data loader's files: data files only, anything else in a directory or glob (a manifest.json) passed over.
DATA_FILES = FileRules(
    suffixes=tuple(FORMATS),
    error=DataError,
    nothing="no {kinds} file in {items}; check the data path (data config or --data)",
    missing="{item}: no such file or directory",
    no_match="glob {item!r} matches no {kinds} file",
    empty_dir="directory {item} holds no {kinds} file",
    unsupported="{item}: unsupported file type; use one of {suffixes}",
    duplicate="{path}: named twice (by {first!r} and {item!r}); give each file once",
)


def resolve_paths(spec, *, on_error: str = "raise", skipped: Counter | None = None) -> list[Path]:
    """The data files named by `spec`: a file, a directory (its data files), a glob, or a list of these.

    Files of other types in a directory or glob (a `manifest.json` beside the shards) are ignored. A glob or
    directory with no data file, or a missing path, is a DataError, or with on_error="skip" a warning counted as
    `no_match` in `skipped`; no file at all is always an error, and so is a file named twice.
    """
    _check_on_error(on_error)
    skipped = Counter() if skipped is None else skipped

    def report(message: str) -> None:
        if on_error == "raise":
            raise DataError(f"{message}; check the data path (data config or --data)")
        skipped["no_match"] += 1
        warnings.warn(f"skipped: {message}", DataWarning, stacklevel=5)  # at the caller of resolve_paths

    return find_files(spec, DATA_FILES, report=report)
