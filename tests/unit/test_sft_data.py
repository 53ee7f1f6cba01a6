"""dataset/chat.py and dataset/sft.py: the loss mask, parity with transformers' apply_chat_template, record errors,
packing, truncation, resume."""

import json
import random
import re
import shutil
import warnings

import pytest
import torch
import zstandard

from dataset.chat import CHAT_TEMPLATE, ChatError, install_chat_template, normalize_record, render
from dataset.files import find_files
from dataset.hf_tokenizer import write_hf_files
from dataset.jsonl_zst import DataWarning
from dataset.sft import SFT_FILES, SFTDataError, SFTDataset, build_sft_loader, build_sft_train_loader
from dataset.tokenizer import Tokenizer, TokenizerError
from tests.chat_utils import chat_tokenizer_dir, msg, sentence, train_sp


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


SINGLE = {"prompt": "What is the quick fox?", "response": "The quick brown fox jumps over a lazy dog."}
INSTRUCTION = {"instruction": "Explain why.", "input": "the dog is lazy", "output": "Because it is 2024!", "system": ""}
MULTI = {
    "messages": [
        msg("user", "hello world"),
        msg("assistant", "Hello, what is your question?"),
        msg("user", "why is the fox quick?"),
        msg("assistant", "Because the dog is lazy."),
    ]
}
SYSTEM = {
    "messages": [
        msg("system", "You are a helpful assistant."),
        msg("user", "What is 2 + 2?"),
        msg("assistant", "The answer is 4."),
    ]
}
EDGE = [  # whitespace, digits, byte fallback, empty turns, literal control-token names
    [msg("user", "  two spaces\tand a tab\n\nand lines"), msg("assistant", " leading space and trailing  ")],
    [msg("system", "naïve café 中文 🙂"), msg("user", ""), msg("assistant", "12345 ends\n")],
    [msg("user", "say <s> and </s> and <pad>"), msg("assistant", "")],
    [msg("user", "a"), msg("assistant", "b"), msg("user", "c"), msg("assistant", "\n\nd")],
]


def labelled_runs(ids, labels):
    """Contiguous runs of labelled tokens; a label is the token itself."""
    runs, run = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != -100:
            assert label == token
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    return [*runs, run] if run else runs


@pytest.mark.parametrize("record", [SINGLE, INSTRUCTION, MULTI, SYSTEM], ids=["qa", "instruction", "multi", "system"])
def test_only_assistant_tokens_carry_labels(tok, record):
    messages = normalize_record(record, "x.jsonl", 1)
    ids, labels = render(messages, tok)
    assert len(ids) == len(labels) and ids[0] == tok.bos_id
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = labelled_runs(ids, labels)
    assert len(runs) == len(replies)
    end_header, eot = tok.token_id("<|end_header_id|>"), tok.token_id("<|eot_id|>")
    for run, reply in zip(runs, replies, strict=True):
        assert run[-1] == eot
        # decoded after a marker, so SentencePiece keeps a leading space
        assert tok.decode([end_header, *run]) == "<|end_header_id|>" + reply + "<|eot_id|>"
    # everything else is the template around the other turns
    unlabelled = [t for t, x in zip(ids, labels, strict=True) if x == -100]
    text = tok.decode(unlabelled)
    for m in messages:
        assert f"<|start_header_id|>{m['role']}<|end_header_id|>" in text
        if m["role"] != "assistant":
            assert m["content"] in text


def test_normalized_forms():
    assert normalize_record(SINGLE, "f", 1) == [msg("user", SINGLE["prompt"]), msg("assistant", SINGLE["response"])]
    assert normalize_record(INSTRUCTION, "f", 1) == [
        msg("user", "Explain why.\n\nthe dog is lazy"),
        msg("assistant", "Because it is 2024!"),
    ]
    qa = {"instruction": "do it", "input": "", "output": "done", "system": "be brief"}
    assert normalize_record(qa, "f", 1) == [msg("system", "be brief"), msg("user", "do it"), msg("assistant", "done")]
    extra = {"messages": [{"role": "user", "content": "x", "name": "n"}, msg("assistant", "y")]}
    assert normalize_record(extra, "f", 1) == [msg("user", "x"), msg("assistant", "y")]


