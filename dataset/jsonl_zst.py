"""Read documents from `.jsonl.zst`, `.jsonl`, `.txt.zst` and `.txt` files line by line, in bounded memory.

zstd is decoded incrementally: the decompressor hands out blocks of at most 64 KiB, which are split into lines, so
memory holds the zstd window, one block and the current line, and does not grow with the file. Several frames are
decoded one after another. Only whole frames that decode (and match their checksum, when written with one: the
`zstd` CLI default) are read: a first pass decodes each frame and drops the output, and the reading pass stops
before the first corrupt or truncated frame, then reports it. A cut that falls exactly between two frames cannot be
seen from the file alone.

A line of a `.jsonl` file is one JSON object whose `text_field` holds the document; a line of a `.txt` file is
one document (a trailing CR of CRLF files is dropped; so is a UTF-8 byte order mark that starts a file). Line
numbers are 1-based and offsets count bytes of the decompressed stream, so `path:line` in an error points at the
line to look at, and `(line, offset)` is a position a resumed reader can start from.

    for text in iter_texts("shards/part-00000.jsonl.zst"):
        ...
    for line, text in iter_records(path, start_line=1201, start_offset=3_450_112):   # resume
        ...
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import zstandard

FORMATS = {".jsonl": "jsonl", ".jsonl.zst": "jsonl", ".txt": "txt", ".txt.zst": "txt"}
ON_ERROR = ("raise", "skip")
# Reasons a line or a file yields no document. Only the first two are normal content; the rest are errors
# (raised with on_error="raise", counted and warned about with on_error="skip").
NOT_ERRORS = ("blank_line", "empty_text")
BLOCK_SIZE = 1 << 16  # decompressed bytes read per step
ZSTD_MAGIC, SKIPPABLE_MAGIC = 0xFD2FB528, 0x184D2A50
WARN_LIMIT = 10  # skips warned about per file; later ones are only counted
UTF8_BOM = b"\xef\xbb\xbf"  # dropped at the start of a file (json.loads refuses it, a text would keep it)


class DataError(ValueError):
    """Bad input data; the message names the file and line (one string argument, so DataLoader workers re-raise it)."""


class DataWarning(UserWarning):
    """A bad line or file that was skipped because on_error="skip"."""


class Document(NamedTuple):
    """One document: its 1-based line number, its text, and the byte offsets where its line starts and ends."""

    line: int
    text: str
    offset: int  # decompressed byte offset of the line's first byte
    end: int  # decompressed byte offset just past the line's newline: where the next line starts


class _StreamFault(DataError):
    """Internal: corrupt or truncated zstd data; `reason` is the skip counter it goes to."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


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


def _frame_end(f, pos: int, size: int, path: Path) -> int | None:
    """Compressed end of the zstd frame at byte `pos`, from its headers alone (None: the file ends inside it).

    Layout (RFC 8878): magic, frame header, blocks (3-byte header: last flag, type, size; an RLE block stores one
    byte), then a 4-byte checksum when the header says so. Skippable frames give their length after the magic.
    """
    f.seek(pos)
    head = f.read(18)  # magic + the longest frame header
    magic = int.from_bytes(head[:4], "little")
    if len(head) >= 8 and SKIPPABLE_MAGIC <= magic <= SKIPPABLE_MAGIC + 15:
        end = pos + 8 + int.from_bytes(head[4:8], "little")
        return end if end <= size else None
    if magic != ZSTD_MAGIC:
        raise _StreamFault("corrupt_zstd", f"{path}: corrupt zstd data (no zstd frame at byte {pos})")
    try:
        block = pos + zstandard.frame_header_size(head)
    except zstandard.ZstdError:
        return None
    last = False
    while not last:
        f.seek(block)
        header = int.from_bytes(f.read(3).ljust(3, b"\xff"), "little")  # a short read reads as "too long"
        last, kind, length = header & 1, (header >> 1) & 3, header >> 3
        block += 3 + (1 if kind == 1 else length)
        if block > size:
            return None
    end = block + (4 if head[4] & 0x04 else 0)
    return end if end <= size else None


