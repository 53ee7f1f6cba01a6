"""What the chat data tests share (tests/unit/test_sft_data.py, test_preference_data.py): a tiny tokenizer with the
chat markers and transformers files, random sentences, messages."""

import random
from pathlib import Path

import sentencepiece as spm

from dataset.hf_tokenizer import write_hf_files
from dataset.tokenizer import CHAT_TOKENS

WORDS = (
    "the quick brown fox jumps over a lazy dog hello world what is answer please explain why because you are "
    "helpful assistant question 2024 café 中文 naïve : , . ? !"
).split()


def train_sp(directory: Path, sentences: list[str], *, vocab_size: int = 400, markers: bool = True) -> Path:
    """A tiny BPE model with the project's fixed ids and settings (see dataset/train_tokenizer.py)."""
    directory.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        user_defined_symbols=list(CHAT_TOKENS) if markers else [],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        num_threads=1,
        minloglevel=2,
    )
    return directory


def sentence(rng: random.Random, lo: int = 3, hi: int = 12) -> str:
    """lo to hi random WORDS."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def chat_tokenizer_dir(directory: Path) -> Path:
    """`train_sp` on 3000 random sentences, with the transformers files beside it."""
    rng = random.Random(0)
    train_sp(directory, [sentence(rng) for _ in range(3000)])
    write_hf_files(directory / "tokenizer.model", directory)
    return directory


def msg(role: str, content: str) -> dict[str, str]:
    """A chat message."""
    return {"role": role, "content": content}
