"""Tokenizer training: SentencePiece and transformers give the same ids; round trips; fixed special ids; bad input.

The corpus is generated here (seeded): English-like words, Chinese and Japanese characters, Korean, Python-like code
with indentation and tabs, and JSON documents with newlines. SentencePiece (`tokenizer.model`) is the reference for
the transformers files; the original strings are the reference for round trips.
"""

import json
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import zstandard
from sentencepiece import sentencepiece_model_pb2

from dataset.files import find_files
from dataset.hf_tokenizer import parity_mismatches
from dataset.tokenizer import CHAT_TOKENS, SPECIAL_TOKENS, Tokenizer
from dataset.train_tokenizer import (
    INPUT_FILES,
    MAX_SENTENCE_BYTES,
    TokenizerTrainError,
    main,
    split_long,
    train_tokenizer,
)

transformers = pytest.importorskip("transformers")
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"

SYLLABLES = "ka to re mi an el or in st th qu ing ed er al on ation ment pre con".split()
HANZI = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 200))  # CJK ideographs
KANA = "".join(chr(c) for c in [*range(0x3041, 0x3097), *range(0x30A1, 0x30FB)])  # hiragana, katakana
HANGUL = "가나다라마바사아자차카타파하한국어문장입니다"
MIXED = [
    "The tokenizer reads 中文 and 日本語のテキスト side by side, plus 한국어.",
    "  two leading spaces, a\ttab, trailing spaces   ",
    "def add(a, b):\n    return a + b  # 加法\n\n\tif x == 0:\n\t\tpass\n",
    "東京タワーは333メートルです。価格は1234円。",
    "混合 mixed テキスト with code `x = [i ** 2 for i in range(10)]` 和数字 3.14159",
    "emoji 🙂🚀 and rare 𝔘𝔫𝔦 ꙮ fall back to bytes",
    "<|start_header_id|>user<|end_header_id|>\n\n你好<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHi!",
    "<|eot_id|> at the start, in the <|eot_id|>middle and at the end<|eot_id|>",
    "<s>literal control names</s> <pad> <unk> <0x41> stay text",
    "",
    " ",
]
ROUND_TRIPS = [
    "several     spaces",
    "\ttabs\t\tand\t\t\ttabs",
    "new\nlines\n\n\nand\r\nCRLF",
    " leading space",
    "trailing space ",
    "   both   ",
    "\n\nleading newlines",
    "红楼梦第一回：甄士隐梦幻识通灵，贾雨村风尘怀闺秀。",
    "ひらがなとカタカナと漢字。",
    "emoji 🙂🚀👩‍💻 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    'class A:\n    def f(self, x: int) -> str:\n        return f"{x:>4}"  # fmt\n',
    "",
    " ",
]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))


