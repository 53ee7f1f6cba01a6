"""Raw corpora -> `part-NNNNN.jsonl.zst` shards of at most 16384 documents, plus a `manifest.json`.

    python -m data.shard INPUT... --out DIR [--text-field text] [--zstd-level 3] [--workers N]
        [--lines-per-shard 16384] [--source NAME] [--txt-mode paragraph|line|file] [--on-error raise|skip] [--overwrite]

Inputs: .txt, .jsonl, .json (JSON Lines or one JSON array), plain, .zst or .gz; files, directories or globs, each
expanded and sorted. Output lines: `{"text": ..., "meta": {"source", "file", "line", <the input's own keys>}}`.
Shard k holds documents [k*L, (k+1)*L) of the stream whatever --workers is (the main process parses, workers
compress). Shards and manifest.json are replaced atomically; a re-run writes nothing, an interrupted run resumes,
other inputs or options are refused. data/README.md says what a document is and what the manifest holds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import gzip
import hashlib
import json
import multiprocessing
import os
import sys
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

MAX_LINES_PER_SHARD = 16384
MANIFEST = "manifest.json"
SUFFIXES = tuple(f + c for f in (".txt", ".jsonl", ".json") for c in ("", ".zst", ".gz"))
TXT_MODES = ("paragraph", "line", "file")
ON_ERROR = ("raise", "skip")
_READ_SIZE = 1 << 20
_SAVE_EVERY_S = 10.0  # the manifest is rewritten at most this often while shards stream out (and at the end)
_MAX_WARNINGS = 20
_BOM = b"\xef\xbb\xbf"


class ShardError(Exception):
    """Bad input, options or output folder; the message names the file, line or flag and what to do."""


class InputError(ShardError):
    """One bad record or unreadable file, at `path` line (or JSON array item) `line`."""

    def __init__(self, path: Path, line: int, what: str, *, unit: str = "line") -> None:
        self.path, self.line, self.what = path, line, what
        super().__init__(f"{path}, {unit} {line}: {what}")


class _Unreadable(InputError):
    """A damaged compressed stream: nothing after `line` can be read from this file."""


@dataclass(frozen=True)
class ShardOptions:
    """Everything that decides the output bytes; recorded in manifest.json and compared on every re-run."""

    text_field: str = "text"
    zstd_level: int = 3
    lines_per_shard: int = MAX_LINES_PER_SHARD
    source: str = ""  # meta.source of every document; empty means the --out folder's name
    txt_mode: str = "paragraph"
    on_error: str = "raise"

    def validate(self) -> None:
        """Raise ShardError naming the flag of the first bad option."""
        if not 1 <= self.lines_per_shard <= MAX_LINES_PER_SHARD:
            raise ShardError(f"--lines-per-shard={self.lines_per_shard}: must be between 1 and {MAX_LINES_PER_SHARD}")
        if not 1 <= self.zstd_level <= 22:
            raise ShardError(f"--zstd-level={self.zstd_level}: must be between 1 and 22")
        if self.txt_mode not in TXT_MODES:
            raise ShardError(f"--txt-mode={self.txt_mode!r}: choose one of {', '.join(TXT_MODES)}")
        if self.on_error not in ON_ERROR:
            raise ShardError(f"--on-error={self.on_error!r}: choose one of {', '.join(ON_ERROR)}")
        if not self.text_field or self.text_field == "meta":
            raise ShardError(f"--text-field={self.text_field!r}: give the JSON key that holds the document text")


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


class _Errors:
    """--on-error: raise with a hint, or count, warn (the first few) and go on."""

    def __init__(self, mode: str) -> None:
        self.mode, self.count = mode, 0

    def __call__(self, err: ShardError) -> None:
        if self.mode == "raise":
            # A plain ShardError, so no `except InputError` on the way out handles it a second time.
            raise ShardError(f"{err} (fix the input, or pass --on-error skip to count and skip such input)") from err
        self.count += 1
        if self.count <= _MAX_WARNINGS:
            print(f"warning: skipped: {err}", file=sys.stderr)
        elif self.count == _MAX_WARNINGS + 1:
            print("warning: more bad input skipped; the count goes to manifest.json", file=sys.stderr)


def _supported(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def expand_inputs(patterns: Sequence[str | os.PathLike], *, exclude: Path | None = None, on_error: str = "raise"):
    """Files, directories and globs -> list[InputFile]; each pattern's matches sorted, files under `exclude` dropped."""
    errors, found, seen = _Errors(on_error), [], set()
    for pattern in map(str, patterns):
        if os.path.isdir(pattern):
            matches = sorted((p for p in Path(pattern).rglob("*") if p.is_file() and _supported(p)), key=str)
            empty = f"input directory {pattern!r} holds no {'/'.join(SUFFIXES)} file"
        elif any(c in pattern for c in "*?["):
            matches = sorted((Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)), key=str)
            empty = f"input glob {pattern!r} matches no file (relative to {os.getcwd()})"
        else:
            matches = [Path(pattern)] if os.path.isfile(pattern) else []
            empty = f"input file {pattern!r} does not exist (relative to {os.getcwd()})"
        if exclude is not None:
            matches = [m for m in matches if not m.resolve().is_relative_to(exclude)]
        if not matches:
            errors(ShardError(empty))
        for m in matches:
            if not _supported(m):
                hint = " (no parquet reader installed here: convert to .jsonl)" if ".parquet" in m.name else ""
                errors(ShardError(f"input {m}: unsupported type{hint}; supported: {', '.join(SUFFIXES)}"))
            elif m.resolve() in seen:
                raise ShardError(f"input {m} is given twice (check overlapping INPUT patterns)")
            else:
                found.append(m.resolve())
                seen.add(m.resolve())
    if not found:
        raise ShardError("no input files: give files, directories or globs of " + "/".join(SUFFIXES))
    common = Path(os.path.commonpath([p.parent for p in found]))
    files = []
    for p in found:
        st = p.stat()
        files.append(InputFile(p, p.relative_to(common).as_posix(), st.st_size, st.st_mtime_ns))
    return files


