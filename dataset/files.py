"""Which files a tool reads: files, directories and globs resolved in order, each file once, under the tool's rules.

Every tool that takes input paths (the data loader, `data.shard`, `sft.py`, the tokenizer trainer) resolves them
here; its `FileRules` say which suffixes it reads, what a directory stands for, and how each problem is worded
(so that every message names the path and what to do in the tool's own words).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class FileRules:
    """Which files a tool reads from the paths, directories and globs it is given, and how it words each problem.

    The texts are format strings over: item (a path or glob as given), path (one file), items (everything given),
    first (the item that named a file before), kinds (the suffixes joined by "/"), suffixes (joined by ", "), cwd,
    and hint (from `hints`, by a piece of the file name).
    """

    suffixes: tuple[str, ...]
    error: type[Exception]  # raised for a problem that is not reported (see `find_files`)
    nothing: str  # no file at all
    missing: str  # a named path that does not exist
    no_match: str  # a glob that matches no file
    unsupported: str  # a file of another type
    # A named directory stands for its files ("flat"), or all files under it ("recursive"); None: it is no input.
    directories: Literal["flat", "recursive"] | None = "flat"
    empty_dir: str = ""  # a directory that holds no file of `suffixes`
    directory: str = ""  # a named directory when `directories` is None ("": worded as `missing`)
    duplicate: str = ""  # a file named twice ("": it is read once)
    # files of other types: a glob passes over them ("ignore") or reports them ("report")
    others: Literal["ignore", "report"] = "ignore"
    hints: dict[str, str] = field(default_factory=dict)  # piece of a file name -> `hint` for that unsupported file


def find_files(
    spec: str | os.PathLike | Sequence[str | os.PathLike],
    rules: FileRules,
    *,
    exclude: Path | None = None,
    report: Callable[[str], None] | None = None,
) -> list[Path]:
    """The files named by `spec`, in order, each once: a file, a directory, a glob (`**` allowed), or a list of these.

    A directory's and a glob's files are sorted; a directory keeps only files of `rules.suffixes`, and so does a glob
    when `rules.others` is "ignore" (naming such a file is then always an error). A missing path, a glob or
    directory with no file, and under `others="report"` a file of another type are passed to `report` (which may
    raise, or count and skip them) or, without one, raised as `rules.error`; so is no file at all, always, and a
    file named twice when `rules.duplicate` words it. Files under `exclude` are left out.
    """
    items = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    kinds = rules.suffixes
    words = {"items": items, "cwd": os.getcwd(), "kinds": "/".join(kinds), "suffixes": ", ".join(kinds)}

    def problem(text: str, **fields) -> None:
        message = text.format(**words, **fields)
        if report is None:
            raise rules.error(message)
        report(message)

    found: dict[Path, tuple[Path, str]] = {}  # resolved path -> (path as found, the item that named it)
    for item in map(str, items):
        if rules.directories and os.path.isdir(item):
            listing = Path(item).rglob("*") if rules.directories == "recursive" else Path(item).iterdir()
            matches = sorted((p for p in listing if p.is_file() and p.name.endswith(rules.suffixes)), key=str)
            empty = rules.empty_dir
        elif glob.has_magic(item):
            # a directory a glob matches is passed over where directories are inputs, else reported as one
            keep = os.path.isfile if rules.directories else os.path.exists
            matches = sorted((Path(p) for p in glob.glob(item, recursive=True) if keep(p)), key=str)
            if rules.others == "ignore":
                matches = [p for p in matches if p.name.endswith(rules.suffixes)]
            empty = rules.no_match
        else:
            matches, empty = [Path(item)], rules.missing
        if exclude is not None:
            matches = [p for p in matches if not p.resolve().is_relative_to(exclude)]
        if not matches:
            problem(empty, item=item, path=item, hint="")
        for path in matches:
            hint = next((h for piece, h in rules.hints.items() if piece in path.name), "")
            fields = {"item": item, "path": path, "hint": hint}
            if not path.is_file():
                problem(rules.directory if rules.directory and path.is_dir() else rules.missing, **fields)
            elif not path.name.endswith(rules.suffixes):
                if rules.others == "ignore":
                    raise rules.error(rules.unsupported.format(**words, **fields))
                problem(rules.unsupported, **fields)
            elif (key := path.resolve()) not in found:
                found[key] = (path, item)
            elif rules.duplicate:
                raise rules.error(rules.duplicate.format(**words, **fields, first=found[key][1]))
    if not found:
        raise rules.error(rules.nothing.format(**words))
    return [p for p, _ in found.values()]
