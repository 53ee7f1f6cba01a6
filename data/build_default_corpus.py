"""The default corpus, built from text every Python installation carries: no download, no third-party text.

    python -m data.build_default_corpus --out corpus/default [--zstd-level 3] [--lines-per-shard 64]

Documents: one per help topic of `pydoc_data.topics` (the language reference behind `help("if")`), and one per
standard-library module: its docstring, then the docstrings of the public classes (with their methods) and
functions it defines, under their signatures. Modules are found on disk without importing them, then imported one
by one in an isolated child interpreter (`python -I`, empty working folder, no stdin/stdout) so that a module that
prints, blocks or crashes cannot disturb or hang the build: it is skipped and named in the summary. GUI and
side-effect modules (tkinter, turtle, idlelib, antigravity, this, ...) are never imported.

About 5% of the documents, chosen by a hash of their title, go to DIR/valid/, the rest to DIR/train/, each sharded
by `data.shard` (meta.source = "python-docs") from the intermediate DIR/source/python-docs-{train,valid}.jsonl.zst.
The output is deterministic for a given Python installation, and a second run writes nothing. Shards are small
(--lines-per-shard 64) so that several data-parallel ranks and loader workers each get whole shards.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import json
import os
import pkgutil
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# Modules that open windows, print, start a browser, or belong to the test suite or other platforms' GUI.
EXCLUDED = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "readline"}
NO_SUBMODULES = {"encodings"}  # a hundred codec tables with the same boilerplate docstring
SOURCE = "python-docs"
VALID_PER_MILLE = 50  # 2% held out only 4 small documents (7 KB): less than one evaluation batch
MODULE_TIMEOUT_S = 10  # one import; the child interpreter as a whole gets a minute more than all of them
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # object reprs in signatures would make the text differ per run


def _submodules(paths: list[str], prefix: str) -> list[str]:
    """Public submodules below package folders `paths`, read from the folders (pkgutil.walk_packages would import)."""
    names = []
    for info in pkgutil.iter_modules(paths, prefix):
        leaf = info.name.rsplit(".", 1)[1]
        if leaf.startswith("_") or leaf in ("test", "tests", "idle_test"):
            continue
        names.append(info.name)
        if info.ispkg:
            names += _submodules([os.path.join(info.module_finder.path, leaf)], info.name + ".")
    return names


def discover_modules() -> list[str]:
    """Public standard-library modules and submodules present here, sorted; none of them is imported."""
    names = []
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in EXCLUDED:
            continue
        try:
            spec = importlib.util.find_spec(top)  # a top-level name: locates the module, runs none of its code
        except (ImportError, ValueError):
            continue
        if spec is None:  # another platform's module (msvcrt, winreg, ...)
            continue
        names.append(top)
        if spec.submodule_search_locations and top not in NO_SUBMODULES:
            names += _submodules(list(spec.submodule_search_locations), top + ".")
    return sorted(names)


_MACHINE_PATHS = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.expanduser("~")} - {"", "/", "~"}


def _plain(value) -> bool:
    """A default whose repr is the same on every machine: not os.environ, an object at an address, sys.executable."""
    if value is inspect.Parameter.empty:
        return True
    if isinstance(value, tuple | frozenset):
        return all(_plain(v) for v in value)
    if isinstance(value, str) and any(path in value for path in _MACHINE_PATHS):
        return False
    return type(value) in (type(None), bool, int, float, complex, str, bytes) and len(repr(value)) <= 80


class _Hidden:
    """Stands for a default value that would differ per machine."""

    def __repr__(self) -> str:
        return "..."


def _signature(obj) -> str:
    """The signature with non-literal defaults shown as `...`: cgi.parse's default is the whole os.environ."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    params = [p if _plain(p.default) else p.replace(default=_Hidden()) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params))


def _doc(obj) -> str:
    doc = getattr(obj, "__doc__", None)
    return _ADDRESS.sub("", inspect.cleandoc(doc)) if isinstance(doc, str) and doc.strip() else ""


