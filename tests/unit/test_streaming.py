"""dataset/streaming.py, loader.py, rank_loader.py, packing.py, stream_cli.py: sharding, order, exact resume,
mixtures, bad input.

Layouts (the same global batch at any dp, resume at another dp or global batch size): tests/unit/test_global_batch.py.
"""

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import zstandard

from dataset.jsonl_zst import DataWarning
from dataset.lines import DataError
from dataset.loader import GlobalBatchLoader
from dataset.packing import IGNORE_INDEX, boundaries_in_window, cut_windows, document_ids, make_batch, pad_window
from dataset.rank_loader import build_dataloader
from dataset.sources import DataSource, epoch_order, plan_units
from dataset.stream_cli import main
from dataset.streaming import StreamingDataset
from dataset.tokenizer import Tokenizer
from training.data import SyntheticLoader, TrainData

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
WORDS = "river stone cloud amber falcon willow ember quartz meadow lantern harbor thistle".split()
DOC_ID = re.compile(r"doc-(\w)-(\d+)")


def doc_text(src, k, scale=1):
    rng = random.Random(f"{src}{k}")
    return f"doc-{src}-{k:04d} " + " ".join(rng.choice(WORDS) for _ in range(scale * rng.randint(3, 40)))


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([doc_text(s, k) for s in "abc" for k in range(300)]),
        model_prefix=str(d / "tokenizer"),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=2,
    )
    return Tokenizer(d)


