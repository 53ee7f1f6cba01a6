"""Sample text from a native or Hugging Face Llama (or Mixtral) checkpoint, on one process, tensor- or expert-parallel.

    python generate.py --ckpt DIR --prompt "Once upon a time" --tokenizer DIR --max-new-tokens 50 --temperature 0.8
    python generate.py --ckpt DIR --prompt-ids 1,2,3 --prompt-ids 4,5 --max-new-tokens 20 --temperature 0 --print-ids
    torchrun --nproc_per_node 2 generate.py --ckpt DIR --prompt-ids 1,2,3 --max-new-tokens 20 --temperature 0 --tp 2
    torchrun --nproc_per_node 2 generate.py --ckpt MIXTRAL_DIR --prompt-ids 1,2,3 --temperature 0 --ep 2

`--temperature 0` is greedy. `--print-ids` prints the new token ids of each prompt, space-separated, one line per
prompt, and nothing else on stdout. Under torchrun every rank runs the model shard it owns; rank 0 prints. The number
of processes is tp x ep: `--ep N` splits a mixture-of-experts model's experts over N ranks (each holds E/N of them).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from dataset.tokenizer import Tokenizer, TokenizerError
from modeling.convert import CheckpointError, load_model, resolve_checkpoint_dir
from modeling.generation import generate
from parallel.state import ParallelState


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--ckpt", required=True, help="native checkpoint, training run directory (its latest) or Hugging Face directory"
    )
    ap.add_argument("--prompt", action="append", help="prompt text (repeat for a batch); needs a tokenizer")
    ap.add_argument("--prompt-ids", action="append", help="comma-separated prompt token ids (repeat for a batch)")
    ap.add_argument("--tokenizer", help="directory with tokenizer.model or tokenizer.json (default: --ckpt)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--print-ids", action="store_true", help="print only the new ids, one line per prompt")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (tp x ep = torchrun --nproc_per_node)")
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel degree of a mixture-of-experts model")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on GPU, fp32 on CPU")
    args = ap.parse_args(argv)
    if bool(args.prompt) == bool(args.prompt_ids):
        ap.error("give either --prompt (with a tokenizer) or --prompt-ids")
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        ap.error("--top-p must be in (0, 1]")
    return args


def setup_distributed(tp: int, ep: int = 1) -> tuple[ParallelState, torch.device]:
    """Initialise torch.distributed under torchrun (nccl on CUDA, gloo on CPU) and build the tensor/expert groups."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp * ep:
        raise SystemExit(
            f"error: --tp {tp} x --ep {ep} = {tp * ep} must equal the number of processes ({world}); launch with "
            f"torchrun --nproc_per_node {tp * ep}"
        )
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ParallelState.build(tp=tp, ep=ep), device


def main(argv: list[str] | None = None) -> None:
    """Load, generate, print."""
    args = parse_args(argv)
    state, device = setup_distributed(args.tp, args.ep)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    try:
        model = load_model(args.ckpt, state, dtype=dtype, device=device)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    tokenizer = None
    if args.prompt:
        try:
            tokenizer = Tokenizer(args.tokenizer or resolve_checkpoint_dir(args.ckpt))
        except TokenizerError as e:
            raise SystemExit(f"error: --tokenizer {e}") from None
        prompts = [tokenizer.encode(p, bos=True) for p in args.prompt]
    else:
        try:
            prompts = [[int(t) for t in p.split(",") if t.strip()] for p in args.prompt_ids]
        except ValueError:
            raise SystemExit(f"error: --prompt-ids takes comma-separated integers, got {args.prompt_ids}") from None
    vocab = model.config.vocab_size
    for p in prompts:
        if not p or min(p) < 0 or max(p) >= vocab:
            raise SystemExit(f"error: prompt ids {p} must be non-empty and within [0, {vocab})")

    generator = torch.Generator(device=device).manual_seed(args.seed)
    new = generate(
        model,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=model.config.eos_token_id,
        generator=generator,
    )
    if state.rank == 0:
        for prompt, ids in zip(prompts, new, strict=True):
            if args.print_ids or tokenizer is None:
                print(" ".join(map(str, ids)))
            else:
                print(tokenizer.decode(prompt + ids))
        sys.stdout.flush()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