def module_document(name: str, module) -> str:
    """`Module NAME`, its docstring, then each public class (and method) and function it defines with docstrings."""
    parts = [f"Module {name}", _doc(module)]
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj):
            members = []
            for mname, member in sorted(vars(obj).items()):
                func = member.__func__ if isinstance(member, classmethod | staticmethod) else member
                if mname.startswith("_") or not (callable(func) or isinstance(member, property)):
                    continue
                if doc := _doc(func if callable(func) else member):
                    members.append(f"{attr}.{mname}{_signature(func) if callable(func) else ''}\n{doc}")
            if (doc := _doc(obj)) or members:
                parts.append("\n\n".join([f"class {name}.{attr}{_signature(obj)}\n{doc}".rstrip(), *members]))
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            if doc := _doc(obj):
                parts.append(f"{name}.{attr}{_signature(obj)}\n{doc}")
    body = [p for p in parts[1:] if p]
    text = "\n\n".join([parts[0], *body]) if body else ""  # no docstring at all: no document
    return text.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate is not UTF-8


def _worker(names_path: str, results_path: str) -> None:
    """In the isolated child: import each module, append one JSON line per module to results_path, in order."""

    def timeout(signum, frame):
        raise TimeoutError(f"import took over {MODULE_TIMEOUT_S} s")

    alarm = getattr(signal, "alarm", lambda _seconds: 0)  # POSIX; elsewhere only the parent's overall timeout
    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, timeout)
    warnings.simplefilter("ignore")
    names = json.loads(Path(names_path).read_text())
    with open(results_path, "a", encoding="utf-8") as out:
        for name in names:
            alarm(MODULE_TIMEOUT_S)
            try:
                result = {"name": name, "text": module_document(name, importlib.import_module(name))}
            except BaseException as e:  # noqa: BLE001 - ImportError on other platforms, SystemExit, timeouts, ...
                result = {"name": name, "skipped": f"{type(e).__name__}: {e}"[:200]}
            alarm(0)
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
            out.flush()
    os._exit(0)  # neither wait for threads the imports started nor run their atexit handlers