def _line(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.35:
        return " ".join(_word(rng) for _ in range(rng.randint(3, 15))).capitalize() + rng.choice(".,!?")
    if kind < 0.55:
        return "".join(rng.choice(HANZI) for _ in range(rng.randint(5, 40))) + "。"
    if kind < 0.7:
        return "".join(rng.choice(KANA + HANZI[:100]) for _ in range(rng.randint(5, 30))) + "。"
    if kind < 0.75:
        return "".join(rng.choice(HANGUL) for _ in range(rng.randint(3, 12)))
    indent = rng.choice(["", "    ", "        ", "\t", "\t\t"])
    name, arg = _word(rng), _word(rng)
    return rng.choice(
        [
            f"{indent}def {name}({arg}, n={rng.randint(0, 999)}):",
            f"{indent}return [{arg} ** 2 for {arg} in range({rng.randint(1, 99)})]  # {name}",
            f"{indent}if {arg} == {rng.randint(0, 9)}: {name}({arg!r}, x=[1, 2.5e-3])",
            f"{indent}{name} = {{'{arg}': {rng.randint(0, 99)}, \"ok\": True}}",
        ]
    )


def _write_corpus(directory: Path, seed: int = 0, lines: int = 3000) -> tuple[Path, Path]:
    rng = random.Random(seed)
    txt = directory / "mixed.txt"
    txt.write_text("\n".join(_line(rng) for _ in range(lines)) + "\n", encoding="utf-8")
    jsonl = directory / "docs.jsonl"
    docs = ["\n".join(_line(rng) for _ in range(rng.randint(2, 8))) for _ in range(200)]
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return txt, jsonl


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer([str(p) for p in corpus], out, vocab_size=1000, extra_special_tokens=["<|tool|>"])


@pytest.fixture(scope="module")
def hf(trained):
    return transformers.AutoTokenizer.from_pretrained(str(trained))


def test_writes_sentencepiece_and_transformers_files(trained):
    names = {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert names <= {p.name for p in trained.iterdir()}
    config = json.loads((trained / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    record = json.loads((trained / "train_tokenizer.json").read_text())
    assert record["corpus"]["files"] == 2 and record["corpus"]["documents"] == 3000 + 200
    assert record["corpus"]["sentences"] > 3000 + 2 * 200  # documents are split into lines


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_round_trip(trained, hf, text):
    tok = Tokenizer(trained)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert hf.decode(ids, skip_special_tokens=True) == text


def test_emoji_uses_byte_fallback(trained):
    tok = Tokenizer(trained)
    pieces = tok.sp.id_to_piece(tok.encode("🙂"))
    assert pieces[1:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]  # the 4 UTF-8 bytes of U+1F642, after "▁"
    assert tok.sp.unk_id() not in tok.encode("".join(ROUND_TRIPS))


def test_transformers_ids_equal_sentencepiece(trained, hf):
    tok = Tokenizer(trained)
    texts = MIXED + ROUND_TRIPS
    got = hf(texts)["input_ids"]  # transformers adds BOS by default, never EOS
    for text, ids in zip(texts, got, strict=True):
        assert ids == [1, *tok.encode(text)], text
    assert tok.encode(MIXED[0], bos=True, eos=True) == hf(MIXED[0])["input_ids"] + [2]
    assert hf("a b", "c")["input_ids"] == [1, *tok.encode("a b"), 1, *tok.encode("c")]
    assert parity_mismatches(trained, texts) == []
    # a corpus line that starts as the chat template does is BOS in transformers by design: not a training failure
    assert parity_mismatches(trained, ["<s><|start_header_id|>user<|end_header_id|>"]) == []


def test_tokenizer_class_through_hf_files_only(trained, tmp_path):
    # A directory without tokenizer.model makes dataset.tokenizer.Tokenizer use AutoTokenizer.
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(trained / name, tmp_path / name)
    sp, hf = Tokenizer(trained), Tokenizer(tmp_path)
    assert sp.sp is not None and hf.hf is not None
    assert hf.encode_batch(MIXED, bos=True, eos=True) == sp.encode_batch(MIXED, bos=True, eos=True)
    assert (hf.unk_id, hf.bos_id, hf.eos_id, hf.pad_id) == (sp.unk_id, sp.bos_id, sp.eos_id, sp.pad_id) == (0, 1, 2, 3)
    assert hf.vocab_size == sp.vocab_size == 1000
    for text in ROUND_TRIPS:
        assert hf.decode(sp.encode(text)) == text


def test_ids_past_the_vocabulary_decode_as_unk(trained, hf, tmp_path):
    # a model's vocabulary is padded to a multiple of 64 x tp: its extra rows can be sampled and must still decode
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(trained / name, tmp_path / name)
    ids = Tokenizer(trained).encode(MIXED[0])
    padded = [*ids, 1000, 1023]
    assert Tokenizer(trained).decode(padded) == spm.SentencePieceProcessor(
        model_file=str(trained / "tokenizer.model")
    ).decode([*ids, 0, 0])
    assert Tokenizer(tmp_path).decode(padded) == hf.decode([*ids, 0, 0], skip_special_tokens=True)


def test_special_tokens_have_fixed_ids(trained, hf):
    tok = Tokenizer(trained)
    for i, piece in enumerate([*SPECIAL_TOKENS, *CHAT_TOKENS, "<|tool|>"]):
        assert tok.token_id(piece) == i
        assert hf.convert_tokens_to_ids(piece) == i
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    sp = tok.sp
    assert [sp.is_control(i) for i in range(1, 4)] == [True] * 3
    # User-defined (type 4): matched in text, unlike control pieces.
    proto = sentencepiece_model_pb2.ModelProto.FromString((trained / "tokenizer.model").read_bytes())
    assert [p.type for p in proto.pieces[:8]] == [2, 3, 3, 3, 4, 4, 4, 4]


def test_chat_markers_in_text_encode_to_their_ids(trained, hf):
    tok = Tokenizer(trained)
    for text in ["a<|eot_id|>b", "<|eot_id|>", "x <|eot_id|> y", "<|start_header_id|>user<|end_header_id|>"]:
        ids = tok.encode(text)
        assert ids == hf(text, add_special_tokens=False)["input_ids"]
        assert ids.count(6) == text.count("<|eot_id|>")
    # As in SentencePiece, the dummy prefix "▁" stands alone before a marker that starts the text.
    assert tok.sp.id_to_piece(tok.encode("<|eot_id|>hi"))[:2] == ["▁", "<|eot_id|>"]
    assert tok.encode("<|tool|>") == [tok.sp.piece_to_id("▁"), 7]


def test_literal_control_names_are_text(trained, hf):
    tok = Tokenizer(trained)
    for text in ["<s>", "a</s>b", "<pad> <unk>", "<0x41>"]:
        ids = tok.encode(text)
        assert not {0, 1, 2, 3} & set(ids)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert tok.decode(ids) == text


def test_documented_difference_control_name_right_after_marker(trained, hf):
    # The one known BPE difference (module docstring): a text that is exactly a control or byte piece name and
    # follows a chat marker at the end of the text is read by transformers as that piece; SentencePiece spells it.
    tok = Tokenizer(trained)
    assert 2 not in tok.encode("<|eot_id|></s>")
    assert hf("<|eot_id|></s>", add_special_tokens=False)["input_ids"][-1] == 2
    assert hf("<|eot_id|></s> ", add_special_tokens=False)["input_ids"] == tok.encode("<|eot_id|></s> ")


def test_merge_order_matches_sentencepiece_on_corpus(trained, corpus):
    # Every training line and document, one by one: the BPE merges rebuilt from piece scores agree everywhere.
    lines = corpus[0].read_text(encoding="utf-8").splitlines()
    docs = [json.loads(line)["text"] for line in corpus[1].read_text(encoding="utf-8").splitlines()]
    assert parity_mismatches(trained, lines + docs) == []


@pytest.mark.parametrize(
    ("model_type", "normalization"), [("unigram", "identity"), ("unigram", "nfkc"), ("bpe", "nfkc")]
)
def test_other_models_and_nfkc_agree(corpus, tmp_path, model_type, normalization):
    out = train_tokenizer(
        [str(corpus[0])], tmp_path, vocab_size=1000, model_type=model_type, normalization=normalization
    )
    tok, hf = Tokenizer(out), transformers.AutoTokenizer.from_pretrained(str(out))
    texts = [*MIXED, *ROUND_TRIPS, "ＦＵＬＬ　ｗｉｄｔｈ ① ﬁ ｶﾀｶﾅ"]
    assert hf(texts, add_special_tokens=False)["input_ids"] == tok.encode_batch(texts)
    if normalization == "nfkc":
        assert tok.encode("ＡＢＣ　１２３") == tok.encode("ABC 123")
    else:
        assert tok.decode(tok.encode(ROUND_TRIPS[0])) == ROUND_TRIPS[0]


def test_same_seed_same_model(corpus, tmp_path):
    def model(name, seed):
        out = train_tokenizer([str(corpus[0])], tmp_path / name, vocab_size=1000, max_bytes=100_000, seed=seed)
        return (out / "tokenizer.model").read_bytes()

    assert model("a", 3) == model("b", 3) != model("c", 4)  # the seed picks the --max-bytes sample


def _two_halves(directory: Path) -> Path:
    # 2000 ASCII lines, then 2000 lines of characters that appear nowhere in the first half.
    rng = random.Random(1)
    english = [" ".join(_word(rng) for _ in range(8)) for _ in range(2000)]
    chinese = ["".join(rng.choice(HANZI[:60]) for _ in range(20)) for _ in range(2000)]
    path = directory / "halves.txt"
    path.write_text("\n".join(english + chinese) + "\n", encoding="utf-8")
    return path


def _as_zst_shards(path: Path) -> list[str]:
    # The halves as two .jsonl.zst shards, English then Chinese, like two sources sharded one after the other.
    lines = path.read_text(encoding="utf-8").splitlines()
    shards = []
    for k, half in enumerate((lines[:2000], lines[2000:])):
        data = "".join(json.dumps({"text": line}, ensure_ascii=False) + "\n" for line in half).encode()
        shard = path.parent / f"part-{k:05d}.jsonl.zst"
        shard.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(data))  # records the content size
        shards.append(str(shard))
    return shards


@pytest.mark.parametrize(
    ("bound", "zst"), [({"max_sentences": 400}, False), ({"max_bytes": 40_000}, False), ({"max_bytes": 40_000}, True)]
)
def test_bounds_sample_the_whole_input(tmp_path, bound, zst):
    # A head-of-input sample would never see the second half's characters; a uniform one does.
    path = _two_halves(tmp_path)
    inputs = _as_zst_shards(path) if zst else [str(path)]
    out = train_tokenizer(inputs, tmp_path / "tok", vocab_size=400, character_coverage=1.0, **bound)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert all(sp.piece_to_id(c) != sp.unk_id() for c in HANZI[:60])
    corpus = json.loads((out / "train_tokenizer.json").read_text())["corpus"]
    if "max_bytes" in bound:
        assert 0.8 * 40_000 < corpus["bytes"] <= 40_000
        assert corpus["skipped_by_max_bytes"] > 2000
        assert "each sentence kept with probability" in corpus["sampling"]
    else:
        assert corpus["sentences"] == 4000  # SentencePiece reads all and keeps its reservoir sample


def test_max_bytes_without_recorded_sizes_takes_the_head_and_says_so(tmp_path):
    path = _two_halves(tmp_path)
    shards = _as_zst_shards(path)
    data = zstandard.ZstdDecompressor().decompress(Path(shards[1]).read_bytes())
    with open(shards[1], "wb") as f, zstandard.ZstdCompressor().stream_writer(f) as w:  # no content size
        w.write(data)
    out = train_tokenizer(shards, tmp_path / "tok", vocab_size=400, character_coverage=1.0, max_bytes=40_000)
    corpus = json.loads((out / "train_tokenizer.json").read_text())["corpus"]
    assert f"the first bytes in input order ({shards[1]}: its zstd frames do not record" in corpus["sampling"]
    assert corpus["skipped_by_max_bytes"] == 0 and 0.9 * 40_000 < corpus["bytes"] <= 40_000


def test_long_lines_are_cut_not_dropped(tmp_path):
    rng = random.Random(2)
    long_zh = "".join(rng.choice(HANZI[:60]) for _ in range(3000))  # 9000 bytes in 3 parts, no spaces
    long_en = " ".join(_word(rng) for _ in range(2000))
    path = tmp_path / "long.txt"
    path.write_text(long_zh + "\n" + long_en + "\n", encoding="utf-8")
    out = train_tokenizer([str(path)], tmp_path / "tok", vocab_size=400, character_coverage=1.0)
    corpus = json.loads((out / "train_tokenizer.json").read_text())["corpus"]
    assert corpus["split_long_sentences"] == 2
    # Every byte arrives but the one space dropped at each cut of the English line.
    assert corpus["bytes"] == len(long_zh.encode()) + len(long_en.encode()) - (corpus["sentences"] - 3 - 1)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert all(sp.piece_to_id(c) != sp.unk_id() for c in set(long_zh))


def test_split_long():
    text = "".join(random.Random(0).choice(HANZI) for _ in range(5000))
    parts = split_long(text, 1000)
    assert "".join(parts) == text and all(len(p.encode()) <= 1000 for p in parts)
    words = " ".join(f"word{i}" for i in range(3000))
    parts = split_long(words)
    assert " ".join(parts) == words and all(len(p.encode()) <= MAX_SENTENCE_BYTES for p in parts)
    assert all(p == p.strip() for p in parts)  # cut at spaces only
    assert split_long("short") == ["short"]


def test_input_files(tmp_path, corpus):
    pattern = str(corpus[0].parent / "*.*")
    assert find_files([pattern, str(corpus[0])], INPUT_FILES) == sorted(corpus, key=lambda p: p.name)
    for bad, words in [
        ([str(tmp_path / "*.txt")], "matches no file"),
        ([str(tmp_path / "missing.txt")], "does not exist"),
        ([str(tmp_path)], "is a directory"),
        ([str(corpus[0]) + ".csv"], "does not exist"),
        ([], "no input"),
    ]:
        with pytest.raises(TokenizerTrainError, match=words):
            find_files(bad, INPUT_FILES)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(TokenizerTrainError, match="unsupported file type"):
        find_files([str(tmp_path / "data.csv")], INPUT_FILES)
    (tmp_path / "sub").mkdir()
    with pytest.raises(TokenizerTrainError, match=r"sub is a directory"):  # a glob that matches a directory names it
        find_files([str(tmp_path / "su*")], INPUT_FILES)


def test_bad_input_and_options_name_the_problem(tmp_path, corpus):
    good = [str(corpus[0])]
    cases = [
        ({"vocab_size": 200}, "--vocab-size 200 is too small"),
        ({"vocab_size": 300}, "--vocab-size 300 cannot hold the characters"),
        ({"vocab_size": 100_000}, "--vocab-size 100000 is more than this corpus supports"),
        ({"model_type": "wordpiece"}, "--model-type"),
        ({"normalization": "nfc"}, "--normalization"),
        ({"character_coverage": 1.5}, "--character-coverage"),
        ({"max_bytes": 0}, "--max-bytes"),
        ({"extra_special_tokens": ["<a b>"]}, "--extra-special-tokens"),
        ({"extra_special_tokens": ["<|eot_id|>"]}, "--extra-special-tokens"),
        ({"on_error": "ignore"}, "--on-error"),
    ]
    for options, words in cases:
        with pytest.raises(TokenizerTrainError, match=words):
            train_tokenizer(good, tmp_path / "out", **options)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(TokenizerTrainError, match=r"bad.jsonl:2: no 'text' field.*--text-field"):
        train_tokenizer([str(bad_json)], tmp_path / "out", vocab_size=300)
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes(b"good line\nbad \xff byte\n")
    with pytest.raises(TokenizerTrainError, match="bad.txt:2: invalid UTF-8"):
        train_tokenizer([str(bad_utf8)], tmp_path / "out", vocab_size=300)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n")
    with pytest.raises(TokenizerTrainError, match="blank.txt: empty"):
        train_tokenizer([str(blank)], tmp_path / "out", vocab_size=300)
    with pytest.raises(TokenizerTrainError, match="no text"):
        train_tokenizer(good, tmp_path / "out", vocab_size=300, max_bytes=1)


def test_skip_counts_bad_lines(tmp_path):
    rng = random.Random(5)
    path = tmp_path / "some_bad.jsonl"
    lines = [json.dumps({"text": _line(rng)}) for _ in range(400)]
    lines[10] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="some_bad.jsonl:11"):
        out = train_tokenizer([str(path)], tmp_path / "tok", vocab_size=1000, on_error="skip")
    corpus = json.loads((out / "train_tokenizer.json").read_text())["corpus"]
    assert corpus["documents"] == 399 and corpus["skipped"] == {"invalid_json": 1}


def test_cli(tmp_path, capsys):
    rng = random.Random(6)
    path = tmp_path / "numbers.txt"
    path.write_text(
        "\n".join(f"{_word(rng)} {rng.choice(['2024', '31415', '1000'])} {_word(rng)}" for _ in range(2000))
    )
    out = tmp_path / "cli"
    assert main([str(path), "--out", str(out), "--vocab-size", "400", "--no-split-digits", "--seed", "1"]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.get_piece_size() == 400
    assert len(sp.encode("31415")) < 3  # digits merge when they are not split
    extra = ["--extra-special-tokens", "<|a|>", "--extra-special-tokens", "<|b|>"]
    assert main([str(path), "--out", str(tmp_path / "x"), "--vocab-size", "400", *extra]) == 0
    assert Tokenizer(tmp_path / "x").encode("<|a|><|b|>")[1:] == [7, 8]
    assert main([str(tmp_path / "*.nothing"), "--out", str(out)]) == 2
    assert "matches no file" in capsys.readouterr().err


def test_digits_are_split_by_default(trained):
    tok = Tokenizer(trained)
    assert tok.sp.id_to_piece(tok.encode("2024 31415")) == ["▁", "2", "0", "2", "4", "▁", "3", "1", "4", "1", "5"]


def test_shared_text_agrees(tmp_path):
    files = [SHARED / "tinyshakespeare.txt", SHARED / "hongloumeng_zh.txt", SHARED / "arxiv_sample.jsonl.zst"]
    if not all(f.exists() for f in files):
        pytest.skip(f"shared test data not found in {SHARED}")
    out = train_tokenizer([str(f) for f in files], tmp_path, vocab_size=4000, max_bytes=2_000_000)
    lines = files[0].read_text(encoding="utf-8").splitlines()[:3000]
    lines += files[1].read_text(encoding="utf-8").splitlines()[:1000]
    tok = Tokenizer(out)
    assert parity_mismatches(out, lines) == []
    assert all(tok.decode(tok.encode(line)) == line for line in lines)
