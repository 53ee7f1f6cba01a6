"""data/shard.py: lines in = lines out, shard limits, manifest, resume, idempotence, bad input, the download scripts."""

import gzip
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from data import records
from data import shard as shard_mod
from data.shard import MAX_LINES_PER_SHARD, ShardError, ShardOptions, build_parser, shard

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"


def read_shard(path):
    """Independent decoder: zstandard's stream reader (shard.py reads with decompressobj), then json per line."""
    with open(path, "rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read()
    assert raw.endswith(b"\n")
    return [json.loads(line) for line in raw.decode("utf-8").split("\n")[:-1]]


def read_out(out):
    docs = []
    for p in sorted(Path(out).glob("part-*.jsonl.zst")):
        docs += read_shard(p)
    return docs


def snapshot(out):
    """Bytes, mtime and inode of every file: equal snapshots mean nothing was rewritten."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(Path(out).iterdir())}


def contents(out):
    return {name: data for name, (data, _, _) in snapshot(out).items()}


def write_jsonl(path, records):
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    if path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor(level=1).compress(data)
    elif path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)


@pytest.fixture
def corpus(tmp_path):
    """Three inputs in three formats, 23 + 17 + 31 records, some with their own meta."""
    src = tmp_path / "src"
    src.mkdir()
    expected = []
    for name, n in [("a.jsonl", 23), ("b.jsonl.zst", 17), ("c.json.gz", 31)]:
        recs = [{"text": f"{name} doc {i}\r\nsecond line é 中", "meta": {"k": i}} for i in range(n)]
        write_jsonl(src / name, recs)
        expected += [(name, i + 1, r) for i, r in enumerate(recs)]
    return src, expected


def run(src, out, workers=1, **kw):
    return shard(
        [str(src / "*")], out, ShardOptions(**{"lines_per_shard": 10, "source": "corpus", **kw}), workers=workers
    )


def test_lines_in_equal_lines_out_across_inputs_and_shards(corpus, tmp_path):
    src, expected = corpus
    manifest = run(src, tmp_path / "out")
    docs = read_out(tmp_path / "out")
    assert len(docs) == len(expected) == 71
    for doc, (name, line, rec) in zip(docs, expected, strict=True):
        assert doc["text"] == rec["text"].replace("\r\n", "\n")
        assert doc["meta"] == {"source": "corpus", "file": name, "line": line, "k": rec["meta"]["k"]}
    sizes = [len(read_shard(p)) for p in sorted((tmp_path / "out").glob("part-*.jsonl.zst"))]
    assert sizes == [10] * 7 + [1]
    assert [s["lines"] for s in manifest["shards"]] == sizes


def test_default_and_maximum_lines_per_shard(tmp_path):
    assert ShardOptions().lines_per_shard == MAX_LINES_PER_SHARD == 16384
    n = MAX_LINES_PER_SHARD + 5
    (tmp_path / "big.txt").write_text("".join(f"{i}\n" for i in range(n)))
    manifest = shard([tmp_path / "big.txt"], tmp_path / "out", ShardOptions(txt_mode="line"))
    assert [s["lines"] for s in manifest["shards"]] == [16384, 5]
    docs = read_out(tmp_path / "out")
    assert [d["text"] for d in docs] == [str(i) for i in range(n)]
    assert [d["meta"]["line"] for d in docs[-2:]] == [n - 1, n]
    with pytest.raises(ShardError, match=r"--lines-per-shard=16385: must be between 1 and 16384"):
        shard([tmp_path / "big.txt"], tmp_path / "o2", ShardOptions(lines_per_shard=16385))


def test_manifest_recomputed_independently(corpus, tmp_path):
    src, _ = corpus
    run(src, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    files = sorted(p.name for p in (tmp_path / "out").glob("part-*.jsonl.zst"))
    assert [s["file"] for s in manifest["shards"]] == files
    for s in manifest["shards"]:
        blob = (tmp_path / "out" / s["file"]).read_bytes()
        assert s["bytes"] == len(blob) == os.path.getsize(tmp_path / "out" / s["file"])
        assert s["sha256"] == hashlib.sha256(blob).hexdigest()
        docs = read_shard(tmp_path / "out" / s["file"])
        assert s["lines"] == len(docs)
        assert s["raw_bytes"] == len(zstandard.ZstdDecompressor().decompress(blob))  # content size is in the frame
        # the source ranges name the first and last document's origin
        assert (s["source"][0]["file"], s["source"][0]["first_line"]) == (
            docs[0]["meta"]["file"],
            docs[0]["meta"]["line"],
        )
        assert (s["source"][-1]["file"], s["source"][-1]["last_line"]) == (
            docs[-1]["meta"]["file"],
            docs[-1]["meta"]["line"],
        )
    assert manifest["complete"] is True
    assert manifest["totals"] == {"shards": 8, "lines": 71, "bytes": sum(s["bytes"] for s in manifest["shards"])} | {
        "skipped": 0
    }
    assert [(i["name"], i["size"]) for i in manifest["inputs"]] == [
        (n, (src / n).stat().st_size) for n in ("a.jsonl", "b.jsonl.zst", "c.json.gz")
    ]
    assert manifest["options"] == {
        "text_field": "text",
        "zstd_level": 3,
        "lines_per_shard": 10,
        "source": "corpus",
        "txt_mode": "paragraph",
        "on_error": "raise",
    }


def test_workers_do_not_change_the_bytes(corpus, tmp_path):
    src, _ = corpus
    run(src, tmp_path / "w1", workers=1)
    run(src, tmp_path / "w2", workers=2)
    assert contents(tmp_path / "w1") == contents(tmp_path / "w2")


def test_rerun_is_idempotent(corpus, tmp_path, capsys):
    src, _ = corpus
    run(src, tmp_path / "out")
    before = snapshot(tmp_path / "out")
    run(src, tmp_path / "out")
    assert snapshot(tmp_path / "out") == before
    assert "up to date (8 shards); nothing written" in capsys.readouterr().err


def test_resume_after_a_crash_equals_an_uninterrupted_run(corpus, tmp_path, monkeypatch):
    src, _ = corpus
    run(src, tmp_path / "ref")
    real, calls = shard_mod._write_shard, []

    def crash_on_fourth(*args):
        calls.append(args[0])
        if len(calls) == 4:
            raise KeyboardInterrupt  # like ^C in the middle of the fourth shard
        return real(*args)

    monkeypatch.setattr(shard_mod, "_write_shard", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        run(src, tmp_path / "out")
    monkeypatch.setattr(shard_mod, "_write_shard", real)
    partial = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert partial["complete"] is False and len(partial["shards"]) == 3
    first_three = {k: v for k, v in snapshot(tmp_path / "out").items() if k.startswith("part-")}
    assert len(first_three) == 3
    written = []
    monkeypatch.setattr(shard_mod, "_write_shard", lambda *a: written.append(Path(a[0]).name) or real(*a))
    run(src, tmp_path / "out")
    assert written == [f"part-{i:05d}.jsonl.zst" for i in range(3, 8)]  # the first three were not redone
    assert all(snapshot(tmp_path / "out")[k] == v for k, v in first_three.items())
    assert contents(tmp_path / "out") == contents(tmp_path / "ref")


def test_resume_after_losing_the_last_shards_and_entries(corpus, tmp_path):
    src, _ = corpus
    run(src, tmp_path / "ref", lines_per_shard=4)
    run(src, tmp_path / "out", lines_per_shard=4)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    for s in m["shards"][-5:]:
        (tmp_path / "out" / s["file"]).unlink()
    (tmp_path / "out" / m["shards"][-6]["file"]).unlink()  # one more file lost, its entry kept
    m["shards"] = m["shards"][:-5]
    m["complete"] = False
    del m["totals"]
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(m))
    run(src, tmp_path / "out", lines_per_shard=4)
    assert contents(tmp_path / "out") == contents(tmp_path / "ref")


def test_other_options_or_inputs_are_refused_unless_overwrite(corpus, tmp_path):
    src, _ = corpus
    run(src, tmp_path / "out")
    with pytest.raises(ShardError, match=r"belongs to another job: options differ \(zstd_level: 3 -> 5\).*--overwrite"):
        run(src, tmp_path / "out", zstd_level=5)
    (src / "a.jsonl").write_text('{"text": "changed"}\n')
    with pytest.raises(ShardError, match=r"inputs differ .*changed size/mtime.*--overwrite"):
        run(src, tmp_path / "out")
    opts = ShardOptions(lines_per_shard=10, source="corpus")
    manifest = shard([str(src / "*")], tmp_path / "out", opts, overwrite=True)
    assert manifest["totals"]["lines"] == 1 + 17 + 31
    assert len(list((tmp_path / "out").glob("part-*"))) == 5  # the old 8 shards are gone
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "part-00000.jsonl.zst").write_bytes(b"x")
    with pytest.raises(ShardError, match=r"holds 1 part-\*.jsonl.zst files but no manifest.json"):
        run(src, tmp_path / "foreign")
    (tmp_path / "foreign" / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match=r"manifest.json belongs to another job: it is not a manifest this tool wrote"):
        run(src, tmp_path / "foreign")


def test_txt_modes_and_crlf(tmp_path):
    text = "Title\r\n\r\nfirst para line 1\r\nline 2\r\n \t \r\n\r\nsecond para\r\n"
    (tmp_path / "book.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    expected = {
        "paragraph": [("Title", 1), ("first para line 1\nline 2", 3), ("second para", 7)],
        "line": [("Title", 1), ("first para line 1", 3), ("line 2", 4), ("second para", 7)],
        "file": [("Title\n\nfirst para line 1\nline 2\n \t \n\nsecond para", 1)],
    }
    for mode, want in expected.items():
        shard([tmp_path / "book.txt"], tmp_path / mode, ShardOptions(txt_mode=mode))
        assert [(d["text"], d["meta"]["line"]) for d in read_out(tmp_path / mode)] == want


def test_meta_is_kept_and_collisions_renamed(tmp_path):
    recs = [
        {"content": "x", "title": "T", "meta": {"source": "orig", "line": 99, "a": 1}},
        {"content": "y", "meta": {"source": "wiki"}},
    ]
    write_jsonl(tmp_path / "in.jsonl", recs)
    shard([tmp_path / "in.jsonl"], tmp_path / "out", ShardOptions(text_field="content", source="wiki"))
    docs = read_out(tmp_path / "out")
    assert docs[0] == {
        "text": "x",
        "meta": {"source": "wiki", "file": "in.jsonl", "line": 1, "input_source": "orig", "input_line": 99, "a": 1}
        | {"title": "T"},
    }
    assert docs[1]["meta"] == {"source": "wiki", "file": "in.jsonl", "line": 2}


def test_json_array_input_like_wudao(tmp_path):
    items = [{"id": i, "title": f"t{i}", "content": f"正文 {i}", "dataType": "news"} for i in range(5)]
    (tmp_path / "part-1.json").write_text(json.dumps(items, ensure_ascii=False, indent=2))
    opts = ShardOptions(text_field="content", lines_per_shard=2)
    manifest = shard([tmp_path], tmp_path / "out", opts)
    docs = read_out(tmp_path / "out")
    assert [d["text"] for d in docs] == [it["content"] for it in items]
    assert docs[3]["meta"] == {"source": "out", "file": "part-1.json", "line": 4, "id": 3, "title": "t3"} | {
        "dataType": "news"
    }
    assert [s["source"] for s in manifest["shards"]][1] == [{"file": "part-1.json", "first_line": 3, "last_line": 4}]


@pytest.mark.skipif(not (SHARED / "arxiv_sample.jsonl.zst").exists(), reason="shared test data absent")
def test_real_jsonl_zst_and_crlf_book(tmp_path):
    shard([SHARED / "arxiv_sample.jsonl.zst", SHARED / "hongloumeng_zh.txt"], tmp_path / "out")
    docs = read_out(tmp_path / "out")
    ref = [json.loads(line) for line in (SHARED / "arxiv_sample.jsonl").read_text().splitlines()]
    assert [d["text"] for d in docs[:20]] == [r["text"].replace("\r\n", "\n") for r in ref]
    assert docs[5]["meta"] == {"source": "out", "file": "arxiv_sample.jsonl.zst", "line": 6} | ref[5]["meta"]
    book = (SHARED / "hongloumeng_zh.txt").read_text(encoding="utf-8").replace("\r\n", "\n")
    paragraphs = [p for p in re.split(r"\n(?:[^\S\n]*\n)+", book.strip("\n")) if p.strip()]
    assert [d["text"] for d in docs[20:]] == paragraphs
    assert all("\r" not in d["text"] for d in docs[20:])


# -- bad input: each error names the file and the line; --on-error skip counts and warns instead


def good_and_bad(tmp_path, bad_line: bytes, name="in.jsonl"):
    lines = [json.dumps({"text": f"ok {i}"}).encode() for i in range(5)]
    lines.insert(2, bad_line)  # line 3 is the bad one
    (tmp_path / name).write_bytes(b"\n".join(lines) + b"\n")
    return tmp_path / name


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (b'{"text": "unterminated', r"in\.jsonl, line 3: invalid JSON at column 10: Unterminated string"),
        (b'{"body": "no text field"}', r"in\.jsonl, line 3: no 'text' field \(keys: body\); choose .* --text-field"),
        (b'{"text": "caf\xe9"}', r"in\.jsonl, line 3: invalid UTF-8 at byte 13 of the line \(b'\\xe9\"}'\)"),
        (b'{"text": 7}', r"in\.jsonl, line 3: field 'text' is int, not a string"),
        (b'["text"]', r"in\.jsonl, line 3: expected a JSON object, got list"),
        (b'{"text": "\\ud800"}', r"in\.jsonl, line 3: unpaired surrogate '\\ud800'"),
    ],
)
def test_bad_record_raises_then_skips(tmp_path, capsys, bad, message):
    path = good_and_bad(tmp_path, bad)
    with pytest.raises(ShardError, match=message + r".*pass --on-error skip"):
        shard([path], tmp_path / "out")
    manifest = shard([path], tmp_path / "skip", ShardOptions(on_error="skip"))
    assert [d["text"] for d in read_out(tmp_path / "skip")] == [f"ok {i}" for i in range(5)]
    assert manifest["totals"]["skipped"] == 1 and manifest["shards"][0]["skipped"] == 1
    assert re.search("warning: skipped: .*" + message, capsys.readouterr().err)


def doc_text(j):
    return f"document {j} {hashlib.sha256(str(j).encode()).hexdigest()}"  # compresses poorly: many zstd blocks


def zst_frames(*counts):
    """One zstd frame per count of JSON lines (with checksums), numbered on across frames."""
    blob, i = b"", 0
    for n in counts:
        data = "".join(json.dumps({"text": doc_text(j)}) + "\n" for j in range(i, i + n)).encode()
        blob += zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)
        i += n
    return blob


def test_truncated_zst_keeps_only_whole_frames(tmp_path, capsys):
    blob = zst_frames(1000, 20000)
    (tmp_path / "cut.jsonl.zst").write_bytes(blob[: len(blob) - 2000])  # the cut falls inside the second frame
    with pytest.raises(ShardError, match=r"cut\.jsonl\.zst, line 1001: truncated zstd data: the file ends inside a"):
        shard([tmp_path / "cut.jsonl.zst"], tmp_path / "out")
    write_jsonl(tmp_path / "next.jsonl", [{"text": "after"}])
    opts = ShardOptions(on_error="skip")
    manifest = shard([tmp_path / "cut.jsonl.zst", tmp_path / "next.jsonl"], tmp_path / "o2", opts)
    # the first frame passed its checksum; nothing of the cut frame is used; the next file goes on
    assert [d["text"] for d in read_out(tmp_path / "o2")] == [doc_text(j) for j in range(1000)] + ["after"]
    assert manifest["totals"]["skipped"] == 1
    assert "warning: skipped: " in capsys.readouterr().err


def test_corrupt_zst_and_gzip(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "READ_SIZE", 4096)  # small reads: the bad frame's data comes out before its end
    blob = bytearray(zst_frames(300, 3000))
    blob[len(blob) - 5000] ^= 0xFF  # inside the second frame: found only by its checksum, after its data came out
    (tmp_path / "bad.jsonl.zst").write_bytes(bytes(blob))
    with pytest.raises(ShardError, match=r"bad\.jsonl\.zst, line 301: damaged zstd data .*(checksum|corrupt)"):
        shard([tmp_path / "bad.jsonl.zst"], tmp_path / "out", ShardOptions(lines_per_shard=100))
    first_frame = [doc_text(j) for j in range(300)]
    assert [d["text"] for d in read_out(tmp_path / "out")] == first_frame  # nothing of the bad frame reached a shard
    shard([tmp_path / "bad.jsonl.zst"], tmp_path / "skip", ShardOptions(on_error="skip"))
    assert [d["text"] for d in read_out(tmp_path / "skip")] == first_frame
    (tmp_path / "junk.jsonl.zst").write_bytes(b"not zstd at all")
    with pytest.raises(ShardError, match=r"junk\.jsonl\.zst, line 1: damaged zstd data"):
        shard([tmp_path / "junk.jsonl.zst"], tmp_path / "o2")
    (tmp_path / "cut.json.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:-30])
    with pytest.raises(ShardError, match=r"cut\.json\.gz, line 1: damaged or truncated gzip data"):
        shard([tmp_path / "cut.json.gz"], tmp_path / "o3")


def test_glob_that_matches_nothing(tmp_path, capsys):
    with pytest.raises(ShardError, match=r"input glob '.*nothing-\*\.jsonl' matches no file"):
        shard([str(tmp_path / "nothing-*.jsonl")], tmp_path / "out")
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    opts = ShardOptions(on_error="skip")
    shard([str(tmp_path / "nothing-*.jsonl"), tmp_path / "a.jsonl"], tmp_path / "out", opts)
    assert "warning: skipped: input glob" in capsys.readouterr().err
    with pytest.raises(ShardError, match=r"input file '.*missing\.jsonl' does not exist"):
        shard([tmp_path / "missing.jsonl"], tmp_path / "o2")
    with pytest.raises(ShardError, match=r"input .*a\.jsonl is given twice"):
        shard([tmp_path / "a.jsonl", str(tmp_path / "*.jsonl")], tmp_path / "o4")
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    with pytest.raises(ShardError, match=r"t\.parquet: unsupported type \(no parquet reader installed here"):
        shard([tmp_path / "t.parquet"], tmp_path / "o3")


def test_cli(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"text": f"t{i}"} for i in range(7)])
    cmd = [sys.executable, "-m", "data.shard", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out")]
    r = subprocess.run([*cmd, "--lines-per-shard", "3", "--workers", "2"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [d["text"] for d in read_out(tmp_path / "out")] == [f"t{i}" for i in range(7)]
    r = subprocess.run([*cmd, "--lines-per-shard", "4"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1
    assert "error: " in r.stderr and "options differ (lines_per_shard: 3 -> 4)" in r.stderr


# -- the download scripts: syntax, and a --dry-run that prints the commands without touching the network


@pytest.mark.parametrize("script", ["download_the_pile.sh", "download_wudao.sh"])
def test_download_script_dry_run(tmp_path, script):
    path = REPO / "data" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    env = {**os.environ, "PATH": os.environ["PATH"]}
    r = subprocess.run(["bash", str(path), "--dry-run", str(tmp_path / "raw")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "curl" in out and "-C -" in out and "--retry" in out
    assert not (tmp_path / "raw").exists()  # a dry run writes nothing
    shard_cmds = [line for line in out.splitlines() if "data.shard" in line]
    assert shard_cmds
    for line in shard_cmds:  # the printed shard step parses with the real CLI
        argv = shlex.split(line.lstrip("+ "))
        args = build_parser().parse_args(argv[argv.index("data.shard") + 1 :])
        assert args.out and args.inputs
    assert "sha256" in out


def test_pile_script_verifies_checksums_and_shards_without_network(tmp_path):
    """Files already downloaded: no curl runs; a good checksum passes, then the shard step runs for real."""
    raw = tmp_path / "raw"
    (raw / "train").mkdir(parents=True)
    sums = []
    for rel in ["val.jsonl.zst", "test.jsonl.zst", "train/00.jsonl.zst"]:
        write_jsonl(raw / rel, [{"text": f"{rel} {i}", "meta": {"pile_set_name": "Pile-CC"}} for i in range(3)])
        sums.append(f"{hashlib.sha256((raw / rel).read_bytes()).hexdigest()}  {rel}\n")
    (raw / "SHA256SUMS").write_text("".join(sums))
    env = {**os.environ, "PYTHON": sys.executable}
    cmd = ["bash", str(REPO / "data" / "download_the_pile.sh"), "--train-files", "1", str(raw), str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert [d["text"] for d in read_out(tmp_path / "out" / "pile")] == [f"train/00.jsonl.zst {i}" for i in range(3)]
    assert read_out(tmp_path / "out" / "pile_val")[0]["meta"]["pile_set_name"] == "Pile-CC"
    (raw / "SHA256SUMS").write_text("".join(sums).replace(sums[0][:64], "0" * 64))
    (raw / "val.jsonl.zst.sha256").unlink()  # forget that it was verified
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 1
    assert f"error: {raw}/val.jsonl.zst: sha256 {sums[0][:64]}, the Hub says {'0' * 64}; delete the file" in r.stderr


def test_wudao_script_shards_an_extracted_folder(tmp_path):
    folder = tmp_path / "raw" / "WuDaoCorpus2.0_base_200G"
    folder.mkdir(parents=True)
    items = [{"id": i, "title": f"标题{i}", "content": f"内容{i}", "dataType": "百科"} for i in range(4)]
    (folder / "part-2021009337.json").write_text(json.dumps(items, ensure_ascii=False))
    (folder / ".extracted").touch()
    cmd = ["bash", str(REPO / "data" / "download_wudao.sh"), str(tmp_path / "raw"), str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr
    docs = read_out(tmp_path / "out" / "wudao")
    assert [d["text"] for d in docs] == [f"内容{i}" for i in range(4)]
    assert docs[1]["meta"] == {"source": "wudao", "file": "part-2021009337.json", "line": 2, "id": 1} | {
        "title": "标题1",
        "dataType": "百科",
    }
