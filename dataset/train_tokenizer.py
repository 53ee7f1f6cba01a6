"""Train the project's SentencePiece tokenizer (BPE or unigram) and write it for SentencePiece and transformers.

    python -m dataset.train_tokenizer /work/shared/data/*.txt 'shards/*.jsonl.zst' --out tokenizer --vocab-size 8192

writes `tokenizer/tokenizer.model` (read by `dataset.tokenizer.Tokenizer`) and `tokenizer.json`,
`tokenizer_config.json`, `special_tokens_map.json` (read by `transformers.AutoTokenizer`), which give the same ids,
plus `train_tokenizer.json` (the options and corpus counts, for the record).

Fixed ids: `<unk>` 0, `<s>` 1, `</s>` 2, `<pad>` 3 (control pieces: plain text never produces them, both libraries
spell a literal "<s>" out, except transformers at the very start of a chat-template text: dataset/hf_tokenizer.py),
then the chat markers `<|start_header_id|>` 4, `<|end_header_id|>` 5, `<|eot_id|>` 6 and
`--extra-special-tokens` in order (user-defined pieces: their text encodes to their id in both libraries, so a
chat template can render them as text). The settings follow Llama: identity normalization, a dummy prefix, no
whitespace collapsing (runs of spaces, tabs and newlines survive decode(encode(x))), byte fallback, split digits.

Input: `.txt` (one sentence per line), `.jsonl` and `.jsonl.zst` (field `--text-field`); globs are expanded here,
so quote them. Everything is streamed; each line, and each line of a JSON document, is one sentence; a sentence
longer than SentencePiece's limit is cut at a space (pieces never span a space) or a character boundary, and
counted; nothing is dropped. Bounds: `--max-sentences N` is SentencePiece's own reservoir sample, uniform over the
whole input (every file is read; memory holds N sentences). `--max-bytes B` keeps each sentence with probability
B / (total input bytes), seeded, when every input size is known (the file size, or for `.zst` the content sizes its
frame headers record, as data/shard.py and the `zstd` CLI write them; JSON overhead makes the sample smaller than B),
and the first B bytes in input order when a `.zst` file without recorded sizes makes the total unknown.

The transformers files hold a `tokenizers` pipeline built from the model (`dataset/hf_tokenizer.py`). Training ends
with a check that both give the same ids on probe strings and on a sample of the corpus: a difference is an error
for BPE and a warning for unigram (near-ties; `dataset/hf_tokenizer.py` lists the known differences).
The character U+2581 ("▁") in the input decodes to a space (as in Llama).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import re
import sys
import time
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dataset.chat import install_chat_template
from dataset.files import FileRules, find_files
from dataset.hf_tokenizer import ConversionError, parity_mismatches, write_hf_files
from dataset.jsonl_zst import FORMATS, ON_ERROR, iter_texts
from dataset.lines import DataError, decompressed_size
from dataset.tokenizer import CHAT_TOKENS, SPECIAL_TOKENS

logger = logging.getLogger(__name__)

MAX_SENTENCE_BYTES = 4192  # SentencePiece's default max_sentence_length; longer sentences are cut before it sees them
PROBES = (
    "Hello world",
    " leading space",
    "two  spaces,\tone tab,\n\nblank lines and trailing spaces  ",
    "中文，日本語のテキスト、English, and 한국어 mixed 123456 times.",
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # comment\n\tindent",
    "emoji 🙂🚀 and rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ",
    "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|> <|start_header_id|>assistant<|end_header_id|>",
    "<s>literal</s> <pad> <unk> <0x41> are text",
    "",
    "   ",
)


class TokenizerTrainError(ValueError):
    """Input or options that cannot train a tokenizer; the message names the file or flag to fix."""


# Paths and globs (expanded here) of .txt and .jsonl(.zst) files; a directory is refused, a file named twice read once.
INPUT_FILES = FileRules(
    suffixes=tuple(FORMATS),
    error=TokenizerTrainError,
    nothing="no input given: pass .txt, .jsonl or .jsonl.zst files or globs",
    missing="input {path} does not exist",
    no_match="input glob {item!r} matches no file (quote globs: they are expanded here)",
    unsupported="input {path}: unsupported file type; use one of {suffixes}",
    directories=None,
    directory="input {path} is a directory: pass a glob such as '{path}/*.txt'",
    others="report",
)


@dataclass
class CorpusStats:
    """What the corpus stream read and passed on to SentencePiece."""

    files: int = 0
    documents: int = 0
    sentences: int = 0
    bytes: int = 0
    split_long_sentences: int = 0
    skipped_by_max_bytes: int = 0
    skipped: Counter = field(default_factory=Counter)  # lines jsonl_zst skipped, by reason (blank, bad JSON, ...)
    sampling: str = "all"


@dataclass
class _ParitySample:
    """A seeded reservoir of sentences to check SentencePiece against transformers after training."""

    size: int
    rng: random.Random
    seen: int = 0
    texts: list[str] = field(default_factory=list)

    def offer(self, text: str) -> None:
        self.seen += 1
        if len(self.texts) < self.size:
            self.texts.append(text)
        elif (j := self.rng.randrange(self.seen)) < self.size:
            self.texts[j] = text


_NEWLINE = re.compile(r"\r\n|\r|\n")


def split_long(sentence: str, limit: int = MAX_SENTENCE_BYTES) -> list[str]:
    """`sentence` cut into parts of at most `limit` UTF-8 bytes, at the last space when there is one.

    The space at a cut is dropped: SentencePiece gives every sentence a dummy "▁" prefix, which stands for it.
    """
    parts = []
    while len(sentence) > limit // 4 and len(sentence.encode("utf-8")) > limit:
        head = sentence.encode("utf-8")[:limit].decode("utf-8", errors="ignore")  # whole characters only
        cut = head.rfind(" ")
        if cut > 0:
            parts.append(head[:cut])
            sentence = sentence[cut + 1 :]
        else:
            parts.append(head)
            sentence = sentence[len(head) :]
    return [*parts, sentence]


def iter_sentences(
    paths: Sequence[Path], *, text_field: str = "text", on_error: str = "raise", stats: CorpusStats | None = None
) -> Iterator[str]:
    """Non-empty sentences of `paths` in order: the lines of each document (a .txt line, a JSON record's text)."""
    stats = stats if stats is not None else CorpusStats()
    for path in paths:
        stats.files += 1
        try:
            for document in iter_texts(path, text_field=text_field, on_error=on_error, skipped=stats.skipped):
                stats.documents += 1
                for line in _NEWLINE.split(document):
                    if line:
                        parts = split_long(line)
                        stats.split_long_sentences += len(parts) > 1
                        yield from parts
        except DataError as e:
            raise TokenizerTrainError(f"{e} (in this script: --on-error skip, --text-field)") from e


def _bounded(sentences: Iterator[str], paths: Sequence[Path], max_bytes: int | None, seed: int, stats: CorpusStats):
    if max_bytes is None:
        yield from sentences
        return
    sizes = [decompressed_size(p) for p in paths]
    known = None not in sizes
    keep = min(1.0, max_bytes / max(1, sum(sizes))) if known else 1.0
    unknown = next((p for p, n in zip(paths, sizes, strict=True) if n is None), None)
    how = f"each sentence kept with probability {keep:.4g} (seed {seed})"
    if not known:
        how = f"the first bytes in input order ({unknown}: its zstd frames do not record their size)"
    then = "" if stats.sampling == "all" else f", then {stats.sampling}"
    stats.sampling = f"--max-bytes {max_bytes}: {how}{then}"
    rng = random.Random(seed)
    taken = 0
    for sentence in sentences:
        if keep < 1.0 and rng.random() >= keep:
            stats.skipped_by_max_bytes += 1
            continue
        size = len(sentence.encode("utf-8"))
        if taken + size > max_bytes:
            return
        taken += size
        yield sentence


def _check_options(
    vocab_size, model_type, character_coverage, normalization, special, max_sentences, max_bytes, on_error
):
    if on_error not in ON_ERROR:
        raise TokenizerTrainError(f"--on-error {on_error!r}: use raise or skip")
    if model_type not in ("bpe", "unigram"):
        raise TokenizerTrainError(f"--model-type {model_type!r}: use bpe or unigram")
    if normalization not in ("identity", "nfkc"):
        raise TokenizerTrainError(f"--normalization {normalization!r}: use identity or nfkc")
    if not 0.0 < character_coverage <= 1.0:
        raise TokenizerTrainError(f"--character-coverage {character_coverage}: must be in (0, 1], e.g. 0.9995")
    for flag, value in (("--max-sentences", max_sentences), ("--max-bytes", max_bytes)):
        if value is not None and value <= 0:
            raise TokenizerTrainError(f"{flag} {value}: must be positive (leave it out to use the whole input)")
    seen = set()
    for token in special:
        if not token or any(c.isspace() for c in token):
            raise TokenizerTrainError(f"--extra-special-tokens {token!r}: a special token needs text and no whitespace")
        if token in seen:
            raise TokenizerTrainError(f"--extra-special-tokens {token!r}: given twice or equal to a reserved token")
        if normalization == "nfkc" and unicodedata.normalize("NFKC", token) != token:
            raise TokenizerTrainError(f"--extra-special-tokens {token!r}: NFKC changes it; spell it in NFKC form")
        seen.add(token)
    if vocab_size <= len(special) + 256:
        raise TokenizerTrainError(
            f"--vocab-size {vocab_size} is too small: {len(special)} reserved pieces and 256 byte pieces come first"
        )


def _train_sentencepiece(sentences: Iterator[str], options: dict) -> bytes:
    import sentencepiece as spm

    raised: list[BaseException] = []

    def guarded() -> Iterator[str]:
        # SentencePiece turns an error in the iterator into a RuntimeError holding its text; keep the original.
        try:
            yield from sentences
        except BaseException as e:
            raised.append(e)
            raise

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=guarded(), model_writer=model, **options)
    except RuntimeError as e:
        if raised:
            raise raised[0] from None
        message = str(e)
        vocab = options["vocab_size"]
        if "smaller than required_chars" in message:
            raise TokenizerTrainError(
                f"--vocab-size {vocab} cannot hold the characters that cover --character-coverage "
                f"{options['character_coverage']} of this corpus ({message.split('required_chars.')[-1].strip()}): "
                "raise --vocab-size or lower --character-coverage"
            ) from e
        if "Vocabulary size too high" in message:
            raise TokenizerTrainError(
                f"--vocab-size {vocab} is more than this corpus supports ({message.split('Please')[-1].strip()}): "
                "lower --vocab-size or add text"
            ) from e
        if "!sentences_.empty()" in message:
            raise TokenizerTrainError("the inputs hold no text (every file empty, or --max-bytes too small)") from e
        raise TokenizerTrainError(f"SentencePiece training failed: {message}") from e
    return model.getvalue()


