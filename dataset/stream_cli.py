"""What the model sees: the first packed sequences a data-parallel rank would train on, as ids or as text.

    python -m dataset.stream_cli --data 'shards/*.jsonl.zst' --tokenizer tok --seq-len 64 --max-seqs 4 --decode
    python -m dataset.stream_cli --data shards --tokenizer tok --seq-len 2048 --max-seqs 100 --dump-ids ids.jsonl

The sequences come from dataset/streaming.py through dataset/rank_loader.py, packed as in training; the loader's
stats() go to stderr. The order is the rank's own streams' (stream `dp_rank * W + w` of `dp_size * W`, W workers):
training's loader (dataset/loader.py) reads as many streams as its global batch has sequences, so a run's order is
this one only at one sequence per step on one rank.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
from pathlib import Path

from dataset.jsonl_zst import ON_ERROR
from dataset.lines import DataError
from dataset.rank_loader import build_dataloader
from dataset.streaming import StreamingDataset
from dataset.tokenizer import Tokenizer, TokenizerError


def _render(ids: list[int], tokenizer: Tokenizer) -> str:
    """Text of `ids` with special tokens shown by name (decode alone would drop them)."""
    special = {tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>", tokenizer.pad_id: "<pad>"}
    special.pop(-1, None)
    out, run = [], []
    for i in ids:
        if i in special:
            out += [tokenizer.decode(run), special[i]]
            run = []
        else:
            run.append(i)
    return "".join(out + [tokenizer.decode(run)])


def main(argv: list[str] | None = None) -> None:
    """CLI: write or print the first packed sequences a rank would train on."""
    p = argparse.ArgumentParser(description="Show the packed sequences the model sees.")
    p.add_argument("--data", required=True, nargs="+", help="glob(s), directories or files of jsonl(.zst)/txt(.zst)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (dataset/tokenizer.py)")
    p.add_argument("--seq-len", type=int, required=True, help="input tokens per sequence (windows hold one more)")
    p.add_argument("--dp-rank", type=int, default=0)
    p.add_argument("--dp-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (each reads its own part)")
    p.add_argument("--max-seqs", type=int, required=True, help="how many sequences to show")
    p.add_argument("--dump-ids", type=Path, help="write each sequence (seq_len + 1 ids) as a JSON line here")
    p.add_argument("--decode", action="store_true", help="print the sequences as text (special tokens by name)")
    p.add_argument("--text-field", default="text", help="JSON key of the text in jsonl lines")
    p.add_argument("--on-error", choices=ON_ERROR, default="raise", help="bad lines/files: stop, or count and skip")
    p.add_argument("--no-bos", action="store_true", help="no BOS before each document")
    args = p.parse_args(argv)
    if args.dump_ids is None and not args.decode:
        p.error("give --dump-ids FILE, --decode, or both")
    try:
        tokenizer = Tokenizer(args.tokenizer)
        ds = StreamingDataset(
            args.data,
            tokenizer,
            args.seq_len,
            dp_rank=args.dp_rank,
            dp_size=args.dp_size,
            seed=args.seed,
            add_bos=not args.no_bos,
            text_field=args.text_field,
            on_error=args.on_error,
        )
        loader = build_dataloader(ds, 1, num_workers=args.num_workers)
        with open(args.dump_ids, "w") if args.dump_ids else contextlib.nullcontext() as out:
            for n, batch in enumerate(itertools.islice(loader, args.max_seqs)):
                window = batch["input_ids"][0].tolist() + batch["targets"][0, -1:].tolist()
                if out:
                    out.write(json.dumps(window) + "\n")
                if args.decode:
                    print(f"--- sequence {n} (dp_rank {args.dp_rank}, {len(window)} tokens) ---")
                    print(_render(window, tokenizer))
    except (DataError, TokenizerError, ValueError, OSError) as e:  # OSError: --dump-ids cannot be written
        sys.exit(f"error: {e}")
    print(json.dumps(loader.stats()), file=sys.stderr)


if __name__ == "__main__":
    main()
