"""data/build_default_corpus.py: the embedded corpus from the Python installation, split and sharded."""

import hashlib
import inspect
import json
import os
import pydoc_data.topics
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from data import build_default_corpus as bdc

REPO = Path(__file__).resolve().parents[2]
CANARY = "canary-value-8c1e2f"


def read_split(folder):
    docs = []
    for p in sorted(Path(folder).glob("part-*.jsonl.zst")):
        with open(p, "rb") as f:
            lines = zstandard.ZstdDecompressor().stream_reader(f).read().decode().splitlines()
        assert len(lines) <= 64
        docs += [json.loads(line) for line in lines]
    return docs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build through the command line, with a canary in the environment that must not reach the corpus."""
    out = tmp_path_factory.mktemp("corpus")
    env = {**os.environ, "CORPUS_TEST_CANARY": CANARY}
    cmd = [sys.executable, "-m", "data.build_default_corpus", "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return out, r.stdout, {split: read_split(out / split) for split in ("train", "valid")}


def test_size_split_and_summary(built):
    out, stdout, docs = built
    train, valid = docs["train"], docs["valid"]
    assert len(train) + len(valid) > 300
    text_bytes = sum(len(d["text"].encode()) for d in train + valid)
    assert text_bytes > 1_500_000
    assert f"{len(train) + len(valid)} documents ({len(train)} train, {len(valid)} valid)" in stdout
    assert f"{text_bytes / 1e6:.2f} MB of text" in stdout
    # the held-out split, recomputed from the titles: 5% by the first 8 bytes of sha256
    titles = [d["meta"]["title"] for d in train + valid]
    assert len(set(titles)) == len(titles)
    held_out = {t for t in titles if int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "big") % 1000 < 50}
    assert {d["meta"]["title"] for d in valid} == held_out
    sha = [int.from_bytes(hashlib.sha256(d["meta"]["title"].encode()).digest()[:8], "big") for d in train]
    assert sha == sorted(sha)  # a fixed shuffle: shards mix topics and modules
    assert 0.02 < len(valid) / len(titles) < 0.10
    assert all(d["meta"]["source"] == "python-docs" for d in train + valid)
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["totals"]["lines"] == len(train) and manifest["options"]["source"] == "python-docs"


def test_topics_and_module_documents_match_python(built):
    _, _, docs = built
    by_title = {d["meta"]["title"]: d for d in docs["train"] + docs["valid"]}
    for key, text in pydoc_data.topics.topics.items():
        assert by_title[f"topic {key}"]["text"] == text.strip()
        assert by_title[f"topic {key}"]["meta"]["kind"] == "topic"
    import json as json_module

    doc = by_title["module json"]["text"]
    assert doc.startswith("Module json\n\n" + inspect.cleandoc(json_module.__doc__))
    assert "json.dumps(obj, *, skipkeys=False, ensure_ascii=True" in doc
    assert inspect.cleandoc(json_module.dumps.__doc__) in doc
    assert "class json.decoder.JSONDecoder(*, object_hook=None" in by_title["module json.decoder"]["text"]
    assert "JSONDecoder.decode(self, s, _w=...)" in by_title["module json.decoder"]["text"]  # a bound method: ...


def test_no_excluded_module_and_nothing_machine_specific(built):
    _, _, docs = built
    titles = {d["meta"]["title"] for d in docs["train"] + docs["valid"]}
    for name in ("this", "antigravity", "tkinter", "turtle", "idlelib", "test", "lib2to3"):
        assert f"module {name}" not in titles
        assert not any(t.startswith(f"module {name}.") for t in titles)
    assert not any(t.startswith("module encodings.") for t in titles)
    text = "".join(d["text"] for d in docs["train"] + docs["valid"])
    assert CANARY not in text  # cgi.parse(environ=os.environ) would print the whole environment
    assert sys.prefix not in text and os.path.expanduser("~") + "/" not in text
    assert " at 0x" not in text


def test_rebuild_writes_nothing(built):
    out, _, _ = built
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*")) if p.is_file()}
    summary = bdc.build(out)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before
    assert summary["train"] + summary["valid"] == summary["documents"]


def test_a_crashing_or_hanging_import_costs_only_that_module(monkeypatch):
    """The child is faked: it writes results until it meets the bad module, then dies or hangs."""
    calls = []

    def fake_run(cmd, **kw):
        names_path, results_path = cmd[-2], cmd[-1]
        names = json.loads(Path(names_path).read_text())
        calls.append(names)
        with open(results_path, "w") as f:
            for name in names:
                if name == "crashes":
                    f.write('{"name": "crashes", "te')  # died in the middle of a line
                    return subprocess.CompletedProcess(cmd, -11)
                if name == "hangs":
                    raise subprocess.TimeoutExpired(cmd, kw["timeout"])
                f.write(
                    json.dumps(
                        {"name": name, "text": f"doc of {name}"}
                        if name != "gone"
                        else {"name": name, "skipped": "ImportError: x"}
                    )
                    + "\n"
                )
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bdc.subprocess, "run", fake_run)
    docs, skipped = bdc.module_documents(["a", "crashes", "b", "gone", "hangs", "c"])
    assert docs == {"a": "doc of a", "b": "doc of b", "c": "doc of c"}
    assert skipped == {
        "crashes": "the importer exited with status -11",
        "gone": "ImportError: x",
        "hangs": "the importer hung",
    }
    assert calls == [["a", "crashes", "b", "gone", "hangs", "c"], ["b", "gone", "hangs", "c"], ["c"]]


def test_split_holds_out_at_least_one_document():
    docs = [("module a", "module", "x"), ("module b", "module", "y")]
    split = bdc.split_documents(docs)
    assert len(split["valid"]) == 1 and len(split["train"]) == 1
    assert split["valid"][0][0] == min(["module a", "module b"], key=bdc.title_hash)