def train_tokenizer(
    inputs: Sequence[str],
    out_dir: str | Path,
    *,
    vocab_size: int = 32000,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    split_digits: bool = True,
    normalization: str = "identity",
    extra_special_tokens: Sequence[str] = (),
    max_sentences: int | None = None,
    max_bytes: int | None = None,
    text_field: str = "text",
    on_error: str = "raise",
    num_threads: int | None = None,
    seed: int = 0,
) -> Path:
    """Train on `inputs` (files or globs) and write SentencePiece and transformers files into `out_dir`; return it."""
    import sentencepiece as spm

    special = [*SPECIAL_TOKENS, *CHAT_TOKENS, *extra_special_tokens]
    _check_options(
        vocab_size, model_type, character_coverage, normalization, special, max_sentences, max_bytes, on_error
    )
    paths = find_files(inputs, INPUT_FILES)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = CorpusStats()
    sample = _ParitySample(size=1000, rng=random.Random(seed))

    def sentences() -> Iterator[str]:
        stream = iter_sentences(paths, text_field=text_field, on_error=on_error, stats=stats)
        for sentence in _bounded(stream, paths, max_bytes, seed, stats):
            stats.sentences += 1
            stats.bytes += len(sentence.encode("utf-8"))
            sample.offer(sentence)
            yield sentence

    if max_sentences is not None:
        stats.sampling = f"--max-sentences {max_sentences}: SentencePiece's uniform reservoir sample (seed {seed})"
    spm.set_random_generator_seed(seed)
    options = dict(
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        split_digits=split_digits,
        normalization_rule_name=normalization,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        **{f"{name}_id": i for i, name in enumerate(("unk", "bos", "eos", "pad"))},
        **{f"{name}_piece": piece for name, piece in zip(("unk", "bos", "eos", "pad"), SPECIAL_TOKENS, strict=True)},
        user_defined_symbols=special[len(SPECIAL_TOKENS) :],
        max_sentence_length=MAX_SENTENCE_BYTES,
        input_sentence_size=max_sentences or 0,
        shuffle_input_sentence=True,
        num_threads=num_threads or os.cpu_count() or 1,
    )
    if model_type == "unigram":
        # transformers' Viterbi can only avoid control and byte pieces (see hf_tokenizer.build_hf_backend) when their
        # names can be spelled out of ordinary pieces, so the characters of those names are always in the vocabulary.
        options["required_chars"] = "".join(sorted(set("".join(SPECIAL_TOKENS) + "0123456789ABCDEFx")))
    start = time.perf_counter()
    model = _train_sentencepiece(sentences(), {**options, "minloglevel": 1})
    seconds = time.perf_counter() - start
    tmp = out_dir / "tokenizer.model.tmp"
    tmp.write_bytes(model)
    os.replace(tmp, out_dir / "tokenizer.model")
    logger.info(
        "trained %s vocab %d in %.1f s on %d sentences (%.1f MB) from %d files; %d long sentences cut; sampling: %s",
        model_type, vocab_size, seconds, stats.sentences, stats.bytes / 1e6, stats.files,
        stats.split_long_sentences, stats.sampling,
    )  # fmt: skip
    try:
        write_hf_files(out_dir / "tokenizer.model", out_dir)
    except ConversionError as e:
        raise TokenizerTrainError(str(e)) from None
    install_chat_template(out_dir)  # the SFT chat format, so apply_chat_template renders what sft.py trains on
    grouped = ["\n".join(sample.texts[i : i + 8]) for i in range(0, len(sample.texts), 8)]
    texts = [*PROBES, *sample.texts, *grouped]
    if mismatches := parity_mismatches(out_dir, texts):
        text, want, got = mismatches[0]
        at = next((i for i, (x, y) in enumerate(zip(want, got, strict=False)) if x != y), min(len(want), len(got)))
        message = (
            f"{out_dir}: the transformers files disagree with tokenizer.model on {len(mismatches)} of {len(texts)} "
            f"checked texts, e.g. {text[:100]!r}: SentencePiece {want[at : at + 6]} vs transformers {got[at : at + 6]}"
        )
        if model_type == "bpe":  # exact by construction: a difference is a bug, report it with the text
            raise TokenizerTrainError(message + "; tokenizer.model is sound, the HF files are not")
        # Unigram: SentencePiece sums piece scores in float32, tokenizers in float64; near-ties in long texts differ.
        logger.warning("%s (unigram near-ties, see the module docstring; the project uses tokenizer.model)", message)
    logger.info("checked SentencePiece against transformers on %d texts; wrote %s", len(texts), out_dir)
    record = {"inputs": [str(p) for p in paths], "sentencepiece": options, "seed": seed, "text_field": text_field}
    record.update(corpus={**asdict(stats), "skipped": dict(stats.skipped)}, train_seconds=round(seconds, 2))
    (out_dir / "train_tokenizer.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return out_dir


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="files or quoted globs: .txt, .jsonl, .jsonl.zst")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--character-coverage", type=float, default=0.9995, help="0.9995 suits Chinese; 1.0 for ASCII")
    parser.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--split-digits", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--normalization", choices=("identity", "nfkc"), default="identity")
    parser.add_argument(
        "--extra-special-tokens", action="append", default=[], metavar="TOKEN", help="a marker (id 7 on); repeatable"
    )
    parser.add_argument("--max-sentences", type=int, help="uniform sample of N sentences (default: all)")
    parser.add_argument("--max-bytes", type=int, help="sample of at most B bytes of text (default: all)")
    parser.add_argument("--text-field", default="text", help="JSON field holding the text of .jsonl(.zst) records")
    parser.add_argument("--on-error", choices=ON_ERROR, default="raise", help="bad lines: stop, or count")
    parser.add_argument("--num-threads", type=int, help="SentencePiece threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        train_tokenizer(args.inputs, args.out, **{k: v for k, v in vars(args).items() if k not in ("inputs", "out")})
    except TokenizerTrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