def decompressed_size(path: str | Path) -> int | None:
    """Bytes `path` decompresses to, from its zstd frame headers alone (its size if not .zst); None when unknown.

    shard.py and the `zstd` CLI write each frame's content size; a frame written as a stream may lack it, and a
    truncated or corrupt file has no size either (reading it reports why).
    """
    path = Path(path)
    size = path.stat().st_size
    if not path.name.endswith(".zst"):
        return size
    total = pos = 0
    with open(path, "rb") as f:
        while pos < size:
            try:
                end = _frame_end(f, pos, size, path)
            except _StreamFault:
                return None
            if end is None:
                return None
            f.seek(pos)
            head = f.read(18)
            if int.from_bytes(head[:4], "little") == ZSTD_MAGIC:  # skippable frames hold no content
                content = zstandard.frame_content_size(head)
                if content < 0:
                    return None
                total += content
            pos = end
    return total


class _Slice:
    """The next `n` bytes of a file, as a readable file (the decoder reads ahead; this keeps it inside one frame)."""

    def __init__(self, f, n: int) -> None:
        self.f, self.left = f, n

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes, never past the slice."""
        size = self.left if size < 0 else min(size, self.left)
        data = self.f.read(size)
        self.left -= len(data)
        return data


def _zstd_verified_length(f, path: Path) -> tuple[int, _StreamFault | None]:
    """Decompressed length of the leading whole frames that decode and verify, and the fault after them, if any.

    zstd checks a frame's checksum only at its end, after handing out its data, so each frame is decoded once here
    and its output dropped: the reading pass then stops before the first bad frame and no byte of a corrupt or
    truncated frame ever reaches a document. Decoding runs near 1 GB/s, so the extra pass costs little next to
    tokenization.
    """
    size = os.fstat(f.fileno()).st_size
    dctx = zstandard.ZstdDecompressor()
    pos = good = 0
    while pos < size:
        end = _frame_end(f, pos, size, path)
        if end is None:
            return good, _StreamFault("truncated_zstd", f"{path}: truncated zstd stream (frame at byte {pos} is cut)")
        f.seek(pos)
        reader = dctx.stream_reader(_Slice(f, end - pos), closefd=False)
        n = 0
        try:
            while block := reader.read(BLOCK_SIZE):
                n += len(block)
        except zstandard.ZstdError as e:
            return good, _StreamFault("corrupt_zstd", f"{path}: corrupt zstd data in the frame at byte {pos} ({e})")
        good, pos = good + n, end
    return good, None


def _zstd_blocks(f, path: Path, block_size: int) -> Iterator[bytes]:
    """Decompressed blocks (at most `block_size` bytes) of the good frames of a zstd file, then its fault if any."""
    length, fault = _zstd_verified_length(f, path)
    f.seek(0)
    reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True, closefd=False)
    while length > 0 and (block := reader.read(min(block_size, length))):
        length -= len(block)
        yield block
    if fault is not None:
        raise fault


def _blocks(path: Path, start_offset: int, block_size: int) -> Iterator[bytes]:
    """Decompressed bytes of `path` from `start_offset` on, in blocks."""
    with open(path, "rb") as f:
        if not str(path).endswith(".zst"):
            f.seek(start_offset)
            while block := f.read(block_size):
                yield block
            return
        to_drop = start_offset  # zstd cannot seek: decode and drop (fast next to tokenization)
        for block in _zstd_blocks(f, path, block_size):
            if to_drop >= len(block):
                to_drop -= len(block)
                continue
            yield block[to_drop:] if to_drop else block
            to_drop = 0


def iter_lines(
    path: str | Path, *, start_line: int = 1, start_offset: int | None = None, block_size: int = BLOCK_SIZE
) -> Iterator[tuple[int, int, int, bytes]]:
    """Yield `(line_number, offset, end, raw_line)` of a file; raw lines lack their newline (LF or CRLF).

    `offset` is the decompressed byte offset where the line starts and `end` where the next one starts.

    Args:
        path: a `.jsonl[.zst]` or `.txt[.zst]` file.
        start_line: number of the first line to yield (1-based).
        start_offset: decompressed byte offset where `start_line` begins, as recorded from `offset` or `end`; the
            reader then starts there without scanning earlier lines (plain files seek; zstd decodes and drops).
            When None, lines before `start_line` are read and dropped.
        block_size: bytes read per step.

    Raises:
        DataError: the file is missing, its zstd data is corrupt or truncated, or `start_offset` is not the start
            of a line (the file changed since the position was recorded).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if start_line < 1:
        raise ValueError(f"start_line={start_line}: line numbers start at 1")
    line_no, drop_lines = start_line, 0
    if start_offset is None:
        line_no, drop_lines, start_offset = 1, start_line - 1, 0
    moved = (
        f"{path}: byte offset {start_offset} (line {start_line}) does not start a line; the file changed since this "
        "position was recorded: restore it, or start without the saved state"
    )
    # From an offset, read one byte early: it must be the newline that ends the previous line (or the file's last
    # byte, when the last line has no newline and the position is the end of the file).
    offset = start_offset - 1 if start_offset > 0 else 0
    check: bytes | None = None  # that early byte, until the next byte shows whether it was really a line end
    parts: list[bytes] = []  # pieces of the current line (a line may span several blocks)
    for block in _blocks(path, offset, block_size):
        if offset < start_offset:
            check, block, offset = block[:1], block[1:], start_offset
            if not block:
                continue
        if check is not None:
            if check != b"\n":
                raise DataError(moved)
            check = None
        pieces = block.split(b"\n")
        parts.append(pieces[0])
        if len(pieces) == 1:
            continue
        pieces[0] = b"".join(parts) if len(parts) > 1 else parts[0]
        parts = [pieces.pop()]  # the start of the next line
        for raw in pieces:
            end = offset + len(raw) + 1
            if drop_lines:
                drop_lines -= 1
            else:
                yield line_no, offset, end, raw[:-1] if raw.endswith(b"\r") else raw
            line_no, offset = line_no + 1, end
    if offset < start_offset:
        raise DataError(f"{path}: byte offset {start_offset} (line {start_line}) is past the end of the file")
    raw = b"".join(parts)
    if raw and not drop_lines:  # the last line has no newline
        yield line_no, offset, offset + len(raw), raw[:-1] if raw.endswith(b"\r") else raw


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
            if offset == 0 and raw.startswith(UTF8_BOM):  # editors on Windows start text files with one
                raw = raw[len(UTF8_BOM) :]
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
    except _StreamFault as fault:
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


