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
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import zstandard

from data.records import TXT_MODES, Errors, ShardError, documents, input_files
from dataset.jsonl_zst import ON_ERROR

MAX_LINES_PER_SHARD = 16384
MANIFEST = "manifest.json"
_SAVE_EVERY_S = 10.0  # the manifest is rewritten at most this often while shards stream out (and at the end)


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
    files = input_files(inputs, out, Errors(options.on_error))
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
    errors = Errors(options.on_error)
    writer, failed = _Writer(out, manifest, options.zstd_level, workers), True
    try:
        chunk, ranges, base, mark = [], [], 0, 0
        for i, first, last, line in documents(
            files, start, errors, txt_mode=options.txt_mode, text_field=options.text_field, source=options.source
        ):
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