def _zstd_stream(f, path: Path) -> Iterator[tuple[bytes, bool]]:
    dctx = zstandard.ZstdDecompressor(max_window_size=1 << 31)  # allow --long windows
    obj, in_frame = dctx.decompressobj(), False
    while data := f.read(_READ_SIZE):
        while data:
            try:
                out = obj.decompress(data)
            except zstandard.ZstdError as e:
                raise _Unreadable(path, 0, f"damaged zstd data ({e})") from e
            in_frame = not obj.eof
            yield out, obj.eof  # a frame's checksum is checked at its end
            data, obj = (obj.unused_data, dctx.decompressobj()) if obj.eof else (b"", obj)
    if in_frame:  # zstandard's own readers return a short stream here without a word
        raise _Unreadable(path, 0, "truncated zstd data: the file ends inside a frame (interrupted download?)")


def _stream(path: Path) -> Iterator[tuple[bytes, bool]]:
    """Decompressed chunks of one file, each with whether all bytes so far passed their checksum; _Unreadable at 0."""
    with open(path, "rb") as f:
        if path.name.endswith(".zst"):
            yield from _zstd_stream(f, path)
        elif path.name.endswith(".gz"):
            try:
                with gzip.GzipFile(fileobj=f) as g:
                    while chunk := g.read(_READ_SIZE):
                        yield chunk, False
            except (EOFError, OSError, zlib.error) as e:
                raise _Unreadable(path, 0, f"damaged or truncated gzip data ({e})") from e
            yield b"", True  # the CRC of the whole member was checked at its end
        else:
            while chunk := f.read(_READ_SIZE):
                yield chunk, True