def module_documents(names: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """({module: text}, {module: why skipped}); a child that dies or hangs costs only the module it was on.

    Modules without any docstring give no document and are not counted as skipped.
    """
    docs: dict[str, str] = {}
    skipped: dict[str, str] = {}
    remaining = list(names)
    while remaining:
        with tempfile.TemporaryDirectory() as tmp:
            names_path, results_path = Path(tmp, "names.json"), Path(tmp, "results.jsonl")
            names_path.write_text(json.dumps(remaining))
            script = str(Path(__file__).resolve())
            cmd = [sys.executable, "-I", "-B", script, "--worker", str(names_path), str(results_path)]
            try:
                proc = subprocess.run(
                    cmd,
                    cwd=tmp,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=60 + MODULE_TIMEOUT_S * len(remaining),
                )
                why = f"the importer exited with status {proc.returncode}"
            except subprocess.TimeoutExpired:
                why = "the importer hung"
            except OSError as e:  # no interpreter to start: nothing will import
                skipped |= {name: f"cannot start {sys.executable}: {e}" for name in remaining}
                return docs, skipped
            lines = results_path.read_text(encoding="utf-8").splitlines() if results_path.exists() else []
        for line in lines:
            try:
                result = json.loads(line)
            except json.JSONDecodeError:  # the last line of a child that died while writing it
                break
            if result["name"] != remaining[0]:
                break
            remaining.pop(0)
            if result.get("text"):
                docs[result["name"]] = result["text"]
            elif "skipped" in result:
                skipped[result["name"]] = result["skipped"]
        if remaining:  # the child stopped on remaining[0]: blame it and go on after it
            skipped[remaining.pop(0)] = why
    return docs, skipped


def title_hash(title: str) -> int:
    """The first 8 bytes of the title's sha256: what decides its split."""
    return int.from_bytes(hashlib.sha256(title.encode()).digest()[:8], "big")


def split_documents(docs: list[tuple[str, str, str]]) -> dict[str, list[tuple[str, str, str]]]:
    """{"train", "valid"}: VALID_PER_MILLE per thousand titles by hash (never none), order kept."""
    valid = {title for title, _, _ in docs if title_hash(title) % 1000 < VALID_PER_MILLE}
    if not valid and docs:  # tiny corpora: hold out the one with the smallest hash rather than nothing
        valid = {min((title for title, _, _ in docs), key=title_hash)}
    return {
        "train": [d for d in docs if d[0] not in valid],
        "valid": [d for d in docs if d[0] in valid],
    }


def _write_if_changed(path: Path, data: bytes) -> None:
    """Keep the file (and its mtime, which data.shard checks) when the content is the same."""
    if path.exists() and path.read_bytes() == data:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build(out: str | os.PathLike, *, zstd_level: int = 3, lines_per_shard: int = 64) -> dict:
    """Gather the documents, split them, write the sources and shard them into out/train and out/valid."""
    # Imported here, not at the top: the child interpreter runs this file under `python -I`, without the repo.
    import zstandard

    from data.shard import ShardOptions, shard

    t0, out = time.monotonic(), Path(out)
    import pydoc_data.topics  # plain data: safe to import in this process

    docs = [(f"topic {k}", "topic", v.strip()) for k, v in sorted(pydoc_data.topics.topics.items()) if v.strip()]
    module_docs, skipped = module_documents(discover_modules())
    if not module_docs:
        raise RuntimeError(f"no standard-library module could be imported by {sys.executable} -I; first: {skipped}")
    docs += [(f"module {name}", "module", text) for name, text in sorted(module_docs.items())]
    docs.sort(key=lambda d: title_hash(d[0]))  # a fixed shuffle: each shard mixes topics and modules
    splits = split_documents(docs)
    (out / "source").mkdir(parents=True, exist_ok=True)
    summary = {"documents": len(docs), "modules": len(module_docs), "skipped_modules": skipped}
    summary |= {"text_bytes": 0, "shard_bytes": 0}
    for split, items in splits.items():
        lines = [
            json.dumps({"text": t, "meta": {"title": title, "kind": k}}, ensure_ascii=False) for title, k, t in items
        ]
        data = ("\n".join(lines) + "\n").encode()
        source = out / "source" / f"{SOURCE}-{split}.jsonl.zst"
        _write_if_changed(source, zstandard.ZstdCompressor(level=zstd_level, write_checksum=True).compress(data))
        options = ShardOptions(zstd_level=zstd_level, lines_per_shard=lines_per_shard, source=SOURCE)
        manifest = shard([source], out / split, options, workers=1, overwrite=True)
        summary[split] = len(items)
        summary["text_bytes"] += sum(len(t.encode()) for _, _, t in items)
        summary["shard_bytes"] += manifest["totals"]["bytes"]
    summary["seconds"] = round(time.monotonic() - t0, 1)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command line (and, with --worker, the isolated child's entry point)."""
    p = argparse.ArgumentParser(prog="python -m data.build_default_corpus", description=__doc__.split("\n")[0])
    p.add_argument("--out", help="output folder: train/, valid/ and source/ go in it")
    p.add_argument("--zstd-level", type=int, default=3, help="1-22 (default: %(default)s)")
    p.add_argument("--lines-per-shard", type=int, default=64, help="documents per shard (default: %(default)s)")
    p.add_argument("--worker", nargs=2, metavar=("NAMES", "RESULTS"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        _worker(*a.worker)
    if not a.out:
        p.error("--out is required")
    s = build(a.out, zstd_level=a.zstd_level, lines_per_shard=a.lines_per_shard)
    print(
        f"{a.out}: {s['documents']} documents ({s['train']} train, {s['valid']} valid), "
        f"{s['text_bytes'] / 1e6:.2f} MB of text, {s['shard_bytes'] / 1e6:.2f} MB of shards, {s['seconds']} s; "
        f"{len(s['skipped_modules'])} modules skipped: {', '.join(sorted(s['skipped_modules']))}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