def resolve_paths(spec, *, on_error: str = "raise", skipped: Counter | None = None) -> list[Path]:
    """The data files named by `spec`: a file, a directory (its data files), a glob, or a list of these.

    Files of other types in a directory or glob (a `manifest.json` beside the shards) are ignored. A glob or
    directory with no data file, or a missing path, is a DataError, or with on_error="skip" a warning counted as
    `no_match` in `skipped`; no file at all is always an error, and so is a file named twice.
    """
    _check_on_error(on_error)
    items = [spec] if isinstance(spec, str | Path) else list(spec)
    skipped = Counter() if skipped is None else skipped
    kinds = "/".join(FORMATS)
    found: dict[Path, tuple[Path, str]] = {}  # resolved path -> (path as found, the item that named it)
    for item in items:
        name = str(item)
        if any(c in name for c in "*?["):
            matches = [Path(p) for p in sorted(glob.glob(name, recursive=True))]
            where = f"glob {name!r} matches no {kinds} file"
        elif Path(name).is_dir():
            matches = sorted(Path(name).iterdir())
            where = f"directory {name} holds no {kinds} file"
        elif Path(name).exists():
            if file_format(name) is None:
                raise DataError(f"{name}: unsupported file type; use one of {', '.join(FORMATS)}")
            matches, where = [Path(name)], ""
        else:
            matches, where = [], f"{name}: no such file or directory"
        matches = [p for p in matches if file_format(p) is not None and p.is_file()]
        if not matches:
            if on_error == "raise":
                raise DataError(f"{where}; check the data path (data config or --data)")
            skipped["no_match"] += 1
            warnings.warn(f"skipped: {where}", DataWarning, stacklevel=2)
        for p in matches:
            key = p.resolve()
            if key in found:
                raise DataError(f"{p}: named twice (by {found[key][1]!r} and {name!r}); give each file once")
            found[key] = (p, name)
    if not found:
        raise DataError(f"no {kinds} file in {items}; check the data path (data config or --data)")
    return [p for p, _ in found.values()]
