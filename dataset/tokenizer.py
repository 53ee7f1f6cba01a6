"""One tokenizer interface over SentencePiece (`tokenizer.model`) and transformers' AutoTokenizer.

Special tokens the project's trainer reserves with fixed ids (see `dataset/train_tokenizer.py`):
unk 0, bos 1, eos 2, pad 3, then the chat markers `<|start_header_id|>`, `<|end_header_id|>`, `<|eot_id|>`.
A tokenizer from elsewhere may lack some of them: their ids are then -1.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be loaded."""


class Tokenizer:
    """Text <-> ids; SentencePiece when the directory holds `tokenizer.model`, else transformers' AutoTokenizer."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.directory = directory
        self.sp = self.hf = None
        if (directory / "tokenizer.model").exists():
            import sentencepiece as spm

            self.sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
            self.vocab_size = self.sp.get_piece_size()
            self.unk_id, self.bos_id, self.eos_id, self.pad_id = (
                self.sp.unk_id(),
                self.sp.bos_id(),
                self.sp.eos_id(),
                self.sp.pad_id(),
            )
        elif (directory / "tokenizer.json").exists() or (directory / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(str(directory))
            self.vocab_size = len(self.hf)
            ids = [self.hf.unk_token_id, self.hf.bos_token_id, self.hf.eos_token_id, self.hf.pad_token_id]
            self.unk_id, self.bos_id, self.eos_id, self.pad_id = (-1 if i is None else i for i in ids)
        else:
            raise TokenizerError(
                f"{directory}: no tokenizer.model or tokenizer.json there; train one with "
                "`python -m dataset.train_tokenizer` or point at a Hugging Face model directory"
            )

    def token_id(self, piece: str) -> int:
        """Id of a single special piece such as `<|eot_id|>`, or -1 when the vocabulary lacks it."""
        if self.sp is not None:
            i = self.sp.piece_to_id(piece)
            return -1 if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i
        i = self.hf.convert_tokens_to_ids(piece)
        return -1 if i is None or i == self.hf.unk_token_id and piece != self.hf.unk_token else i

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of `text`, with BOS first / EOS last when asked (and the tokenizer has them)."""
        return self.encode_batch([text], bos=bos, eos=eos)[0]

    def encode_batch(self, texts: list[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        """Ids of each text (SentencePiece encodes the list in one call, which is faster than one by one)."""
        if self.sp is not None:
            out = self.sp.encode(texts)
        else:
            out = self.hf(texts, add_special_tokens=False)["input_ids"]
        head = [self.bos_id] if bos and self.bos_id >= 0 else []
        tail = [self.eos_id] if eos and self.eos_id >= 0 else []
        return [head + ids + tail for ids in out] if head or tail else out

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` (special tokens dropped; ids past the vocabulary, from a model's padded rows, shown as unk)."""
        ids = [int(i) if 0 <= int(i) < self.vocab_size else max(self.unk_id, 0) for i in ids]
        if self.sp is not None:
            return self.sp.decode(ids)
        return self.hf.decode(ids, skip_special_tokens=True)
