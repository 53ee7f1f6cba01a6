"""Tokens/s per core of the streaming loader against bare SentencePieceProcessor.encode on the same text.

The loader path is the whole pipeline of dataset/streaming.py in the main process (num_workers=0): zstd decoding
(with its verification pass), line splitting, JSON, tokenization (Tokenizer.encode_batch) and packing into
(B, seq_len) tensors. The baseline encodes the same documents, already in memory, with the same call
(`SentencePieceProcessor.encode(list)`). Both are timed in CPU seconds of this process (threads included), so the
figures are per core; runs alternate and the best of each is kept, so machine noise hits both alike. Target:
ratio >= 0.70.

    python -m bench.dataloader                                   # the shared arxiv sample, a tokenizer trained here
    python -m bench.dataloader --data 'shards/*.jsonl.zst' --tokenizer tok --seq-len 2048 --batch-size 8

Measured on a busy 2-core machine (--rounds 3): the default corpus (corpus/default/train, 1.8 MB, vocab 4096):
bare 2.0 M tokens/s per core, loader 1.7 M, ratio 0.85; the shared arxiv sample (1.2 MB, vocab 8000 trained
here): bare 1.28 M, loader 1.23 M, ratio 0.96.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.jsonl_zst import iter_texts, resolve_paths  # noqa: E402
from dataset.rank_loader import build_dataloader  # noqa: E402
from dataset.streaming import StreamingDataset  # noqa: E402
from dataset.tokenizer import Tokenizer  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "arxiv_sample.jsonl.zst"


def train_tokenizer(texts: list[str], directory: Path, vocab_size: int) -> Tokenizer:
    """A BPE SentencePiece model on `texts` (lines as sentences), with the project's special ids."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for t in texts for line in t.splitlines() if line.strip()]),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        max_sentence_length=1 << 20,
        minloglevel=2,
    )
    return Tokenizer(directory)


def time_bare(tok: Tokenizer, texts: list[str]) -> tuple[float, float, int]:
    """(cpu s, wall s, tokens) of SentencePieceProcessor.encode on the texts."""
    c, w = time.process_time(), time.perf_counter()
    ids = tok.sp.encode(texts)
    return time.process_time() - c, time.perf_counter() - w, sum(map(len, ids))


def time_loader(data: list[Path], tok: Tokenizer, seq_len: int, batch_size: int) -> tuple[float, float, dict]:
    """(cpu s, wall s, stats) of one finite pass of the streaming loader over the files."""
    c, w = time.process_time(), time.perf_counter()
    ds = StreamingDataset([str(p) for p in data], tok, seq_len, infinite=False, shuffle=False)
    loader = build_dataloader(ds, batch_size)
    rows = sum(b["input_ids"].shape[0] for b in loader)
    cpu, wall = time.process_time() - c, time.perf_counter() - w
    return cpu, wall, {**loader.stats(), "rows": rows}


def main() -> None:
    """Run both alternately and print tokens/s per core and their ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=[str(SAMPLE)], help="jsonl(.zst) files, directories or globs")
    p.add_argument("--tokenizer", help="tokenizer directory (default: a BPE model trained on the data here)")
    p.add_argument("--vocab-size", type=int, default=8000, help="vocabulary of the tokenizer trained here")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5, help="alternating runs of each; the best is kept")
    args = p.parse_args()

    files = resolve_paths(args.data)
    texts = [t for f in files for t in iter_texts(f)]
    with tempfile.TemporaryDirectory() as tmp:
        tok = Tokenizer(args.tokenizer) if args.tokenizer else train_tokenizer(texts, Path(tmp), args.vocab_size)
        if tok.sp is None:
            raise SystemExit(f"{args.tokenizer}: the baseline is SentencePiece; give a tokenizer.model directory")
        bare, loader = [], []
        for _ in range(args.rounds):
            bare.append(time_bare(tok, texts))
            loader.append(time_loader(files, tok, args.seq_len, args.batch_size))
    b_cpu, b_wall, tokens = min(bare)
    l_cpu, l_wall, stats = min(loader, key=lambda r: r[0])
    n_bytes = sum(len(t.encode()) for t in texts)
    print(f"data: {len(files)} file(s), {len(texts)} documents, {n_bytes / 1e6:.2f} MB of text, {tokens} tokens")
    print(f"tokenizer: {tok.directory if args.tokenizer else 'trained here'}, vocab {tok.vocab_size}")
    print(f"bare SentencePieceProcessor.encode: {tokens / b_cpu:12,.0f} tokens/s per core ({b_cpu:.3f} cpu s)")
    print(
        f"streaming loader (zstd+JSON+tokenize+pack): {tokens / l_cpu:12,.0f} tokens/s per core ({l_cpu:.3f} cpu s, "
        f"{l_wall:.3f} wall s; {stats['rows']} rows of {args.seq_len}, skipped {stats['skipped'] or 'nothing'})"
    )
    print(f"ratio loader / bare: {b_cpu / l_cpu:.3f} (target >= 0.70)")


if __name__ == "__main__":
    main()
