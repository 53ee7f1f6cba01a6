"""dataset/lines.py and dataset/jsonl_zst.py: incremental zstd decoding, resume positions, every kind of bad input."""

import gzip
import json
import tracemalloc
import warnings
from collections import Counter
from pathlib import Path

import pytest
import zstandard

from dataset.jsonl_zst import DataWarning, iter_documents, iter_records, iter_texts, resolve_paths
from dataset.lines import DataError, StreamFault, decompressed_size, iter_lines

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def jsonl_bytes(texts, field="text"):
    return b"".join(json.dumps({field: t, "meta": {"i": i}}).encode() + b"\n" for i, t in enumerate(texts))


def write_zst(path, data, *, frames=1, checksum=True):
    """`data` compressed as `frames` independent zstd frames (as `zstd -T0` or a sharder appending writes)."""
    cut = [len(data) * i // frames for i in range(frames + 1)]
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=checksum)
    path.write_bytes(b"".join(cctx.compress(data[a:b]) for a, b in zip(cut, cut[1:], strict=False)))
    return path


TEXTS = [f"doc {i} " + "é中" * (i % 7) + "x" * (i * 37 % 500) for i in range(300)]


def test_zst_equals_plain_across_frames_and_blocks(tmp_path):
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(jsonl_bytes(TEXTS))
    zst = write_zst(tmp_path / "a.jsonl.zst", plain.read_bytes(), frames=4)
    assert list(iter_texts(plain)) == TEXTS
    assert list(iter_texts(zst)) == TEXTS
    # Lines spanning many tiny blocks decode the same; offsets point at the line in the decompressed bytes.
    raw = plain.read_bytes()
    lines = list(iter_lines(zst, block_size=7))
    assert [ln for ln, *_ in lines] == list(range(1, 301))
    for _, offset, end, line in lines:
        assert raw[offset:end] == line + b"\n"


def test_decompressed_size_from_frame_headers(tmp_path):
    data = jsonl_bytes(TEXTS)
    assert decompressed_size(write_zst(tmp_path / "a.jsonl.zst", data, frames=3)) == len(data)
    skippable = (0x184D2A50).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"12345"
    (tmp_path / "s.jsonl.zst").write_bytes(skippable + (tmp_path / "a.jsonl.zst").read_bytes())
    assert decompressed_size(tmp_path / "s.jsonl.zst") == len(data)
    (tmp_path / "a.jsonl").write_bytes(data)
    assert decompressed_size(tmp_path / "a.jsonl") == len(data)
    with open(tmp_path / "stream.jsonl.zst", "wb") as f, zstandard.ZstdCompressor().stream_writer(f) as w:
        w.write(data)  # a stream: the frame does not record its size
    assert decompressed_size(tmp_path / "stream.jsonl.zst") is None
    blob = (tmp_path / "a.jsonl.zst").read_bytes()
    (tmp_path / "cut.jsonl.zst").write_bytes(blob[:-10])
    assert decompressed_size(tmp_path / "cut.jsonl.zst") is None
    (tmp_path / "junk.jsonl.zst").write_bytes(b"not zstd")
    assert decompressed_size(tmp_path / "junk.jsonl.zst") is None


def test_resume_by_line_and_by_offset(tmp_path):
    zst = write_zst(tmp_path / "a.jsonl.zst", jsonl_bytes(TEXTS), frames=3)
    docs = list(iter_documents(zst))
    d = docs[123]
    by_offset = list(iter_records(zst, start_line=d.line, start_offset=d.offset))
    by_line = list(iter_records(zst, start_line=d.line))
    assert by_offset == by_line == [(i + 1, t) for i, t in enumerate(TEXTS)][123:]
    assert list(iter_records(zst, start_line=301, start_offset=docs[-1].end)) == []  # the end of the file
    with pytest.raises(DataError, match=r"a\.jsonl\.zst: byte offset .* does not start a line; the file changed"):
        list(iter_records(zst, start_line=d.line, start_offset=d.offset + 3))
    with pytest.raises(DataError, match="past the end of the file"):
        list(iter_records(zst, start_line=400, start_offset=docs[-1].end + 10))


