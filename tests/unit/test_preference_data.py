"""dataset/preference.py: pairs against transformers' chat template, the label rule, the three record forms, record
errors, truncation, global batches at any layout, resume, and the pass over every pair."""

import json
import random
import re
import warnings

import pytest
import torch
import zstandard

from dataset.chat import CHAT_TEMPLATE
from dataset.jsonl_zst import DataWarning
from dataset.loader import GlobalBatchLoader, merge_states
from dataset.preference import (
    PreferenceDataError,
    PreferenceDataset,
    build_preference_loader,
    build_preference_train_loader,
    iter_all_pairs,
)
from dataset.sft import SFTDataError
from dataset.tokenizer import Tokenizer
from tests.chat_utils import chat_tokenizer_dir, msg, sentence


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return chat_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def write_records(path, lines):
    """Lines are dicts (written as JSON) or raw strings; .zst paths are compressed."""
    raw = "".join((ln if isinstance(ln, str) else json.dumps(ln, ensure_ascii=False)) + "\n" for ln in lines).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(raw) if path.name.endswith(".zst") else raw)
    return path


# (prompt messages, chosen, rejected): one turn, a system message, a shared multi-turn conversation, edge texts
PAIRS = [
    ([msg("user", "What is the quick fox?")], "The quick brown fox.", "A lazy dog!"),
    ([msg("system", "You are a helpful assistant."), msg("user", "What is 2 + 2?")], "4", "The answer is 5."),
    (
        [
            msg("user", "hello world"),
            msg("assistant", "Hello, what is your question?"),
            msg("user", "why is the fox quick?"),
        ],
        "Because the dog is lazy.",
        "",
    ),
    ([msg("user", "  two spaces\tand\n\nlines <s>")], " leading and trailing  \n", "naïve café 中文 🙂"),
    ([msg("user", "same")], "identical reply", "identical reply"),  # kept: not an error
]


