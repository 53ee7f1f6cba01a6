"""Tokenizer training time and peak memory (RSS) on about 10 MB of mixed English / Chinese / LaTeX text.

    python -m bench.tokenizer_train                       # BPE at 32000 and 8192 pieces
    python -m bench.tokenizer_train --configs bpe:32000 unigram:32000 --num-threads 2

Corpus: /work/shared/data/{tinyshakespeare.txt, hongloumeng_zh.txt, arxiv_sample.jsonl.zst} (4.8 MB of text) plus
generated lines up to --megabytes: random lines of those files with their words (or, for Chinese, their clauses)
shuffled by a seeded RNG, so the character and word statistics stay those of real text. Each configuration runs
`train_tokenizer` in a fresh process, which reports the SentencePiece phase (reading + training) and its peak RSS,
then the whole call (HF files and the parity check included) and its peak RSS.

Measured on a busy 2-core machine (10.0 MB, 98,481 sentences, --num-threads 2): BPE 32000: SentencePiece 3.8 s at
372 MB peak RSS, the whole call 6.1 s at 421 MB; BPE 8192: 2.2 s at 353 MB, the whole call 3.9 s at 385 MB.
"""

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from dataset.jsonl_zst import iter_texts

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FILES = ("tinyshakespeare.txt", "hongloumeng_zh.txt", "arxiv_sample.jsonl.zst")

CHILD = """
import json, logging, resource, sys, time
from dataset.train_tokenizer import train_tokenizer

marks = {}

class Mark(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("trained"):
            marks["sp_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

logging.getLogger("dataset.train_tokenizer").addHandler(Mark())
logging.getLogger("dataset.train_tokenizer").setLevel(logging.INFO)
args = json.loads(sys.argv[1])
start = time.perf_counter()
out = train_tokenizer(**args)
marks["total_s"] = time.perf_counter() - start
marks["total_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
record = json.loads((out / "train_tokenizer.json").read_text())
marks["sp_s"] = record["train_seconds"]
marks["text_mb"] = record["corpus"]["bytes"] / 1e6
marks["sentences"] = record["corpus"]["sentences"]
print(json.dumps(marks))
"""


def generate(path: Path, megabytes: float, seed: int) -> int:
    """Write shuffled lines of the shared files to `path` until the whole corpus holds `megabytes`; its bytes."""
    pool = [line for name in FILES for text in iter_texts(SHARED / name) for line in text.splitlines() if line.strip()]
    have = sum(len(t.encode()) for name in FILES for t in iter_texts(SHARED / name))
    want = int(megabytes * 1e6) - have
    rng = random.Random(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < want:
            line = rng.choice(pool)
            parts = line.split() if line.count(" ") >= 3 else re.split(r"(?<=[，。；！？])", line)
            rng.shuffle(parts)
            out = (" " if line.count(" ") >= 3 else "").join(parts) + "\n"
            f.write(out)
            written += len(out.encode())
    return have + written


def main() -> None:
    """Run each configuration in a fresh process and print one JSON line per run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["bpe:32000", "bpe:8192"], help="model_type:vocab_size")
    parser.add_argument("--megabytes", type=float, default=10.0)
    parser.add_argument("--num-threads", type=int, default=2)
    args = parser.parse_args()
    missing = [name for name in FILES if not (SHARED / name).exists()]
    if missing:
        sys.exit(f"shared data missing in {SHARED}: {', '.join(missing)}")
    with tempfile.TemporaryDirectory() as tmp:
        generated = Path(tmp) / "generated.txt"
        total = generate(generated, args.megabytes, seed=0)
        inputs = [str(SHARED / name) for name in FILES] + [str(generated)]
        print(json.dumps({"corpus_mb": round(total / 1e6, 2), "inputs": inputs}))
        for config in args.configs:
            model_type, vocab = config.split(":")
            call = dict(inputs=inputs, out_dir=str(Path(tmp) / config.replace(":", "_")), model_type=model_type)
            call.update(vocab_size=int(vocab), num_threads=args.num_threads)
            result = subprocess.run(
                [sys.executable, "-c", CHILD, json.dumps(call)], capture_output=True, text=True, check=True
            )
            marks = json.loads(result.stdout.strip().splitlines()[-1])
            print(json.dumps({"config": config, **{k: round(v, 2) for k, v in marks.items()}}))


if __name__ == "__main__":
    main()