def test_txt_crlf_blank_lines_and_last_line_without_newline(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"first line\r\n\r\nsecond\r\nthird without newline")
    skipped = Counter()
    assert list(iter_records(p, skipped=skipped)) == [(1, "first line"), (3, "second"), (4, "third without newline")]
    assert skipped == {"blank_line": 1}
    last = list(iter_documents(p))[-1]
    assert list(iter_records(p, start_line=5, start_offset=last.end)) == []
    z = write_zst(tmp_path / "a.txt.zst", p.read_bytes())
    assert list(iter_records(z)) == list(iter_records(p))
    bom = b"\xef\xbb\xbf"
    for name, data in (("b.txt", b"first\nsecond\n"), ("b.jsonl", b'{"text": "first"}\n{"text": "second"}\n')):
        (tmp_path / name).write_bytes(bom + data)
        assert list(iter_texts(tmp_path / name)) == ["first", "second"]
        assert list(iter_texts(write_zst(tmp_path / (name + ".zst"), bom + data))) == ["first", "second"]


def test_stride_partitions_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(jsonl_bytes(TEXTS))
    parts = [[d.line for d in iter_documents(p, stride=3, phase=k)] for k in range(3)]
    assert sorted(sum(parts, [])) == list(range(1, 301))
    assert parts[1][:3] == [2, 5, 8]


def test_memory_is_bounded_by_a_block_not_the_file(tmp_path):
    # ~12 MB decompressed; the reader must hold about one block and one line, not the file.
    line = json.dumps({"text": "word " * 200}).encode() + b"\n"
    zst = write_zst(tmp_path / "big.jsonl.zst", line * 12_000, frames=2, checksum=False)
    tracemalloc.start()
    n = sum(1 for _ in iter_documents(zst))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 12_000
    assert peak < 2_000_000, peak