def hf_side(hf, prompt, reply):
    """Ids and label mask of one side from transformers alone: the final reply + <|eot_id|> carry labels."""
    full = hf.apply_chat_template(
        [*prompt, msg("assistant", reply)],
        chat_template=CHAT_TEMPLATE,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    head = hf.apply_chat_template(prompt, chat_template=CHAT_TEMPLATE, add_generation_prompt=True, return_dict=True)
    n = len(head["input_ids"])
    assert full["input_ids"][:n] == head["input_ids"]  # the prompt is a prefix (this tokenizer splits "\n\n" alone)
    assert all(full["assistant_masks"][n:])  # the whole final reply is the assistant's
    return full["input_ids"], [0] * n + [1] * (len(full["input_ids"]) - n)


def test_sides_equal_transformers_and_only_the_final_reply_is_labelled(tok, hf, tmp_path):
    path = write_records(tmp_path / "p.jsonl", [{"messages": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])
    ds = PreferenceDataset(path, tok, 128)
    assert len(ds) == len(PAIRS) and ds.stats() == {"pairs": 5, "dropped": 0, "truncated": 0, "skipped": 0}
    eot = tok.token_id("<|eot_id|>")
    for index, (prompt, *replies) in enumerate(PAIRS):
        sides = ds.pair(index)
        for (ids, labels), reply in zip(sides, replies, strict=True):
            want_ids, want_mask = hf_side(hf, prompt, reply)
            assert ids.tolist() == want_ids
            assert (labels != -100).long().tolist() == want_mask
            kept = labels[labels != -100]
            assert kept.tolist() == ids[labels != -100].tolist() and kept[-1] == eot
            # the labelled tokens spell the reply (decoded after a marker, so a leading space stays)
            assert tok.decode([tok.token_id("<|end_header_id|>"), *kept.tolist()]) == (
                f"<|end_header_id|>{reply}<|eot_id|>"
            )
        (c_ids, c_labels), (r_ids, r_labels) = sides
        start = int((c_labels != -100).nonzero()[0])
        assert torch.equal(c_ids[:start], r_ids[:start])  # both sides share the prompt token for token
    # the shared conversation's earlier assistant turn carries no label: one labelled run per side
    for ids, labels in ds.pair(2):
        where = (labels != -100).nonzero().flatten()
        assert len(where) and (where.diff() == 1).all() and where[-1] == len(ids) - 1
    assert (ds.pair(2)[1][1] != -100).sum() == 1  # an empty reply: only its <|eot_id|>


def test_record_forms_give_identical_pairs(tok, tmp_path):
    system, user, chosen, rejected = "Be brief.", "what is the answer?", "42, because.", "I do not know"
    turns = [msg("system", system), msg("user", user)]
    forms = {
        "strings": {"system": system, "prompt": user, "chosen": chosen, "rejected": rejected},
        "messages": {"messages": turns, "chosen": msg("assistant", chosen), "rejected": msg("assistant", rejected)},
        "messages_strings": {"messages": turns, "chosen": chosen, "rejected": rejected},
        "trl": {"prompt": turns, "chosen": [msg("assistant", chosen)], "rejected": [msg("assistant", rejected)]},
        "trl_mixed": {"prompt": turns, "chosen": msg("assistant", chosen), "rejected": [msg("assistant", rejected)]},
    }
    built = {}
    for name, record in forms.items():
        suffix = ".jsonl.zst" if name == "trl" else ".jsonl"
        other = {"prompt": "hello world", "chosen": "hi", "rejected": "no", "score_chosen": 1.0}  # extra keys ignored
        built[name] = PreferenceDataset(write_records(tmp_path / f"{name}{suffix}", [other, record]), tok, 64)
    first = built["strings"]
    for name, ds in built.items():
        assert ds.stats() == first.stats(), name
        for index in range(2):
            for side, want in zip(ds.pair(index), first.pair(index), strict=True):
                assert all(torch.equal(a, b) for a, b in zip(side, want, strict=True)), name
            assert all(torch.equal(ds.row(index)[k], first.row(index)[k]) for k in first.row(index)), name
    # an empty system string is no system message
    records = [{"system": "", "prompt": user, "chosen": chosen, "rejected": rejected}]
    empty = PreferenceDataset(write_records(tmp_path / "empty.jsonl", records), tok, 64)
    records = [{"prompt": user, "chosen": chosen, "rejected": rejected}]
    none = PreferenceDataset(write_records(tmp_path / "none.jsonl", records), tok, 64)
    assert torch.equal(empty.row(0)["tokens"], none.row(0)["tokens"])
    assert not torch.equal(none.row(0)["tokens"], first.row(1)["tokens"])


A = msg("assistant", "a")
BAD = [
    ({"prompt": "x", "rejected": "b"}, "field 'chosen' must be a reply: a string, an assistant message"),
    ({"prompt": "x", "chosen": "a", "rejected": 3}, "field 'rejected' must be a reply: a string, an assistant"),
    ({"prompt": "x", "chosen": [A, A], "rejected": "b"}, "field 'chosen' must be a reply"),
    ({"prompt": "x", "chosen": msg("user", "a"), "rejected": "b"}, "field 'chosen' must be a reply"),
    ({"prompt": "x", "chosen": "a <|eot_id|>", "rejected": "b"}, "'chosen' contains the chat marker <|eot_id|>"),
    ({"prompt": "<|start_header_id|>", "chosen": "a", "rejected": "b"}, "contains the chat marker <|start_header_id|>"),
    ({"messages": [msg("user", "u"), A], "chosen": "a", "rejected": "b"}, "'messages' ends with an assistant message"),
    ({"messages": [A, msg("user", "u")], "chosen": "a", "rejected": "b"}, "message 0 has role 'assistant' first"),
    ({"messages": [msg("user", "u"), msg("user", "v")], "chosen": "a", "rejected": "b"}, "role 'user' after 'user'"),
    ({"prompt": [msg("system", "s")], "chosen": "a", "rejected": "b"}, "'prompt': only a system message"),
    ({"messages": [], "chosen": "a", "rejected": "b"}, "'messages': no messages"),
    ({"messages": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "'messages' message 0 needs string fields"),
    ({"messages": "hi", "chosen": "a", "rejected": "b"}, "'messages' must be a string or a list"),
    ({"messages": [msg("user", "u")], "prompt": "x", "chosen": "a", "rejected": "b"}, "both 'messages' and 'prompt'"),
    ({"messages": [msg("user", "u")], "system": "s", "chosen": "a", "rejected": "b"}, "'system' goes with a string"),
    ({"prompt": "x", "system": 1, "chosen": "a", "rejected": "b"}, "field 'system' must be a string, found a int"),
    ({"prompt": "x", "response": "y"}, "field 'chosen' must be a reply"),
    ({"chosen": "a", "rejected": "b"}, "unknown record form (keys ['chosen', 'rejected'])"),
    ([1, 2], "a record is a JSON object, found list"),
    ('{"prompt": "x", ', "invalid JSON"),
]
GOOD = {"prompt": "hello", "chosen": "hi", "rejected": "go away"}


@pytest.mark.parametrize("bad,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_record_names_file_and_line(tok, tmp_path, bad, message):
    path = write_records(tmp_path / "p.jsonl.zst", [GOOD, "", bad, GOOD])
    with pytest.raises(PreferenceDataError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)) as info:
        PreferenceDataset(path, tok, 64)
    assert "set on_error='skip'" in str(info.value)
    assert isinstance(info.value, SFTDataError)  # caught where SFT data errors are


def test_skip_counts_and_warns(tok, tmp_path):
    path = write_records(tmp_path / "p.jsonl", [GOOD, *[b for b, _ in BAD], GOOD, "", GOOD])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = PreferenceDataset(path, tok, 64, on_error="skip")
    assert ds.stats() == {"pairs": 3, "dropped": 0, "truncated": 0, "skipped": len(BAD)}
    shown = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(shown) == 10 and f"{path}:2:" in str(shown[0].message)
    assert "further skips are counted" in str(shown[-1].message)


def test_file_errors(tok, tmp_path):
    with pytest.raises(PreferenceDataError, match="the glob matches no file"):
        PreferenceDataset(str(tmp_path / "*.jsonl"), tok, 64)
    (tmp_path / "a.txt").write_text("x\n")
    with pytest.raises(PreferenceDataError, match=r"a\.txt: unsupported file type; preference data is \.jsonl"):
        PreferenceDataset(tmp_path / "a.txt", tok, 64)
    path = write_records(tmp_path / "c.jsonl", [GOOD])
    with pytest.raises(PreferenceDataError, match=r"1 usable pairs for 2 data-parallel ranks .*raise seq_len"):
        PreferenceDataset(path, tok, 64, dp_rank=1, dp_size=2)
    ds = PreferenceDataset(path, tok, 64)
    with pytest.raises(PreferenceDataError, match=r"1 usable pairs for 4 streams .*lower train.global_batch_size"):
        build_preference_train_loader(ds, micro_batch=4, grad_accum=1, dp_rank=0, dp_size=1)


def test_truncation(tok, hf, tmp_path):
    rng = random.Random(8)
    short = {"prompt": "hi", "chosen": "hello", "rejected": "no"}
    long_reply = {"prompt": "hi", "chosen": "yes", "rejected": sentence(rng, 40, 40)}  # labels left after the cut
    long_prompt = {"prompt": sentence(rng, 40, 40), "chosen": "yes", "rejected": "no"}  # no label left after it
    path = write_records(tmp_path / "p.jsonl", [short, long_reply, long_prompt])
    seq_len = 30
    dropped = PreferenceDataset(path, tok, seq_len)
    assert dropped.stats() == {"pairs": 1, "dropped": 2, "truncated": 0, "skipped": 0}
    cut = PreferenceDataset(path, tok, seq_len, truncation="truncate")
    assert cut.stats() == {"pairs": 2, "dropped": 1, "truncated": 1, "skipped": 0}
    prompt = [msg("user", "hi")]
    for side, reply in enumerate(("yes", long_reply["rejected"])):
        ids, mask = hf_side(hf, prompt, reply)
        want = [t if m else -100 for t, m in zip(ids, mask, strict=True)][: seq_len + 1]
        got_ids, got_labels = cut.pair(1)[side]
        assert got_ids.tolist() == ids[: seq_len + 1] and got_labels.tolist() == want
    assert len(hf_side(hf, prompt, long_reply["rejected"])[0]) > seq_len + 1  # the case under test exists
    row = cut.row(1)
    assert row["tokens"].shape == (2, seq_len + 1) and (row["tokens"][1] != tok.pad_id).all()
    chosen_len = len(cut.pair(1)[0][0])
    assert (row["tokens"][0, chosen_len:] == tok.pad_id).all() and (row["labels"][0, chosen_len:] == -100).all()


# --- batches ---------------------------------------------------------------------------------------------------


def random_pairs(n, seed):
    rng = random.Random(seed)
    records = []
    for i in range(n):
        if i % 2:
            prompt = [msg("system", sentence(rng, 1, 4))] if i % 3 == 0 else []
            for _ in range(rng.randint(0, 2)):
                prompt += [msg("user", sentence(rng, 1, 6)), msg("assistant", sentence(rng, 1, 6))]
            prompt.append(msg("user", sentence(rng, 1, 6)))
            records.append({"messages": prompt, "chosen": msg("assistant", sentence(rng)), "rejected": sentence(rng)})
        else:
            records.append({"prompt": sentence(rng), "chosen": sentence(rng), "rejected": sentence(rng)})
    return records


def global_batches(loaders, steps):
    """Per step, every rank's micro-batches concatenated in rank order: {key: (G, ...)}."""
    its = [iter(ld) for ld in loaders]
    out = []
    for _ in range(steps):
        parts = [next(it) for it in its for _ in range(loaders[0].layout.grad_accum)]
        out.append({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    return out


def make_loaders(make, layout, state=None):
    dp, micro, accum = layout
    out = [
        build_preference_train_loader(make(), micro_batch=micro, grad_accum=accum, dp_rank=r, dp_size=dp)
        for r in range(dp)
    ]
    if state is not None:
        assert all(ld.load_state_dict(json.loads(json.dumps(state))) == [] for ld in out)
    return out


def cat(steps):
    return {k: torch.cat([s[k] for s in steps]) for k in steps[0]}


def expected_batch(ds, indices):
    """The batch of these pairs written out from `pair` (unpadded sides), independent of `row` and `collate`."""
    B, T = len(indices), ds.seq_len
    input_ids = torch.full((B, 2, T), ds.pad_id, dtype=torch.long)
    targets = torch.full((B, 2, T), -100, dtype=torch.long)
    for b, index in enumerate(indices):
        for side, (ids, labels) in enumerate(ds.pair(index)):
            n = len(ids)
            input_ids[b, side, : min(n, T)] = ids[:T].long()
            targets[b, side, : n - 1] = labels[1:]
    return {"input_ids": input_ids, "targets": targets, "pair_index": torch.tensor(indices)}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_global_batches_are_the_same_at_every_layout_and_resume(tok, tmp_path):
    path = write_records(tmp_path / "p.jsonl", random_pairs(14, seed=4))
    make = lambda: PreferenceDataset(path, tok, 96, seed=2)  # noqa: E731
    ds = make()
    assert len(ds) == 14
    steps = 8  # 32 pairs over 4 streams: past two epochs of each stream
    runs = {layout: cat(global_batches(make_loaders(make, layout), steps)) for layout in [(1, 4, 1), (2, 1, 2)]}
    ref = runs[(1, 4, 1)]
    assert_same(runs[(2, 1, 2)], ref)
    assert ref["input_ids"].shape == (32, 2, 96) and ref["pair_index"].shape == (32,)
    # sequence n is window n // 4 of stream n % 4, i.e. pair order(e, n % 4, 4)[n // 4 - ...]: in the first epoch,
    # sequences 0 .. 13 are the epoch's permutation, every pair once
    assert sorted(ref["pair_index"][:14].tolist()) == list(range(14))
    stream_rows = [[] for _ in range(4)]
    for k in range(4):
        for epoch in range(3):
            stream_rows[k] += ds.order(epoch, k, 4)
    want = [stream_rows[n % 4][n // 4] for n in range(32)]
    assert ref["pair_index"].tolist() == want
    assert_same(ref, expected_batch(ds, want))
    # resume: 3 steps at dp=2, then 5 at dp=1 from the merged state, give the same 8 steps
    first = make_loaders(make, (2, 1, 2))
    before = global_batches(first, 3)
    state = merge_states([ld.state_dict() for ld in first])
    assert state["kind"] == "preference" and state["fingerprint"]["pairs"] == 14
    after = global_batches(make_loaders(make, (1, 4, 1), state), 5)
    assert_same(cat(before + after), ref)


def test_resume_continues_exactly_and_refuses_other_data(tok, tmp_path):
    path = write_records(tmp_path / "p.jsonl.zst", random_pairs(11, seed=9))

    def loader(**kw):
        ds = PreferenceDataset(path, tok, kw.pop("seq_len", 80), seed=kw.pop("seed", 3), **kw)
        return build_preference_train_loader(ds, micro_batch=2, grad_accum=2, dp_rank=0, dp_size=1)

    straight = iter(loader())
    batches = [next(straight) for _ in range(16)]  # 8 steps of 4 pairs: about 3 epochs of each stream
    first = loader()
    it = iter(first)
    for _ in range(6):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = loader()
    assert resumed.load_state_dict(state) == []
    it = iter(resumed)
    for want in batches[6:]:
        assert_same(next(it), want)
    assert state["consumed"] == 12
    with pytest.raises(ValueError, match=r"train.seed changed \(saved 3, now 4\)"):
        loader(seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"data.seq_len changed \(saved 80, now 81\)"):
        loader(seq_len=81).load_state_dict(state)
    with pytest.raises(ValueError, match=r"of 'sft' data"):
        loader().load_state_dict({**state, "kind": "sft"})


def test_eval_loader_gives_each_rank_its_own_pairs(tok, tmp_path):
    path = write_records(tmp_path / "p.jsonl", random_pairs(9, seed=5))
    seen = []
    for rank in range(2):
        ds = PreferenceDataset(path, tok, 96, dp_rank=rank, dp_size=2, seed=1)
        loader = build_preference_loader(ds, 2)
        indices = torch.cat([next(loader)["pair_index"] for _ in range(5)]).tolist()  # 10 rows: past an epoch
        order = ds.order(0) + ds.order(1) + ds.order(2)
        assert indices == order[:10]
        seen += ds.order(0)
        assert loader.stats()["pairs"] == 9
    assert sorted(seen) == list(range(9))


@pytest.mark.parametrize("dp", [1, 2])
def test_iter_all_pairs_covers_every_pair_once(tok, tmp_path, dp):
    path = write_records(tmp_path / "p.jsonl", random_pairs(11, seed=6))
    ds = PreferenceDataset(path, tok, 160)
    assert len(ds) == 11
    covered = []
    for rank in range(dp):
        batches = list(iter_all_pairs(ds, 3, rank, dp))
        indices = [i for b in batches for i in b["pair_index"].tolist()]
        assert indices == list(range(rank, 11, dp))
        assert [len(b["pair_index"]) for b in batches[:-1]] == [3] * (len(batches) - 1)
        for batch in batches:
            assert_same(batch, expected_batch(ds, batch["pair_index"].tolist()))
        covered += indices
    assert sorted(covered) == list(range(11))


def test_loader_rows_are_joined_along_pairs(tok, tmp_path):
    """GlobalBatchLoader copies rows along dim 0: a step of (B, 2, T) batches keeps each pair's two sides."""
    path = write_records(tmp_path / "p.jsonl", random_pairs(8, seed=7))
    ds = PreferenceDataset(path, tok, 64, seed=0)
    loader = GlobalBatchLoader(ds, micro_batch=2, grad_accum=2, dp_rank=0, dp_size=1)
    it = iter(loader)
    for _ in range(4):
        batch = next(it)
        assert batch["input_ids"].shape == (2, 2, 64) and batch["targets"].shape == (2, 2, 64)
        assert_same(batch, expected_batch(ds, batch["pair_index"].tolist()))