def _verified_size(path: Path) -> tuple[int, _Unreadable | None]:
    """Decompressed bytes that passed their checksum (whole zstd frames, a whole gzip file), and the fault after them.

    Checksums are only checked at the end of a frame, after its data came out: this first pass keeps the bytes of a
    damaged or truncated frame out of every document. Decompressing twice costs little next to parsing.
    """
    if not path.name.endswith((".zst", ".gz")):
        return sys.maxsize, None
    total = good = 0
    try:
        for chunk, verified in _stream(path):
            total += len(chunk)
            good = total if verified else good
    except _Unreadable as e:
        return good, e
    return good, None


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, bytes without LF/CRLF) of the verified part of one file, without a leading UTF-8 BOM."""
    good, fault = _verified_size(path)
    pending: list[bytes] = []
    n, seen, first = 0, 0, True
    with contextlib.closing(_stream(path)) as stream:
        for chunk, _ in stream if good else ():  # never decode into a bad frame again
            chunk = chunk[: good - seen]
            seen += len(chunk)
            if chunk and first:
                chunk, first = chunk.removeprefix(_BOM), False
            parts = chunk.split(b"\n")
            if len(parts) == 1:
                pending.append(chunk)
            else:
                parts[0] = b"".join(pending) + parts[0]
                pending = [parts.pop()]
                for part in parts:
                    n += 1
                    yield n, part.removesuffix(b"\r")
            if seen >= good:
                break
    if fault:  # the line that reaches into the bad frame, and everything after it, is lost
        raise _Unreadable(path, n + 1, fault.what)
    if last := b"".join(pending):
        yield n + 1, last.removesuffix(b"\r")


def _decode(raw: bytes, path: Path, n: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 4]
        raise InputError(path, n, f"invalid UTF-8 at byte {e.start} of the line ({bad!r})") from e


def _txt_documents(path: Path, start: int, mode: str, errors: _Errors):
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


def _is_json_array(path: Path) -> bool:
    stream = _stream(path)
    try:
        for chunk, _ in stream:
            if head := chunk.lstrip(b" \t\r\n" + _BOM):
                return head[:1] == b"["
        return False
    except _Unreadable as e:
        raise _Unreadable(path, 1, e.what) from e
    finally:
        stream.close()


def _json_values(path: Path, start: int, errors: _Errors):
    """(line or item number, unit, parsed value) of a JSON Lines file or a JSON array file."""
    if path.name.endswith((".json", ".json.zst", ".json.gz")) and _is_json_array(path):
        data = b"\n".join(raw for _, raw in _lines(path))  # keeps the line numbers of JSON errors
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
    for n, raw in _lines(path):
        if n <= start or not raw.strip():
            continue
        try:
            yield n, "line", json.loads(_decode(raw, path, n))
        except InputError as e:
            errors(e)
        except json.JSONDecodeError as e:
            errors(InputError(path, n, f"invalid JSON at column {e.colno}: {e.msg}"))


def _json_documents(path: Path, start: int, field: str, errors: _Errors):
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


def _documents(files: list[InputFile], options: ShardOptions, start: tuple[int, int], errors: _Errors):
    """(input index, first line, last line, output line) of every document after position `start`."""
    for i in range(start[0], len(files)):
        f, skip = files[i], start[1] if i == start[0] else 0
        if f.path.name.endswith((".txt", ".txt.zst", ".txt.gz")):
            docs = ((a, b, text, []) for a, b, text in _txt_documents(f.path, skip, options.txt_mode, errors))
        else:
            records = _json_documents(f.path, skip, options.text_field, errors)
            docs = ((a, b, text, [meta, extra]) for a, b, text, meta, extra in records)
        try:
            for first, last, text, inherited in docs:
                try:
                    line = _encode(text, inherited, source=options.source, name=f.name, line=first)
                except UnicodeEncodeError as e:
                    what = f"unpaired surrogate {e.object[e.start]!r} (a lone \\udXXX escape), not valid UTF-8"
                    errors(InputError(f.path, first, what))
                    continue
                yield i, first, last, line
        except _Unreadable as e:
            errors(e)  # --on-error skip: the rest of this file is lost, the next file goes on


def _write_shard(path: str, data: bytes, level: int) -> tuple[int, str]:
    """Compress one shard and write it atomically; (file bytes, sha256 hex). Runs in a worker process."""
    blob = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True).compress(data)
    tmp = path + ".tmp"  # not *.jsonl.zst, so no reader's glob picks up a half-written shard
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(blob), hashlib.sha256(blob).hexdigest()


def _save(out: Path, manifest: dict) -> None:
    tmp = out / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MANIFEST)


def _difference(old: dict, new: dict) -> str | None:
    """Why an existing manifest belongs to another job, or None."""
    if old.get("version") != new["version"] or not isinstance(old.get("shards"), list) or "complete" not in old:
        return f"it is not a version {new['version']} manifest of this tool"
    opts = old["options"]
    changed = [f"{k}: {opts.get(k)!r} -> {v!r}" for k, v in new["options"].items() if opts.get(k) != v]
    if changed:
        return "options differ (" + "; ".join(changed) + ")"
    key = lambda e: (e["name"], e["size"], e["mtime_ns"])  # noqa: E731
    old_inputs, new_inputs = [key(e) for e in old["inputs"]], [key(e) for e in new["inputs"]]
    if old_inputs != new_inputs:
        gone = sorted({e[0] for e in old_inputs} - {e[0] for e in new_inputs})
        added = sorted({e[0] for e in new_inputs} - {e[0] for e in old_inputs})
        return f"inputs differ (gone: {gone[:5]}, new: {added[:5]}, or changed size/mtime or order)"
    return None


def _load_manifest(out: Path, header: dict, overwrite: bool) -> dict:
    """The manifest to continue: the existing one if it describes the same job, else a fresh one (--overwrite)."""
    path, parts = out / MANIFEST, sorted(out.glob("part-*.jsonl.zst"))
    fresh = {**header, "complete": False, "shards": []}
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            problem = _difference(old, header)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            problem = f"it is not a manifest this tool wrote ({type(e).__name__}: {e})"
        if problem is None:
            return old
        problem = f"{path} belongs to another job: {problem}"
    elif parts:
        problem = f"{out} holds {len(parts)} part-*.jsonl.zst files but no {MANIFEST}"
    else:
        return fresh
    if not overwrite:
        raise ShardError(f"{problem}. Choose another --out, or pass --overwrite to replace its shards")
    for p in parts:
        p.unlink()
    path.unlink(missing_ok=True)
    return fresh


def _shard_name(index: int) -> str:
    return f"part-{index:05d}.jsonl.zst"


def _done_prefix(out: Path, shards: list[dict]) -> list[dict]:
    """The recorded shards up to the first one missing or of another size on disk (writes are atomic)."""
    for i, s in enumerate(shards):
        p = out / s["file"]
        if s["file"] != _shard_name(i) or not p.is_file() or p.stat().st_size != s["bytes"]:
            print(f"{p}: missing or changed; rewriting from shard {i}", file=sys.stderr)
            return shards[:i]
    return shards


class _Writer:
    """Writes shards in order, inline or on a process pool, and records each in the manifest once it is on disk."""

    def __init__(self, out: Path, manifest: dict, level: int, workers: int) -> None:
        self.out, self.manifest, self.level, self.workers = out, manifest, level, workers
        ctx = multiprocessing.get_context("spawn")  # no fork of a parent that may hold threads (torch, pytest)
        self.pool = ProcessPoolExecutor(workers, mp_context=ctx) if workers > 1 else None
        self.pending: deque = deque()
        self.saved = time.monotonic()

    def submit(self, lines: list[bytes], ranges: list[dict], skipped: int) -> None:
        """Queue shard number len(shards) + len(pending); blocks while `workers` shards are in flight."""
        name = _shard_name(len(self.manifest["shards"]) + len(self.pending))
        data = b"".join(lines)
        args = (str(self.out / name), data, self.level)
        result = self.pool.submit(_write_shard, *args) if self.pool else _write_shard(*args)
        self.pending.append((name, len(lines), len(data), ranges, skipped, result))
        self.drain(self.workers)

    def drain(self, keep: int = 0) -> None:
        """Record finished shards, oldest first, until at most `keep` are in flight."""
        while len(self.pending) > keep:
            name, lines, raw, ranges, skipped, result = self.pending.popleft()
            size, digest = result.result() if isinstance(result, Future) else result
            entry = {"file": name, "lines": lines, "bytes": size, "sha256": digest, "raw_bytes": raw}
            self.manifest["shards"].append({**entry, "skipped": skipped, "source": ranges})
            print(f"{self.out / name}: {lines} documents, {size / 1e6:.1f} MB", file=sys.stderr)
            if time.monotonic() - self.saved > _SAVE_EVERY_S:
                _save(self.out, self.manifest)
                self.saved = time.monotonic()

    def close(self, failed: bool) -> None:
        """Shut the pool; after a failure, still record the shards that reached the disk so a re-run skips them."""
        try:
            if failed:
                self.drain(0)
        except Exception:  # noqa: BLE001 - the first error is the one to report; an unrecorded shard is rewritten
            pass
        finally:
            if self.pool:
                self.pool.shutdown(cancel_futures=True)


def shard(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    options: ShardOptions | None = None,
    *,
    workers: int = 1,
    overwrite: bool = False,
) -> dict:
    """Shard `inputs` into `out` (resuming, or doing nothing when it is complete); returns the manifest."""
    t0, out = time.monotonic(), Path(out).resolve()
    options = options or ShardOptions()
    options = dataclasses.replace(options, source=options.source or out.name)
    options.validate()
    if workers < 1:
        raise ShardError(f"--workers={workers}: must be at least 1")
    files = expand_inputs(inputs, exclude=out, on_error=options.on_error)
    out.mkdir(parents=True, exist_ok=True)
    header = {"version": 1, "options": dataclasses.asdict(options), "inputs": [f.describe() for f in files]}
    manifest = _load_manifest(out, header, overwrite)
    manifest["shards"] = _done_prefix(out, manifest["shards"])
    if manifest["complete"] and len(manifest["shards"]) == manifest["totals"]["shards"]:
        print(f"{out}: up to date ({manifest['totals']['shards']} shards); nothing written", file=sys.stderr)
        return manifest
    for stale in out.glob("part-*.jsonl.zst.tmp"):
        stale.unlink()
    manifest["complete"] = False
    _save(out, manifest)

    start = (0, 0)
    if manifest["shards"]:  # resume right after the last document of the last recorded shard
        last = manifest["shards"][-1]["source"][-1]
        start = ([f.name for f in files].index(last["file"]), last["last_line"])
    errors = _Errors(options.on_error)
    writer, failed = _Writer(out, manifest, options.zstd_level, workers), True
    try:
        chunk, ranges, base, mark = [], [], 0, 0
        for i, first, last, line in _documents(files, options, start, errors):
            mark = errors.count  # bad input met before a document is counted in that document's shard
            chunk.append(line)
            if ranges and ranges[-1]["file"] == files[i].name:
                ranges[-1]["last_line"] = last
            else:
                ranges.append({"file": files[i].name, "first_line": first, "last_line": last})
            if len(chunk) == options.lines_per_shard:
                writer.submit(chunk, ranges, mark - base)
                chunk, ranges, base = [], [], mark
        if chunk:
            writer.submit(chunk, ranges, mark - base)
            base = mark
        writer.drain(0)
        failed = False
    finally:
        writer.close(failed)
        _save(out, manifest)
    shards = manifest["shards"]
    if not shards:
        raise ShardError(f"no documents in {len(files)} input files ({errors.count} bad records skipped)")
    totals = {"shards": len(shards), "lines": sum(s["lines"] for s in shards), "bytes": sum(s["bytes"] for s in shards)}
    totals["skipped"] = sum(s["skipped"] for s in shards) + errors.count - base
    manifest.update(complete=True, totals=totals)
    _save(out, manifest)
    print(
        f"{out}: {totals['shards']} shards, {totals['lines']} documents, {totals['bytes'] / 1e6:.1f} MB, "
        f"{totals['skipped']} bad records skipped, {time.monotonic() - t0:.1f} s",
        file=sys.stderr,
    )
    return manifest


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m data.shard`."""
    d = ShardOptions()
    p = argparse.ArgumentParser(prog="python -m data.shard", description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, directories or globs (quote globs)")
    p.add_argument("--out", required=True, help="output folder for part-NNNNN.jsonl.zst and manifest.json")
    p.add_argument("--text-field", default=d.text_field, help="JSON key holding the text (default: %(default)s)")
    p.add_argument("--zstd-level", type=int, default=d.zstd_level, help="1-22 (default: %(default)s)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="compressing processes")
    p.add_argument("--lines-per-shard", type=int, default=d.lines_per_shard, help="at most %(default)s")
    p.add_argument("--source", default="", help="meta.source of every document (default: the --out folder's name)")
    p.add_argument("--txt-mode", choices=TXT_MODES, default=d.txt_mode, help="what a .txt document is")
    p.add_argument("--on-error", choices=ON_ERROR, default=d.on_error, help="bad input: stop, or count and skip")
    p.add_argument("--overwrite", action="store_true", help="replace an --out made from other inputs or options")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; exit status 1 with the message on a ShardError."""
    a = build_parser().parse_args(argv)
    options = ShardOptions(a.text_field, a.zstd_level, a.lines_per_shard, a.source, a.txt_mode, a.on_error)
    try:
        shard(a.inputs, a.out, options, workers=a.workers, overwrite=a.overwrite)
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
