"""dataset/loader.py's GlobalBatchLoader: the same global batches at any layout, resume at any layout or batch size.

One loader per data-parallel rank in this process (no process group needed). The reference is independent of the
loader: each stream k of K read alone (`open_stream(k, K).next_row()`), sequence n = window n // K of stream n % K.
"""

import json
import random

import pytest
import torch

from data.shard import ShardOptions, shard
from dataset.loader import GlobalBatchLoader, merge_states
from dataset.sft import SFTDataset
from dataset.sources import DataSource
from dataset.streaming import StreamingDataset
from dataset.tokenizer import Tokenizer
from tests.chat_utils import sentence, train_sp
from tests.unit.test_sft_data import random_records, write_records
from tests.unit.test_streaming import doc_text
from training.data import SyntheticLoader

LAYOUTS = [(1, 4, 1), (2, 2, 1), (2, 1, 2), (4, 1, 1)]  # (dp, micro_batch, grad_accum): G = 4


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    rng = random.Random(1)
    texts = [doc_text(s, k) for s in "ab" for k in range(200)] + [sentence(rng) for _ in range(1000)]
    return train_sp(tmp_path_factory.mktemp("tok"), texts, vocab_size=400)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer(tok_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two sources sharded by data/shard.py: 7 and 4 shards (more and fewer files than streams)."""
    root = tmp_path_factory.mktemp("corpus")
    for src, n, per in (("a", 200, 30), ("b", 100, 25)):
        raw = root / f"{src}.jsonl"
        raw.write_text("".join(json.dumps({"text": doc_text(src, k, 2)}) + "\n" for k in range(n)))
        shard([raw], root / src, ShardOptions(lines_per_shard=per))
    return root


def text_data(corpus, tok, kind="mix", **kw):
    a, b = str(corpus / "a" / "*.jsonl.zst"), str(corpus / "b" / "*.jsonl.zst")
    sources = [DataSource(a, 0.7, "a"), DataSource(b, 0.3, "b")] if kind == "mix" else a
    return StreamingDataset(sources, tok, kw.pop("seq_len", 16), seed=3, return_document_ids=True, **kw)


def loaders(make, layout, workers=0, state=None):
    dp, micro, accum = layout
    out = [
        GlobalBatchLoader(make(), micro_batch=micro, grad_accum=accum, dp_rank=r, dp_size=dp, num_workers=workers)
        for r in range(dp)
    ]
    warnings = [ld.load_state_dict(state) for ld in out] if state is not None else None
    return out, warnings


def global_batches(lds, steps):
    """Per step, every rank's micro-batches concatenated in rank order: {key: (G, T)}."""
    its = [iter(ld) for ld in lds]
    out = []
    for _ in range(steps):
        parts = [next(it) for it in its for _ in range(lds[0].layout.grad_accum)]
        out.append({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    return out


def reference(source, K, n_rows):
    """Sequences 0 .. n_rows-1: stream n % K, window n // K, each stream read alone from its start."""
    streams = [source.open_stream(k, K) for k in range(K)]
    rows = [streams[n % K].next_row() for n in range(n_rows)]
    return source.collate(rows)


def cat_steps(steps):
    return {k: torch.cat([s[k] for s in steps]) for k in steps[0]}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def resume(make, save_layout, save_steps, load_layout, load_steps, workers=0):
    """Run `save_steps` at one layout, merge the ranks' states, go on at another; the steps' batches and warnings."""
    first, _ = loaders(make, save_layout, workers)
    before = global_batches(first, save_steps)
    state = json.loads(json.dumps(merge_states([ld.state_dict() for ld in first])))  # what a checkpoint holds
    second, warnings = loaders(make, load_layout, workers, state)
    return before, global_batches(second, load_steps), state, warnings


@pytest.mark.parametrize(("kind", "workers"), [("one", 0), ("mix", 2)])  # mixtures at 0 workers: the resume tests
def test_global_batch_is_the_same_at_every_layout(corpus, tok, kind, workers):
    make = lambda: text_data(corpus, tok, kind)  # noqa: E731
    ref = reference(make(), 4, 24)
    assert ref["document_ids"].max() > 0  # rows cross documents
    for layout in LAYOUTS:
        steps = global_batches(loaders(make, layout, workers)[0], 6)
        assert_same(cat_steps(steps), ref)


def test_sft_global_batch_and_resume_at_any_layout(tok, tmp_path):
    path = write_records(tmp_path / "sft.jsonl", random_records(30, seed=4))
    make = lambda: SFTDataset(path, tok, 96, seed=2)  # noqa: E731
    ref = reference(make(), 4, 40)  # 40 rows of 30 conversations over 4 streams: past an epoch
    for layout in LAYOUTS:
        assert_same(cat_steps(global_batches(loaders(make, layout)[0], 10)), ref)
    before, after, state, warnings = resume(make, (2, 2, 1), 3, (4, 1, 1), 7)
    assert warnings == [[]] * 4 and state["kind"] == "sft"
    assert_same(cat_steps(before + after), ref)
    stream = make().open_stream(3, 4)
    for _ in range(10):
        stream.next_row()
    assert stream.state_dict()["epoch"] == 1  # the 10 rows of each stream cross an epoch end


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_another_dp_continues_the_same_stream(corpus, tok, workers):
    make = lambda: text_data(corpus, tok)  # noqa: E731
    ref = reference(make(), 4, 24)
    first, _ = loaders(make, (2, 2, 1), workers)
    before = global_batches(first, 3)
    parts = [ld.state_dict() for ld in first]
    assert [sorted(p["streams"]) for p in parts] == [["0", "1"], ["2", "3"]]  # each rank read only its streams
    state = merge_states(parts)
    assert state["consumed"] == 12 and [s["windows"] for s in state["streams"].values()] == [3, 3, 3, 3]
    for layout in ((1, 4, 1), (4, 1, 1)):
        second, warnings = loaders(make, layout, workers, json.loads(json.dumps(state)))
        assert warnings == [[]] * layout[0]
        after = global_batches(second, 3)
        # Each window of every stream is handed out once: steps 0-2 at dp=2, steps 3-5 after the resume.
        assert_same(cat_steps(before + after), ref)
        parts = [ld.state_dict() for ld in second]
        if layout[0] == 4:  # rank 0 keeps the streams it loaded; rank k advanced stream k only
            assert [sorted(p["streams"]) for p in parts] == [["0", "1", "2", "3"], ["1"], ["2"], ["3"]]
        assert [s["windows"] for s in merge_states(parts)["streams"].values()] == [6, 6, 6, 6]


@pytest.mark.parametrize(("layout", "workers"), [((2, 3, 1), 2), ((2, 1, 1), 0), ((3, 1, 2), 0)])
def test_another_global_batch_continues_at_the_next_sequence(corpus, tok, layout, workers):
    make = lambda: text_data(corpus, tok)  # noqa: E731
    before, after, state, warnings = resume(make, (2, 2, 1), 3, layout, 4, workers)
    G = layout[0] * layout[1] * layout[2]
    assert len(warnings[0]) == 1 and f"changed from 4 to {G}" in warnings[0][0] and "sequence 12 " in warnings[0][0]
    assert_same(cat_steps(before + after), reference(make(), 4, 12 + 4 * G))
    # The skipping ranks' states merge into a valid state again: stream k holds every n < C with n % 4 == k.
    second, _ = loaders(make, layout, workers, state)
    global_batches(second, 4)
    merged = merge_states([ld.state_dict() for ld in second])
    assert merged["consumed"] == 12 + 4 * G and merged["num_streams"] == 4


def test_refused_and_broken_states(corpus, tok, tmp_path):
    make = lambda: text_data(corpus, tok)  # noqa: E731
    (a, b), _ = loaders(make, (2, 2, 1))
    its = [iter(a), iter(b)]
    next(its[0]), next(its[1])
    parts = [a.state_dict(), b.state_dict()]
    with pytest.raises(ValueError, match=r"stream 2 has 0 windows consumed, but 4 sequences .* mean 1"):
        merge_states(parts[:1])  # rank 1's part is missing
    state = merge_states(parts)
    other = Tokenizer(train_sp(tmp_path / "tok", [doc_text("a", k) for k in range(300)], vocab_size=350))
    for ds, message in (
        (text_data(corpus, other), r"the tokenizer \(data.tokenizer\) changed \(saved \{'vocab_size.: 400"),
        (text_data(corpus, tok, seq_len=20), r"data.seq_len changed \(saved 16, now 20\)"),
        (text_data(corpus, tok, "one"), "the data sources"),
    ):
        with pytest.raises(ValueError, match=message):
            GlobalBatchLoader(ds, micro_batch=2, grad_accum=1, dp_rank=0, dp_size=1).load_state_dict(state)
    (c,), _ = loaders(make, (1, 2, 2))
    next(iter(c))
    with pytest.raises(RuntimeError, match=r"inside a step \(1 of 2 micro-batches .* at a step boundary"):
        c.state_dict()


def test_synthetic_loader_numbers_sequences_globally():
    def run(layout, steps, state=None):
        dp, micro, accum = layout
        lds = [
            SyntheticLoader(
                vocab_size=50, seq_len=6, micro_batch=micro, grad_accum=accum, dp_rank=r, dp_size=dp, seed=1
            )
            for r in range(dp)
        ]
        warnings = [ld.load_state_dict(state) for ld in lds] if state else []
        return lds, global_batches(lds, steps), warnings

    ref = cat_steps(run((1, 4, 1), 6)[1])
    lds, before, _ = run((2, 1, 2), 3)
    state = merge_states([ld.state_dict() for ld in lds])
    _, after, warnings = run((4, 1, 1), 3, state)
    assert warnings == [[]] * 4 and state["streams"] == {}
    assert_same(cat_steps(before + after), ref)
    _, after, warnings = run((2, 1, 1), 6, state)  # G 4 -> 2 continues at sequence 12
    assert "changed from 4 to 2" in warnings[0][0]
    assert_same(cat_steps(before + after), ref)


def _synthetic(
    documents: bool, micro_batch: int = 4, dp_rank: int = 0, dp_size: int = 1, pin_memory: bool = False
) -> SyntheticLoader:
    return SyntheticLoader(
        vocab_size=50, seq_len=24, micro_batch=micro_batch, grad_accum=1, dp_rank=dp_rank, dp_size=dp_size, seed=3,
        documents=documents, pin_memory=pin_memory,
    )  # fmt: skip


def test_synthetic_documents_keep_the_tokens_and_cut_each_sequence_into_one_to_four():
    plain, docs = _synthetic(False), _synthetic(True)
    counts = []
    for _ in range(10):
        a, b = next(plain), next(docs)
        assert "document_ids" not in a
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["targets"], b["targets"])
        d = b["document_ids"]  # (B, T)
        assert d.shape == a["input_ids"].shape and (d[:, 0] == 0).all()
        assert set(d.diff(dim=1).unique().tolist()) <= {0, 1}  # documents follow one another
        counts += (d[:, -1] + 1).tolist()
    assert set(counts) == {1, 2, 3, 4}
    # sequence n has the same documents at any layout: they are part of the global numbering
    whole = next(_synthetic(True, 4))["document_ids"]
    assert torch.equal(next(_synthetic(True, 2, dp_rank=1, dp_size=2))["document_ids"], whole[2:])


def test_synthetic_batches_pinned_for_cuda_hold_the_same_values(monkeypatch):
    pinned = []

    def pin(t):  # stands in for page-locked memory (none without CUDA): a copy, recorded
        pinned.append(t.clone())
        return pinned[-1]

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    plain, loader = _synthetic(True), _synthetic(True, pin_memory=True)
    for _ in range(2):
        pinned.clear()
        a, b = next(plain), next(loader)
        assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
        assert len(pinned) == len(b) and all(any(b[k] is t for t in pinned) for k in b)  # each one pinned
        assert all(b[k].is_contiguous() for k in b)  # a strided one would reach the GPU through a pageable copy