BAD_LINES = [
    (b'{"text": "ok"}\n{"text": "broken\n{"text": "ok"}\n', "invalid_json", r"bad\.jsonl:2: invalid JSON"),
    (b'{"text": "ok"}\n{"body": "x"}\n', "missing_field", r"bad\.jsonl:2: no 'text' field \(found \['body'\]\)"),
    (b'{"text": "ok"}\n{"text": 5}\n', "missing_field", r"bad\.jsonl:2: field 'text' is int, not a string"),
    (b'{"text": "ok"}\n["text"]\n', "missing_field", r"bad\.jsonl:2: no 'text' field"),
    (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', "invalid_utf8", r"bad\.jsonl:2: invalid UTF-8 at byte 10"),
]


@pytest.mark.parametrize("data,reason,message", BAD_LINES, ids=[b[1] + str(i) for i, b in enumerate(BAD_LINES)])
def test_bad_lines_raise_or_skip(tmp_path, data, reason, message):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(data)
    with pytest.raises(DataError, match=message + r".*set on_error=skip"):
        list(iter_texts(p))
    skipped = Counter()
    with pytest.warns(DataWarning, match=message):
        texts = list(iter_texts(p, on_error="skip", skipped=skipped))
    assert skipped == {reason: 1}
    assert texts == ["ok"] * data.count(b'"ok"')


def test_blank_and_empty_texts_are_counted_not_errors(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"text": "a"}\n\n{"text": ""}\n{"text": "b"}\n')
    skipped = Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(iter_texts(p, skipped=skipped)) == ["a", "b"]
    assert skipped == {"blank_line": 1, "empty_text": 1}


def frames_of(data, frames=4):
    """`data` as `frames` checksummed frames: the compressed bytes, where each frame starts, where its data starts."""
    cut = [len(data) * i // frames for i in range(frames + 1)]
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
    parts = [cctx.compress(data[a:b]) for a, b in zip(cut, cut[1:], strict=False)]
    starts = [sum(len(p) for p in parts[:i]) for i in range(frames)]
    return b"".join(parts), starts, cut


def whole_lines(prefix):
    return [json.loads(line)["text"] for line in prefix.split(b"\n")[:-1]]


def test_truncated_zst_keeps_only_whole_frames(tmp_path):
    data = jsonl_bytes(TEXTS)
    whole, starts, cut = frames_of(data)
    p = tmp_path / "cut.jsonl.zst"
    p.write_bytes(whole[: starts[2] + 100])  # inside the third frame
    with pytest.raises(
        DataError, match=rf"cut\.jsonl\.zst: truncated zstd stream \(frame at byte {starts[2]} is cut\)"
    ):
        list(iter_texts(p))
    skipped = Counter()
    with pytest.warns(DataWarning, match=r"truncated zstd .* after line \d+, the rest of the file is unreadable"):
        texts = list(iter_texts(p, on_error="skip", skipped=skipped))
    assert skipped == {"truncated_zstd": 1}
    assert texts == whole_lines(data[: cut[2]]) and 0 < len(texts) < len(TEXTS)
    shared, parts = Counter(), []  # three readers sharing the file by stride: the fault is counted once
    with pytest.warns(DataWarning, match="truncated zstd"):
        for k in range(3):
            parts += [d.text for d in iter_documents(p, on_error="skip", stride=3, phase=k, skipped=shared)]
    assert shared == {"truncated_zstd": 1} and sorted(parts) == sorted(texts)
    for k in range(3):
        with pytest.raises(DataError, match="truncated zstd stream"):
            list(iter_documents(p, stride=3, phase=k))
    p.write_bytes(whole[:-2])  # the last frame's checksum is cut
    with pytest.raises(DataError, match="truncated zstd stream"):
        list(iter_texts(p))


def test_corrupt_zst_never_yields_a_byte_of_the_bad_frame(tmp_path):
    data = jsonl_bytes(TEXTS)
    whole, starts, cut = frames_of(data)
    for where in (starts[1] + 40, (starts[1] + starts[2]) // 2, starts[2] - 6):  # early, middle, at the checksum
        bad = bytearray(whole)
        bad[where] ^= 0x5A
        p = tmp_path / "corrupt.jsonl.zst"
        p.write_bytes(bytes(bad))
        with pytest.raises(
            DataError, match=rf"corrupt\.jsonl\.zst: corrupt zstd data in the frame at byte {starts[1]}"
        ):
            list(iter_texts(p))
        skipped = Counter()
        with pytest.warns(DataWarning, match="corrupt zstd"):
            texts = list(iter_texts(p, on_error="skip", skipped=skipped))
        assert skipped == {"corrupt_zstd": 1}
        assert texts == whole_lines(data[: cut[1]])
    q = tmp_path / "plain_named.jsonl.zst"
    q.write_bytes(jsonl_bytes(["a"]))
    with pytest.raises(DataError, match=r"plain_named\.jsonl\.zst: corrupt zstd data \(no zstd frame at byte 0\)"):
        list(iter_texts(q))


def test_garbage_after_whole_frames_keeps_them(tmp_path):
    data = jsonl_bytes(TEXTS)
    whole, _, _ = frames_of(data)
    p = tmp_path / "tail.jsonl.zst"
    p.write_bytes(whole + b"not zstd")
    skipped = Counter()
    with pytest.warns(DataWarning, match=rf"corrupt zstd data \(no zstd frame at byte {len(whole)}\) after line 300"):
        assert list(iter_texts(p, on_error="skip", skipped=skipped)) == TEXTS
    assert skipped == {"corrupt_zstd": 1}


def test_gzip_lines_only_when_the_whole_file_verifies(tmp_path):
    data = b"\xef\xbb\xbf" + jsonl_bytes(TEXTS)
    p = tmp_path / "a.jsonl.gz"
    p.write_bytes(gzip.compress(data))
    assert [raw for *_, raw in iter_lines(p, block_size=100)] == data[3:].split(b"\n")[:-1]
    p.write_bytes(gzip.compress(data)[:-30])
    with pytest.raises(StreamFault, match=r"a\.jsonl\.gz: damaged or truncated gzip data") as info:
        next(iter_lines(p))
    assert info.value.reason == "corrupt_gzip"


def test_empty_shard_missing_file_and_unsupported_type(tmp_path):
    for p in (tmp_path / "e.jsonl", tmp_path / "e2.jsonl.zst", tmp_path / "e3.jsonl"):
        if p.suffix == ".zst":
            write_zst(p, b"")
        else:
            p.write_bytes(b"" if p.name == "e.jsonl" else b"\n\n")
        with pytest.raises(DataError, match=rf"{p.name}: empty shard \(no documents\)"):
            list(iter_texts(p))
        skipped = Counter()
        with pytest.warns(DataWarning, match="empty shard"):
            assert list(iter_texts(p, on_error="skip", skipped=skipped)) == []
        assert skipped["empty_file"] == 1
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        list(iter_texts(tmp_path / "nope.jsonl"))
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(DataError, match=r"m\.json: unsupported file type; use one of \.jsonl"):
        list(iter_texts(tmp_path / "m.json"))
    with pytest.raises(ValueError, match="on_error='ignore': use one of raise, skip"):
        list(iter_texts(tmp_path / "e.jsonl", on_error="ignore"))


def test_warnings_are_capped_per_file(tmp_path):
    p = tmp_path / "many.jsonl"
    p.write_bytes(b"not json\n" * 50 + b'{"text": "x"}\n')
    skipped = Counter()
    with pytest.warns(DataWarning) as record:
        assert list(iter_texts(p, on_error="skip", skipped=skipped)) == ["x"]
    assert skipped == {"invalid_json": 50}
    assert len(record) == 10 and "further skips in this file are counted" in str(record[-1].message)


@pytest.mark.skipif(not (DATA / "arxiv_sample.jsonl.zst").exists(), reason="shared test data absent")
def test_real_arxiv_zst_matches_plain_json():
    expected = [json.loads(line)["text"] for line in (DATA / "arxiv_sample.jsonl").read_text().splitlines()]
    assert list(iter_texts(DATA / "arxiv_sample.jsonl.zst")) == expected
    assert len(expected) == 20


@pytest.mark.skipif(not (DATA / "hongloumeng_zh.txt").exists(), reason="shared test data absent")
def test_real_crlf_chinese_text():
    raw = (DATA / "hongloumeng_zh.txt").read_bytes()
    expected = [ln for ln in raw.decode("utf-8").split("\r\n") if ln.strip()]
    texts = list(iter_texts(DATA / "hongloumeng_zh.txt"))
    assert texts == expected and not any("\r" in t for t in texts)


def test_resolve_paths(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    for name in ("part-00001.jsonl.zst", "part-00000.jsonl.zst", "notes.txt", "manifest.json", "x.jsonl.zst.tmp"):
        (d / name).write_bytes(b"")
    names = ["notes.txt", "part-00000.jsonl.zst", "part-00001.jsonl.zst"]
    assert [p.name for p in resolve_paths(d)] == names  # sorted, manifest and partial files ignored
    assert [p.name for p in resolve_paths(str(d / "*"))] == names
    assert [p.name for p in resolve_paths([str(d / "part-*.zst")])] == names[1:]
    with pytest.raises(DataError, match=r"part-00000\.jsonl\.zst: named twice \(by '.*part-\*\.zst' and '.*shards'\)"):
        resolve_paths([str(d / "part-*.zst"), str(d)])
    with pytest.raises(DataError, match=r"manifest\.json: unsupported file type"):
        resolve_paths(d / "manifest.json")
    with pytest.raises(DataError, match=r"missing: no such file or directory; check the data path"):
        resolve_paths(tmp_path / "missing")
    with pytest.raises(DataError, match=r"directory .*empty holds no \.jsonl/"):
        (tmp_path / "empty").mkdir()
        resolve_paths(tmp_path / "empty")