def conversations():
    return [normalize_record(r, "x", 1) for r in (SINGLE, INSTRUCTION, MULTI, SYSTEM)] + EDGE


@pytest.mark.parametrize("generation", [False, True], ids=["train", "generation_prompt"])
def test_ids_and_mask_equal_transformers_apply_chat_template(tok, hf, generation):
    for messages in conversations():
        if generation:
            messages = messages[:-1]
        ids, labels = render(messages, tok, add_generation_prompt=generation)
        # a plain call: the template's own "<s>" is BOS, a message's literal "<s>" stays text (EDGE has one)
        out = hf.apply_chat_template(
            messages,
            chat_template=CHAT_TEMPLATE,
            add_generation_prompt=generation,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        assert out["input_ids"] == ids, messages
        assert [int(x != -100) for x in labels] == out["assistant_masks"], messages
        # SentencePiece on the whole rendered text gives the same ids
        text = hf.apply_chat_template(
            messages, chat_template=CHAT_TEMPLATE, add_generation_prompt=generation, tokenize=False
        )
        assert text.startswith("<s>")
        assert ids == [tok.bos_id, *tok.sp.encode(text[len("<s>") :])]
        if generation:
            assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_transformers_only_tokenizer_renders_the_same(tok, tok_dir, tmp_path):
    hf_only = tmp_path / "hf"
    shutil.copytree(tok_dir, hf_only)
    (hf_only / "tokenizer.model").unlink()
    other = Tokenizer(hf_only)
    assert other.sp is None
    for messages in conversations():
        assert render(messages, other) == render(messages, tok)


def test_install_chat_template(tok, tok_dir, tmp_path):
    from transformers import AutoTokenizer

    target = tmp_path / "tok"
    shutil.copytree(tok_dir, target)
    (target / "chat_template.jinja").write_text("{{ 'stale' }}")  # would shadow the config entry
    config = install_chat_template(target)
    assert json.loads(config.read_text())["chat_template"] == CHAT_TEMPLATE
    hf = AutoTokenizer.from_pretrained(str(target))
    assert hf.chat_template == CHAT_TEMPLATE
    messages = conversations()[3]
    got = hf.apply_chat_template(messages, return_dict=True)
    assert got["input_ids"] == render(messages, tok)[0]
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: not found"):
        install_chat_template(tmp_path)


def test_token_joining_separator_and_content_is_labelled(tmp_path):
    """A vocabulary with a piece "\\n\\n-": the assistant mask covers it, as transformers' does."""
    from transformers import AutoTokenizer

    rng = random.Random(1)
    directory = train_sp(tmp_path / "tok", ["\n\n-" + sentence(rng) for _ in range(3000)])
    write_hf_files(directory / "tokenizer.model", directory)
    tok, hf = Tokenizer(directory), AutoTokenizer.from_pretrained(str(directory))
    joined = tok.sp.piece_to_id("\n\n-")
    assert tok.sp.id_to_piece(joined) == "\n\n-"  # the case under test exists
    messages = [msg("user", "-hello"), msg("assistant", "-the fox")]
    ids, labels = render(messages, tok)
    out = hf.apply_chat_template(
        messages,
        chat_template=CHAT_TEMPLATE,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert ids == out["input_ids"]
    assert [int(x != -100) for x in labels] == out["assistant_masks"]
    (run,) = labelled_runs(ids, labels)
    assert run[0] == joined and ids.count(joined) == 2


def test_tokenizer_without_chat_markers_is_refused(tmp_path):
    rng = random.Random(2)
    directory = train_sp(tmp_path / "plain", [sentence(rng) for _ in range(500)], vocab_size=300, markers=False)
    with pytest.raises(TokenizerError, match=r"lacks \['<\|start_header_id\|>'.*python -m dataset.train_tokenizer"):
        render([msg("user", "a"), msg("assistant", "b")], Tokenizer(directory))


def test_render_checks_roles_for_generation(tok):
    with pytest.raises(ChatError, match="a generation prompt follows a user message"):
        render([msg("user", "a"), msg("assistant", "b")], tok, add_generation_prompt=True)
    with pytest.raises(ChatError, match="training needs it to end with an assistant reply"):
        render([msg("user", "a")], tok)


# --- files -----------------------------------------------------------------------------------------------------


def write_records(path, lines):
    """Lines are dicts (written as JSON) or raw strings; .zst paths are compressed."""
    data = "".join((ln if isinstance(ln, str) else json.dumps(ln, ensure_ascii=False)) + "\n" for ln in lines)
    raw = data.encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(raw) if path.name.endswith(".zst") else raw)
    return path


U, A, S = msg("user", "u"), msg("assistant", "a"), msg("system", "s")
BAD = [
    ({"messages": [A]}, "message 0 has role 'assistant' first; roles go: optional system first"),
    ({"messages": [U, U, A]}, "message 1 has role 'user' after 'user'"),
    ({"messages": [U, A, A]}, "message 2 has role 'assistant' after 'assistant'"),
    ({"messages": [U, S, A]}, "message 1 has role 'system' after 'user'"),
    ({"messages": [S, A]}, "message 1 has role 'assistant' after 'system'"),
    ({"messages": [U, A, U]}, "the conversation ends with a user message; training needs it to end with an assistant"),
    ({"messages": [S]}, "only a system message"),
    ({"messages": []}, "no messages"),
    ({"messages": [msg("tool", "x"), A]}, "message 0 has role 'tool'; use 'system', 'user' or 'assistant'"),
    ({"messages": [{"role": "user"}, A]}, "message 0 needs string fields 'role' and 'content'"),
    ({"messages": "hi"}, "'messages' must be a list"),
    ({"prompt": "x"}, "field 'response' must be a string, found missing"),
    ({"instruction": "x", "output": 3}, "field 'output' must be a string, found a int"),
    ({"text": "x"}, "unknown record form (keys ['text'])"),
    ({"prompt": "a <|eot_id|> b", "response": "x"}, "message 0 contains the chat marker <|eot_id|>"),
    ([1, 2], "a record is a JSON object, found list"),
    ('{"prompt": "x", ', "invalid JSON"),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
@pytest.mark.parametrize("bad,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_record_names_file_and_line(tok, tmp_path, suffix, bad, message):
    path = write_records(tmp_path / f"sft{suffix}", [SINGLE, "", MULTI, bad, SYSTEM])
    with pytest.raises(SFTDataError, match=re.escape(f"{path}:4: {message}")) as info:
        SFTDataset(path, tok, 64)
    assert "set on_error='skip'" in str(info.value)


def test_skip_counts_and_warns(tok, tmp_path):
    path = write_records(tmp_path / "sft.jsonl.zst", [SINGLE, *[b for b, _ in BAD], MULTI, "", SYSTEM])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = SFTDataset(path, tok, 128, on_error="skip")
    assert ds.stats() == {"conversations": 3, "dropped": 0, "truncated": 0, "skipped": len(BAD)}
    shown = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(shown) == 10 and f"{path}:2:" in str(shown[0].message)


def test_file_errors(tok, tmp_path):
    with pytest.raises(SFTDataError, match="the glob matches no file"):
        find_files(str(tmp_path / "*.jsonl"), SFT_FILES)
    (tmp_path / "a.txt").write_text("x\n")
    with pytest.raises(SFTDataError, match=r"a\.txt: unsupported file type"):
        find_files(tmp_path / "a.txt", SFT_FILES)
    with pytest.raises(SFTDataError, match=r"b\.jsonl: no such file"):
        find_files([tmp_path / "b.jsonl"], SFT_FILES)
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(SFTDataError, match=r"d\.jsonl: no such file"):  # a glob match that is a directory
        find_files(str(tmp_path / "*.jsonl"), SFT_FILES)
    path = write_records(tmp_path / "c.jsonl", [SINGLE])
    with pytest.raises(SFTDataError, match="1 usable conversations for 2 data-parallel ranks"):
        SFTDataset(path, tok, 64, dp_rank=1, dp_size=2)


# --- batches ---------------------------------------------------------------------------------------------------


def random_records(n, seed):
    rng = random.Random(seed)
    records = []
    for i in range(n):
        turns = rng.randint(1, 3)
        messages = [msg("system", sentence(rng, 1, 4))] if i % 3 == 0 else []
        for _ in range(turns):
            messages += [msg("user", sentence(rng, 1, 8)), msg("assistant", sentence(rng, 1, 10))]
        records.append({"messages": messages} if i % 2 else {"prompt": sentence(rng), "response": sentence(rng)})
    return records


def reference_rows(rendered, orders, window, pack, pad):
    """Next-fit packing written out plainly: (tokens, labels, document ids) per row of `window` tokens."""
    row = []
    for index in (i for order in orders for i in order):
        ids, labels = rendered[index]
        if row and (not pack or len(row) + len(ids) > window):
            yield finish(row, window, pad)
            row = []
        doc = row[-1][2] + 1 if row else 0
        row += [(t, x, doc) for t, x in zip(ids, labels, strict=True)]
    yield finish(row, window, pad)


def finish(row, window, pad):
    doc = row[-1][2] + 1
    row = row + [(pad, -100, doc)] * (window - len(row))
    return [list(column) for column in zip(*row, strict=True)]


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "padded"])
def test_batches_equal_reference_packing(tok, tmp_path, pack):
    records = random_records(40, seed=3)
    path = write_records(tmp_path / "sft.jsonl", records)
    rendered = [render(normalize_record(r, path, 1), tok) for r in records]
    seq_len = 128
    assert max(len(ids) for ids, _ in rendered) <= seq_len + 1
    for rank in range(2):
        ds = SFTDataset(path, tok, seq_len, dp_rank=rank, dp_size=2, seed=5, pack=pack)
        assert ds.stats() == {"conversations": 40, "dropped": 0, "truncated": 0, "skipped": 0}
        loader = build_sft_loader(ds, 3)
        batches = [next(loader) for _ in range(12)]  # more than two epochs of this rank's 20 conversations
        ref = reference_rows(rendered, (ds.order(e) for e in range(10)), seq_len + 1, pack, tok.pad_id)
        for batch in batches:
            assert {k: v.shape for k, v in batch.items()} == {
                k: (3, seq_len) for k in ("input_ids", "targets", "document_ids")
            }
            for b in range(3):
                tokens, labels, docs = next(ref)
                assert batch["input_ids"][b].tolist() == tokens[:-1]
                assert batch["targets"][b].tolist() == labels[1:]
                assert batch["document_ids"][b].tolist() == docs[:-1]
    rows = [(b["document_ids"][r], b["input_ids"][r]) for b in batches for r in range(3)]
    per_row = [len(set(docs[tokens != tok.pad_id].tolist())) for docs, tokens in rows]
    if pack:  # several whole conversations per row
        assert sum(per_row) / len(per_row) > 1.5
    else:
        assert set(per_row) == {1}


def test_epoch_orders_are_disjoint_per_rank_and_reseeded(tok, tmp_path):
    path = write_records(tmp_path / "sft.jsonl", random_records(31, seed=4))
    ranks = [SFTDataset(path, tok, 128, dp_rank=r, dp_size=3, seed=7) for r in range(3)]
    for epoch in range(3):
        orders = [ds.order(epoch) for ds in ranks]
        assert sorted(i for order in orders for i in order) == list(range(31))
    assert ranks[0].order(0) != ranks[0].order(1)
    again = SFTDataset(path, tok, 128, dp_rank=0, dp_size=3, seed=7)
    assert again.order(1) == ranks[0].order(1)
    assert SFTDataset(path, tok, 128, dp_rank=0, dp_size=3, seed=8).order(1) != ranks[0].order(1)


def test_packed_targets_never_cross_conversations(tok, tmp_path):
    path = write_records(tmp_path / "sft.jsonl", random_records(30, seed=6))
    batch = next(build_sft_loader(SFTDataset(path, tok, 200), 4))
    docs, targets, inputs = batch["document_ids"], batch["targets"], batch["input_ids"]
    last_of_doc = torch.ones_like(docs, dtype=torch.bool)
    last_of_doc[:, :-1] = docs[:, 1:] != docs[:, :-1]
    # the token after a conversation's last one is the next BOS or padding: never a target
    assert (targets[last_of_doc[:, :-1].nonzero(as_tuple=True)] == -100).all()
    padding = inputs == tok.pad_id
    assert (targets[padding] == -100).all()
    assert (docs[padding] == docs.max(dim=1, keepdim=True).values.expand_as(docs)[padding]).all()


def test_truncation(tok, tmp_path):
    rng = random.Random(8)
    short = {"prompt": "hi", "response": "hello"}
    long_reply = {"prompt": "hi", "response": sentence(rng, 40, 40)}  # labels left after the cut
    long_prompt = {"prompt": sentence(rng, 40, 40), "response": "yes"}  # the cut leaves no label
    path = write_records(tmp_path / "sft.jsonl", [short, long_reply, long_prompt])
    seq_len = 40
    dropped = SFTDataset(path, tok, seq_len)
    assert dropped.stats() == {"conversations": 1, "dropped": 2, "truncated": 0, "skipped": 0}
    cut = SFTDataset(path, tok, seq_len, truncation="truncate", pack=False)
    assert cut.stats() == {"conversations": 2, "dropped": 1, "truncated": 1, "skipped": 0}
    ids, labels = render(normalize_record(long_reply, path, 2), tok)
    assert len(ids) > seq_len + 1
    tokens, kept_labels = cut.conversation(1)
    assert tokens.tolist() == ids[: seq_len + 1] and kept_labels.tolist() == labels[: seq_len + 1]
    batch = next(build_sft_loader(cut, 2))
    row = 0 if cut.order(0)[0] == 1 else 1
    assert batch["input_ids"][row].tolist() == ids[:seq_len]
    assert batch["targets"][row].tolist() == labels[1 : seq_len + 1]
    assert (batch["document_ids"][row] == 0).all()


def test_resume_continues_exactly(tok, tmp_path):
    path = write_records(tmp_path / "sft.jsonl.zst", random_records(25, seed=9))

    def loader(**kw):  # one process, 2 rows x 2 micro-batches a step: 4 streams of about 6 conversations
        ds = SFTDataset(path, tok, 80, seed=kw.pop("seed", 3), **kw)
        return build_sft_train_loader(ds, micro_batch=2, grad_accum=2, dp_rank=0, dp_size=1)

    straight = iter(loader())
    batches = [next(straight) for _ in range(20)]  # several epochs of each stream
    first = loader()
    it = iter(first)
    for _ in range(8):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = loader()
    assert resumed.load_state_dict(state) == []
    it = iter(resumed)
    for want in batches[8:]:
        got = next(it)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert state["consumed"] == 16 and {s["windows"] for s in state["streams"].values()} == {4}
    assert all(s["state"]["epoch"] >= 0 and 0 <= s["state"]["position"] < 7 for s in state["streams"].values())
    with pytest.raises(ValueError, match=r"train.seed changed \(saved 3, now 4\); resume with the same data"):
        loader(seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"data.pack changed \(saved True, now False\)"):
        loader(pack=False).load_state_dict(state)


def test_packed_rows_give_each_conversation_its_own_logits_and_loss(tok, tmp_path):
    """A model fed a packed row with its document ids computes, for every conversation in it, the logits of that
    conversation alone; so the masked loss of the row is that of its conversations."""
    import torch.nn.functional as F

    from modeling.config import ModelConfig
    from modeling.llama import LlamaForCausalLM

    path = write_records(tmp_path / "sft.jsonl", random_records(30, seed=10))
    batch = next(build_sft_loader(SFTDataset(path, tok, 160, seed=1), 2))
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=-(-tok.vocab_size // 64) * 64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        packed = model(batch["input_ids"], document_ids=batch["document_ids"]).logits  # (B, T, V)
        loss = model(batch["input_ids"], targets=batch["targets"], document_ids=batch["document_ids"]).loss
    nll, count, checked = 0.0, 0, 0
    for b in range(2):
        docs, inputs, targets = batch["document_ids"][b], batch["input_ids"][b], batch["targets"][b]
        for doc in docs.unique().tolist():
            where = (docs == doc).nonzero().flatten()  # one contiguous run of positions
            if (inputs[where] == tok.pad_id).all():
                continue
            with torch.no_grad():
                alone = model(inputs[where].unsqueeze(0)).logits[0]  # (len, V): positions from 0, nothing before
            torch.testing.assert_close(packed[b, where], alone, atol=1e-5, rtol=0)
            nll += F.cross_entropy(alone, targets[where], ignore_index=-100, reduction="sum").item()
            count += int((targets[where] != -100).sum())
            checked += 1
    assert checked >= 4  # several conversations per row
    assert abs(loss.item() - nll / count) < 1e-5
