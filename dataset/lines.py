"""Lines of plain, zstd and gzip files, read in bounded memory from only the bytes that pass their checksums.

zstd is decoded incrementally: the decompressor hands out blocks of at most 64 KiB, which are split into lines, so
memory holds the zstd window, one block and the current line, and does not grow with the file. Several frames are
decoded one after another. Only whole frames that decode (and match their checksum, when written with one: the
`zstd` CLI default) are read: a first pass decodes each frame and drops the output, and the reading pass stops
before the first corrupt or truncated frame, then reports it. A cut that falls exactly between two frames cannot be
seen from the file alone. gzip checks its CRC at the end of the file, so a gzip file is read only when all of it
decodes and matches.

Lines lack their newline (LF, or CRLF: the CR is dropped) and the first line its UTF-8 byte order mark, which
editors on Windows start text files with. Line numbers are 1-based and offsets count bytes of the decompressed
stream, so `path:line` in an error points at the line to look at, and `(line, offset)` is a position a resumed
reader can start from.

    for line, offset, end, raw in iter_lines("shards/part-00000.jsonl.zst"):
        ...
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import zstandard

BLOCK_SIZE = 1 << 16  # decompressed bytes read per step
ZSTD_MAGIC, SKIPPABLE_MAGIC = 0xFD2FB528, 0x184D2A50
MAX_WINDOW = 1 << 31  # inputs compressed with `zstd --long=31` decode too
UTF8_BOM = b"\xef\xbb\xbf"  # dropped at the start of a file (json.loads refuses it, a text would keep it)


class DataError(ValueError):
    """Bad input data; the message names the file and line (one string argument, so DataLoader workers re-raise it)."""


class StreamFault(DataError):
    """Corrupt or truncated compressed data: nothing after the lines read so far can be decoded.

    `reason` is the skip counter it goes to ("truncated_zstd", "corrupt_zstd" or "corrupt_gzip") and `detail` what
    the decoder said, for callers that word the fault their own way.
    """

    def __init__(self, reason: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.reason, self.detail = reason, detail


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
        no_frame = f"no zstd frame at byte {pos}"
        raise StreamFault("corrupt_zstd", f"{path}: corrupt zstd data ({no_frame})", no_frame)
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

    data/shard.py and the `zstd` CLI write each frame's content size; a frame written as a stream may lack it, and a
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
            except StreamFault:
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


def _zstd_verified_length(f, path: Path) -> tuple[int, StreamFault | None]:
    """Decompressed length of the leading whole frames that decode and verify, and the fault after them, if any.

    zstd checks a frame's checksum only at its end, after handing out its data, so each frame is decoded once here
    and its output dropped: the reading pass then stops before the first bad frame and no byte of a corrupt or
    truncated frame ever reaches a line. One pass cannot do it in bounded memory: it would have to hold a whole
    frame (a shard of data/shard.py is one) until its checksum passed. Decoding runs near 1 GB/s, so the extra
    pass costs little next to tokenization.
    """
    size = os.fstat(f.fileno()).st_size
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
    pos = good = 0
    while pos < size:
        try:
            end = _frame_end(f, pos, size, path)
        except StreamFault as fault:  # not a frame: the frames before it are still good
            return good, fault
        if end is None:
            return good, StreamFault("truncated_zstd", f"{path}: truncated zstd stream (frame at byte {pos} is cut)")
        f.seek(pos)
        reader = dctx.stream_reader(_Slice(f, end - pos), closefd=False)
        n = 0
        try:
            while block := reader.read(BLOCK_SIZE):
                n += len(block)
        except zstandard.ZstdError as e:
            message = f"{path}: corrupt zstd data in the frame at byte {pos} ({e})"
            return good, StreamFault("corrupt_zstd", message, str(e))
        good, pos = good + n, end
    return good, None


def _gzip_verified_length(f, path: Path) -> tuple[int, StreamFault | None]:
    """Decompressed length of a gzip file whose every member decodes and matches its CRC (else 0), and the fault."""
    n = 0
    try:
        with gzip.GzipFile(fileobj=f) as g:
            while block := g.read(BLOCK_SIZE):
                n += len(block)
    except (EOFError, OSError, zlib.error) as e:
        return 0, StreamFault("corrupt_gzip", f"{path}: damaged or truncated gzip data ({e})", str(e))
    return n, None


def _decoded_blocks(f, path: Path, block_size: int) -> Iterator[bytes]:
    """Decompressed blocks (at most `block_size` bytes) of the verified part of a zstd or gzip file, then its fault."""
    gz = path.name.endswith(".gz")
    length, fault = (_gzip_verified_length if gz else _zstd_verified_length)(f, path)
    f.seek(0)
    if gz:
        reader = gzip.GzipFile(fileobj=f)
    else:
        dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
        reader = dctx.stream_reader(f, read_across_frames=True, closefd=False)
    while length > 0 and (block := reader.read(min(block_size, length))):
        length -= len(block)
        yield block
    if fault is not None:
        raise fault


def _blocks(path: Path, start_offset: int, block_size: int) -> Iterator[bytes]:
    """Decompressed bytes of `path` from `start_offset` on, in blocks."""
    with open(path, "rb") as f:
        if not path.name.endswith((".zst", ".gz")):
            f.seek(start_offset)
            while block := f.read(block_size):
                yield block
            return
        to_drop = start_offset  # compressed streams cannot seek: decode and drop (fast next to tokenization)
        for block in _decoded_blocks(f, path, block_size):
            if to_drop >= len(block):
                to_drop -= len(block)
                continue
            yield block[to_drop:] if to_drop else block
            to_drop = 0


def _clean(raw: bytes, offset: int) -> bytes:
    """A line without the CR of a CRLF and, at the start of the file, without a UTF-8 byte order mark."""
    raw = raw.removesuffix(b"\r")
    return raw.removeprefix(UTF8_BOM) if offset == 0 else raw


def iter_lines(
    path: str | Path, *, start_line: int = 1, start_offset: int | None = None, block_size: int = BLOCK_SIZE
) -> Iterator[tuple[int, int, int, bytes]]:
    """Yield `(line_number, offset, end, raw_line)` of a file; raw lines lack their newline (LF or CRLF).

    `offset` is the decompressed byte offset where the line starts and `end` where the next one starts.

    Args:
        path: a plain, `.zst` or `.gz` file.
        start_line: number of the first line to yield (1-based).
        start_offset: decompressed byte offset where `start_line` begins, as recorded from `offset` or `end`; the
            reader then starts there without scanning earlier lines (plain files seek; zstd and gzip decode and
            drop). When None, lines before `start_line` are read and dropped.
        block_size: bytes read per step.

    Raises:
        DataError: the file is missing or `start_offset` is not the start of a line (the file changed since the
            position was recorded).
        StreamFault: the compressed data is corrupt or truncated, after the lines before the bad part.
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
                yield line_no, offset, end, _clean(raw, offset)
            line_no, offset = line_no + 1, end
    if offset < start_offset:
        raise DataError(f"{path}: byte offset {start_offset} (line {start_line}) is past the end of the file")
    raw = b"".join(parts)
    if raw and not drop_lines:  # the last line has no newline
        yield line_no, offset, offset + len(raw), _clean(raw, offset)