def write_shards(d, src, n_files, per_file, *, scale=1, zst=True):
    """Shards like data/shard.py writes them (plus a manifest.json to ignore); returns every text written."""
    d.mkdir(parents=True, exist_ok=True)
    texts = []
    for f in range(n_files):
        lines = []
        for i in range(per_file):
            texts.append(doc_text(src, f * per_file + i, scale))
            lines.append(json.dumps({"text": texts[-1], "meta": {"file": f}}))
        data = ("\n".join(lines) + "\n").encode()
        if zst:
            (d / f"part-{f:05d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(data))
        else:
            (d / f"part-{f:05d}.jsonl").write_bytes(data)
    (d / "manifest.json").write_text(json.dumps({"files": n_files}))
    return texts


def run(loader, n=None):
    """Batches of a loader with the stream each came from (the loader's next_stream moves past it)."""
    out = []
    for batch in loader:
        out.append(((loader.next_stream - 1) % loader.n_streams, batch))
        if n is not None and len(out) == n:
            break
    return out


def stream_tokens(batches):
    """Per stream, its token stream: input rows concatenated (windows overlap by one) + the last target."""
    streams = {}
    for s, b in batches:
        real = b["targets"] != IGNORE_INDEX
        for row, ok, tgt in zip(b["input_ids"], real, b["targets"], strict=True):
            n = int(ok.sum()) + 1
            ids = streams.setdefault(s, [])
            del ids[-1:]
            ids += row[: n - 1].tolist() + [int(tgt[n - 2])]
    return streams


def docs_of(ids, tok):
    """Decoded documents of a token stream: segments [BOS ... EOS], checked against their own re-encoding."""
    docs, cur = [], []
    for i in ids:
        cur.append(i)
        if i == tok.eos_id:
            assert cur[0] == tok.bos_id
            text = tok.decode(cur)
            assert cur == tok.encode(text, bos=True, eos=True)
            docs.append(text)
            cur = []
    return docs, cur


def batches_equal(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


# ---- packing ----


def test_packing_windows_document_ids_and_padding():
    stream = list(range(100, 123))
    windows, start = cut_windows(stream, 0, 5)
    assert [w[0] for w in windows] == [100, 105, 110, 115] and start == 20
    assert all(len(w) == 6 for w in windows) and windows[1][0] == windows[0][-1]
    assert cut_windows(stream, 0, 5, limit=2)[1] == 10
    assert boundaries_in_window([3, 5, 6, 9, 10, 12], 5, 5) == [1, 4]  # only starts inside the input part
    assert document_ids([1, 4], 6) == [0, 1, 1, 1, 2, 2]
    b = make_batch(
        [pad_window([7, 8, 9], 4, 0), [1, 2, 3, 4, 5]], real_lengths=[3, 5], boundaries=[[2], []]
    )  # a padded last window and a full one
    assert b["input_ids"].tolist() == [[7, 8, 9, 0], [1, 2, 3, 4]]
    assert b["targets"].tolist() == [[8, 9, IGNORE_INDEX, IGNORE_INDEX], [2, 3, 4, 5]]
    assert b["document_ids"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]


def test_plan_units_cover_every_line_once():
    for n_files in (1, 2, 3, 5, 8, 13):
        for n_streams in (1, 2, 3, 4, 6, 8):
            owner, share = Counter(), Counter()
            for s in range(n_streams):
                for f, stride, phase in plan_units(n_files, n_streams, s):
                    for line in range(60):
                        owner[(f, line)] += line % stride == phase
                        share[s] += line % stride == phase
            assert set(owner.values()) == {1} and len(owner) == n_files * 60, (n_files, n_streams)
            assert max(share.values()) - min(share.values()) <= 60, (n_files, n_streams)  # within one file's lines
    assert epoch_order(10, seed=1, source=0, epoch=0, shuffle=True) != epoch_order(
        10, seed=1, source=0, epoch=1, shuffle=True
    )
    assert epoch_order(4, seed=1, source=0, epoch=3, shuffle=False) == [0, 1, 2, 3]


# ---- sharding and order ----


@pytest.mark.parametrize("n_files", [7, 2])  # whole files per stream, and lines strided over shared files
def test_two_ranks_two_workers_see_every_document_once(tmp_path, tok, n_files):
    texts = write_shards(tmp_path / "d", "a", n_files, 70 // n_files)
    seen, per_stream = Counter(), []
    for rank in range(2):
        ds = StreamingDataset(str(tmp_path / "d"), tok, 24, dp_rank=rank, dp_size=2, seed=3, infinite=False)
        for ids in stream_tokens(run(build_dataloader(ds, 3, num_workers=2))).values():
            docs, rest = docs_of(ids, tok)
            assert rest == []
            seen.update(docs)
            per_stream.append(len(docs))
    assert seen == Counter(texts)
    assert len(per_stream) == 4 and min(per_stream) > 0


def test_epochs_are_exact_and_reshuffled_and_seeds_differ(tmp_path, tok):
    texts = write_shards(tmp_path / "d", "a", 6, 10)
    epochs = [Counter(), Counter()]
    for rank in range(2):
        ds = StreamingDataset(str(tmp_path / "d"), tok, 16, dp_rank=rank, dp_size=2, seed=5, infinite=False)
        per_epoch = len(docs_of(stream_tokens(run(build_dataloader(ds, 4)))[0], tok)[0])
        loader = build_dataloader(StreamingDataset(str(tmp_path / "d"), tok, 16, dp_rank=rank, dp_size=2, seed=5), 4)
        batches, docs = [], []
        while len(docs) < 2 * per_epoch:
            batches += run(loader, 10)  # each iter() goes on from the loader's state
            docs = docs_of(stream_tokens(batches)[0], tok)[0]
        assert loader.epoch >= 1
        epochs[0].update(docs[:per_epoch])
        epochs[1].update(docs[per_epoch : 2 * per_epoch])
        assert docs[:per_epoch] != docs[per_epoch : 2 * per_epoch]  # epoch 2 is reshuffled
    assert epochs[0] == epochs[1] == Counter(texts)

    def first(seed):
        ds = StreamingDataset(str(tmp_path / "d"), tok, 16, seed=seed, return_document_ids=True)
        return [b for _, b in run(build_dataloader(ds, 4), 6)]

    assert batches_equal(first(5), first(5))
    assert not batches_equal(first(5), first(6))


# ---- resume ----


def train_loader(ds, micro_batch, num_workers=0):
    """The training loader of one process (dp=1, no accumulation): K = micro_batch streams."""
    return GlobalBatchLoader(ds, micro_batch=micro_batch, grad_accum=1, dp_rank=0, dp_size=1, num_workers=num_workers)


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_shard_and_mid_document_gives_the_same_batches(tmp_path, tok, num_workers):
    write_shards(tmp_path / "d", "a", 3, 40, scale=3)  # long documents: windows cut through them
    write_shards(tmp_path / "e", "b", 2, 30)

    def loader(workers=num_workers):
        sources = [DataSource(str(tmp_path / "d"), 0.7, "long"), DataSource(str(tmp_path / "e"), 0.3, "short")]
        ds = StreamingDataset(sources, tok, 20, seed=11, return_document_ids=True)
        return train_loader(ds, 3, workers)

    whole = take(loader(), 40)
    first = loader()
    head = take(first, 17)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["consumed"] == 51 and state["num_streams"] == 3
    streams = [s["state"] for s in state["streams"].values()]
    assert any(s["carry"]["skip"] > 0 and s["sources"][s["carry"]["source"]]["line"] > 1 for s in streams)
    resumed = loader(2 - num_workers)  # another number of workers reads the same streams
    assert resumed.load_state_dict(state) == []
    assert batches_equal(head, whole[:17])
    assert batches_equal(take(resumed, 23), whole[17:])
    straight = loader()
    take(straight, 40)
    assert resumed.stats()["documents"] == straight.stats()["documents"]


def test_resume_across_the_epoch_end_and_state_mismatch(tmp_path, tok):
    write_shards(tmp_path / "d", "a", 2, 3)  # a file of about 350-550 tokens per stream an epoch
    ds = StreamingDataset(str(tmp_path / "d"), tok, 16, seed=1)
    whole = take(train_loader(ds, 2), 30)
    for k in range(1, 30, 4):
        a = train_loader(ds, 2)
        take(a, k)
        b = train_loader(StreamingDataset(str(tmp_path / "d"), tok, 16, seed=1), 2)
        b.load_state_dict(a.state_dict())
        assert batches_equal(take(b, 30 - k), whole[k:]), k
    assert {s["state"]["sources"][0]["epoch"] for s in a.state_dict()["streams"].values()} == {0, 1}  # mid-epoch 2
    with pytest.raises(ValueError, match=r"does not fit this data: train.seed changed \(saved 1, now 2\)"):
        train_loader(StreamingDataset(str(tmp_path / "d"), tok, 16, seed=2), 2).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match=r"version 1 of None data; this code reads version 2 of 'text' data"):
        train_loader(ds, 2).load_state_dict({"version": 1, "streams": [None], "next_stream": 0})


# ---- mixtures ----


def test_mixture_token_fractions_follow_the_weights(tmp_path, tok):
    sources = []
    for name, weight, scale in (("a", 0.5, 1), ("b", 0.3, 3), ("c", 0.2, 6)):  # different document lengths
        write_shards(tmp_path / name, name, 2, 60, scale=scale)
        sources.append(DataSource(str(tmp_path / name / "*.zst"), weight, name))
    ds = StreamingDataset(sources, tok, 64, seed=0)
    ids = stream_tokens(run(build_dataloader(ds, 8), 50))[0]  # 400 sequences, 25,600 tokens
    docs, rest = docs_of(ids, tok)
    count = Counter()
    for d in docs:
        count[DOC_ID.match(d).group(1)] += len(tok.encode(d, bos=True, eos=True))
    total = sum(count.values())
    for name, weight in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        assert abs(count[name] / total - weight) < 0.02, (name, count[name] / total)
    with pytest.raises(ValueError, match="weight 0 must be > 0"):
        DataSource("x", 0)


# ---- bad input ----


def test_glob_with_no_match_and_empty_sources(tmp_path, tok):
    write_shards(tmp_path / "d", "a", 1, 5)
    with pytest.raises(DataError, match=r"glob '.*nothing-\*\.jsonl\.zst' matches no .* file; check the data path"):
        StreamingDataset(str(tmp_path / "nothing-*.jsonl.zst"), tok, 8)
    with pytest.warns(DataWarning, match="matches no"):
        ds = StreamingDataset([str(tmp_path / "x*.zst"), str(tmp_path / "d")], tok, 8, on_error="skip")
    assert build_dataloader(ds, 1).stats()["skipped"] == {"no_match": 1}
    with pytest.raises(DataError, match="no .* file in"), pytest.warns(DataWarning):
        StreamingDataset(str(tmp_path / "x*.zst"), tok, 8, on_error="skip")


def test_bad_line_in_a_worker_names_file_and_line(tmp_path, tok):
    write_shards(tmp_path / "d", "a", 2, 20, zst=False)
    p = tmp_path / "d" / "part-00001.jsonl"
    lines = p.read_text().splitlines()
    lines[6] = '{"text": "cut'
    p.write_text("\n".join(lines) + "\n")
    ds = StreamingDataset(str(tmp_path / "d"), tok, 16, dp_size=1, shuffle=False)
    with pytest.raises(DataError, match=r"part-00001\.jsonl:7: invalid JSON"):
        run(build_dataloader(ds, 2, num_workers=2), 200)
    ds = StreamingDataset(str(tmp_path / "d"), tok, 16, on_error="skip", infinite=False)
    loader = build_dataloader(ds, 2)
    with pytest.warns(DataWarning, match=r"part-00001\.jsonl:7: invalid JSON"):
        docs = docs_of(stream_tokens(run(loader))[0], tok)[0]
    assert len(docs) == 39 and loader.stats()["skipped"] == {"invalid_json": 1}


def test_a_stream_without_documents_is_an_error_not_a_hang(tmp_path, tok):
    d = tmp_path / "d"
    d.mkdir()
    (d / "one.jsonl").write_text('{"text": "only one document"}\n')
    with pytest.raises(DataError, match=r"stream 1 of 2 got no document in epoch 0.*train.global_batch_size"):
        take(train_loader(StreamingDataset(str(d), tok, 16), 2), 1)
    (d / "one.jsonl").write_text('{"body": 1}\n' * 3)
    ds = StreamingDataset(str(d), tok, 16, on_error="skip")
    with pytest.raises(DataError, match=r"skipped: \{'missing_field': 3\}"), pytest.warns(DataWarning):
        run(build_dataloader(ds, 1), 1)
    (d / "one.jsonl").write_text('{"text": "   "}\n' * 2)  # documents, but no token without BOS/EOS
    assert tok.encode("   ") == []
    ds = StreamingDataset(str(d), tok, 16, add_bos=False, add_eos=False)
    with pytest.raises(DataError, match=r"stream 0 of 1 read a whole epoch whose every document"):
        run(build_dataloader(ds, 1), 1)


def test_truncated_and_empty_shards_through_the_loader(tmp_path, tok):
    texts = write_shards(tmp_path / "d", "a", 3, 10)
    p = tmp_path / "d" / "part-00002.jsonl.zst"
    p.write_bytes(p.read_bytes()[:-9])
    (tmp_path / "d" / "part-00003.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b""))
    with pytest.raises(DataError, match=r"part-0000[23]\.jsonl\.zst: (truncated zstd|empty shard)"):
        run(build_dataloader(StreamingDataset(str(tmp_path / "d"), tok, 16, infinite=False), 4))
    loader = build_dataloader(StreamingDataset(str(tmp_path / "d"), tok, 16, infinite=False, on_error="skip"), 4)
    with pytest.warns(DataWarning):
        docs = docs_of(stream_tokens(run(loader))[0], tok)[0]
    assert sorted(docs) == sorted(texts[:20]) and loader.stats()["skipped"] == {"truncated_zstd": 1, "empty_file": 1}


# ---- evaluation pass, CLI, real data ----


def test_plain_dataloader_over_the_dataset_gives_single_windows(tmp_path, tok):
    write_shards(tmp_path / "d", "a", 2, 5)
    ds = StreamingDataset(str(tmp_path / "d"), tok, 10, return_document_ids=True)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    ref = next(iter(build_dataloader(ds, 4)))
    assert batches_equal([batch], [ref])
    boundaries = 0
    for _, b in run(build_dataloader(ds, 4), 20):  # document ids step up right after each EOS
        eos_before = torch.cumsum(b["input_ids"] == tok.eos_id, dim=1) - (b["input_ids"] == tok.eos_id).long()
        assert torch.equal(b["document_ids"], eos_before)
        boundaries += int(b["document_ids"][:, -1].sum())
    assert boundaries > 3


def test_finite_pass_is_deterministic_and_loses_no_token(tmp_path, tok):
    texts = write_shards(tmp_path / "d", "a", 3, 7)
    ds = StreamingDataset(str(tmp_path / "d"), tok, 32, infinite=False, shuffle=False, return_document_ids=True)
    loader = build_dataloader(ds, 4)
    one, two = [b for _, b in run(loader)], [b for _, b in run(loader)]
    assert batches_equal(one, two)
    assert (one[-1]["targets"] == IGNORE_INDEX).any()  # the last window is padded, its padding not trained on
    assert docs_of(stream_tokens([(0, b) for b in one])[0], tok)[0] == texts  # sorted files, file order
    assert loader.stats()["tokens"] == sum(len(tok.encode(t, bos=True, eos=True)) for t in texts)


def test_cli_dump_ids_and_decode(tmp_path, tok, capsys):
    write_shards(tmp_path / "d", "a", 2, 10)
    out = tmp_path / "ids.jsonl"
    args = ["--data", str(tmp_path / "d" / "*"), "--tokenizer", str(tok.directory), "--seq-len", "12"]
    main(args + ["--max-seqs", "5", "--dump-ids", str(out), "--dp-rank", "1", "--dp-size", "2", "--decode"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ds = StreamingDataset(str(tmp_path / "d" / "*"), tok, 12, dp_rank=1, dp_size=2)
    expected = [b for _, b in run(build_dataloader(ds, 1), 5)]
    assert rows == [b["input_ids"][0].tolist() + b["targets"][0, -1:].tolist() for b in expected]
    shown = capsys.readouterr()
    assert shown.out.count("--- sequence") == 5 and "</s><s>doc-a-" in shown.out
    main(args + ["--max-seqs", "6", "--dump-ids", str(out)])  # one rank: a run of one sequence per step
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    trained = take(train_loader(StreamingDataset(str(tmp_path / "d" / "*"), tok, 12), 1), 6)
    assert rows == [b["input_ids"][0].tolist() + b["targets"][0, -1:].tolist() for b in trained]
    capsys.readouterr()
    assert '"documents":' in shown.err
    with pytest.raises(SystemExit, match=r"error: .*No such file or directory: .*missing"):
        main(args + ["--max-seqs", "1", "--dump-ids", str(tmp_path / "missing" / "ids.jsonl")])
    with pytest.raises(SystemExit, match=r"error: dp_rank=2 must be in \[0, dp_size=2\) \(--dp-rank / --dp-size\)"):
        main(args + ["--max-seqs", "1", "--decode", "--dp-rank", "2", "--dp-size", "2"])


def test_every_training_loader_is_train_data():
    for loader in (GlobalBatchLoader, SyntheticLoader):  # what training/loop.py's Trainer.build_data returns
        assert issubclass(loader, TrainData), loader


@pytest.mark.skipif(not (DATA / "arxiv_sample.jsonl.zst").exists(), reason="shared test data absent")
def test_real_arxiv_shard_loses_no_token(tok):
    texts = [json.loads(line)["text"] for line in (DATA / "arxiv_sample.jsonl").read_text().splitlines()]
    ds = StreamingDataset(str(DATA / "arxiv_sample.jsonl.zst"), tok, 512, add_bos=False, infinite=False)
    ids = stream_tokens(run(build_dataloader(ds, 16)))[0]
    assert ids == [i for t in texts for i in tok.encode(t, eos=True)]
