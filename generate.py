"""Sample text from a native or Hugging Face Llama (or Mixtral) checkpoint, on one process, tensor- or expert-parallel.

    python generate.py --ckpt DIR --prompt "Once upon a time" --tokenizer DIR --max-new-tokens 50 --temperature 0.8
    python generate.py --ckpt DIR --prompt-ids 1,2,3 --prompt-ids 4,5 --max-new-tokens 20 --temperature 0 --print-ids
    torchrun --nproc_per_node 2 generate.py --ckpt DIR --prompt-ids 1,2,3 --max-new-tokens 20 --temperature 0 --tp 2
    torchrun --nproc_per_node 2 generate.py --ckpt MIXTRAL_DIR --prompt-ids 1,2,3 --temperature 0 --ep 2
    python generate.py --ckpt outputs/sft_tiny --chat --system "You are terse."         # interactive, multi-turn
    python generate.py --ckpt BASE --lora outputs/sft_lora --chat                        # a LoRA run on its base

`--temperature 0` is greedy. `--print-ids` prints the new token ids of each prompt, space-separated, one line per
prompt, and nothing else on stdout. Under torchrun every rank runs the model shard it owns; rank 0 prints. The number
of processes is tp x ep: `--ep N` splits a mixture-of-experts model's experts over N ranks (each holds E/N of them).

`--chat` reads one user message per line from stdin, renders the whole conversation (with `--system` first) through
the chat template of `dataset/chat.py`, and streams the assistant's reply to stdout as its tokens are generated, one
line per reply; it stops at `<|eot_id|>` or EOS. An empty line, `/exit` or end of input (Ctrl-D) ends the chat.
The prompt `you> ` goes to stderr. When a conversation outgrows max_position_embeddings its oldest turns are dropped.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from dataset.chat import ChatError, ChatRenderer
from dataset.tokenizer import CHAT_TOKENS, Tokenizer, TokenizerError
from modeling.config import CheckpointError, resolve_checkpoint_dir
from modeling.convert import load_model
from modeling.generation import eos_ids, generate
from modeling.lora_files import load_adapter
from parallel.lora import AdapterError
from parallel.state import ParallelState
from training.distributed import auto_dtype


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
    ap.add_argument("--chat", action="store_true", help="interactive chat through the chat template (stdin/stdout)")
    ap.add_argument("--system", help="with --chat: the system prompt")
    ap.add_argument("--lora", help="a LoRA adapter (sft.py run or step directory, or PEFT) applied to --ckpt")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (tp x ep = torchrun --nproc_per_node)")
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel degree of a mixture-of-experts model")
    ap.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        help="default: bf16 on a GPU with bf16 tensor cores (A100, H100, ...), else fp32",
    )
    args = ap.parse_args(argv)
    if args.chat:
        if args.prompt or args.prompt_ids or args.print_ids:
            ap.error("--chat reads the conversation from stdin: drop --prompt, --prompt-ids and --print-ids")
    elif bool(args.prompt) == bool(args.prompt_ids):
        ap.error("give either --prompt (with a tokenizer), --prompt-ids or --chat")
    if args.system is not None and not args.chat:
        ap.error("--system needs --chat")
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


class ReplyStreamer:
    """generate()'s on_token callback: prints the text each new token adds to the reply so far (if `echo`)."""

    def __init__(self, tokenizer: Tokenizer, skip: set[int], *, echo: bool) -> None:
        self.tokenizer, self.skip, self.echo = tokenizer, skip, echo
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, row: int, token: int) -> None:
        """Take the next token of the reply and print what it adds."""
        if token in self.skip:  # chat markers and EOS end the reply; they are not text
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        # a token can end inside a UTF-8 character (byte pieces), which decodes to U+FFFD until the rest arrives
        if text.startswith(self.shown) and not text.endswith("\ufffd"):
            self._write(text[len(self.shown) :])
            self.shown = text

    def finish(self) -> str:
        """Print what is left of the reply and a newline; return the reply's text."""
        text = self.tokenizer.decode(self.ids)
        self._write((text[len(self.shown) :] if text.startswith(self.shown) else "") + "\n")
        return text

    def _write(self, text: str) -> None:
        if self.echo:
            sys.stdout.write(text)
            sys.stdout.flush()


def read_message(state: ParallelState) -> str | None:
    """The user's next line (rank 0 reads stdin; every rank gets it); None at EOF, on an empty line or /exit."""
    text = None
    if state.rank == 0:
        print("you> ", end="", file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line.endswith("\n"):  # EOF: end the prompt's line
            print(file=sys.stderr)
        text = line.rstrip("\r\n")
        text = None if text.strip() in ("", "/exit") else text
    if dist.is_initialized():
        box = [text]
        dist.broadcast_object_list(box, src=0)
        text = box[0]
    return text


def chat(model: torch.nn.Module, tokenizer: Tokenizer, state: ParallelState, args: argparse.Namespace) -> None:
    """The interactive loop of --chat: read a message, render the conversation, stream the reply, keep both."""
    try:
        renderer = ChatRenderer(tokenizer)
    except TokenizerError as e:
        raise SystemExit(f"error: --chat: {e}") from None
    stops = {renderer.eot, *eos_ids(model.config.eos_token_id)}
    skip = {renderer.header, renderer.end_header, *stops}
    history = [{"role": "system", "content": args.system}] if args.system else []
    first, limit = len(history), model.config.max_position_embeddings
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if state.rank == 0 else (lambda m: None)
    say("chat: one message per line; an empty line, /exit or Ctrl-D ends it")
    while (message := read_message(state)) is not None:
        history.append({"role": "user", "content": message})
        try:
            prompt = renderer.render(history, add_generation_prompt=True)[0]
        except ChatError as e:
            say(f"error: {e}; send it again without that")
            history.pop()
            continue
        dropped = False
        while len(prompt) + args.max_new_tokens > limit and len(history) > first + 1:
            del history[first : first + 2]  # the oldest exchange
            prompt = renderer.render(history, add_generation_prompt=True)[0]
            dropped = True
        if dropped:
            say(f"(oldest turns dropped: the conversation must fit max_position_embeddings={limit})")
        if len(prompt) + args.max_new_tokens > limit:
            say(
                f"error: this message takes {len(prompt)} tokens, which with --max-new-tokens {args.max_new_tokens} "
                f"exceeds max_position_embeddings={limit}; send a shorter one"
            )
            history.pop()
            continue
        streamer = ReplyStreamer(tokenizer, skip, echo=state.rank == 0)
        generate(
            model,
            [prompt],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_token_id=sorted(stops),
            generator=generator,
            on_token=streamer,
        )
        reply = streamer.finish()
        for marker in CHAT_TOKENS:  # text that spells a marker would end the turn when the history is rendered
            reply = reply.replace(marker, "")
        history.append({"role": "assistant", "content": reply})


def main(argv: list[str] | None = None) -> None:
    """Load, generate, print."""
    args = parse_args(argv)
    state, device = setup_distributed(args.tp, args.ep)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype, auto_dtype(device))
    ckpt = resolve_checkpoint_dir(args.ckpt)
    if (ckpt / "adapter_config.json").is_file() and not (ckpt / "config.json").is_file():
        raise SystemExit(
            f"error: --ckpt {ckpt} holds only a LoRA adapter: pass the model it was trained on as --ckpt and this as "
            f"--lora (or merge it: python -m modeling.convert --to-hf BASE --merge-lora {args.ckpt} --out HF_DIR)"
        )
    try:
        model = load_model(args.ckpt, state, dtype=dtype, device=device)
        if args.lora:
            load_adapter(model, resolve_checkpoint_dir(args.lora))
    except (CheckpointError, AdapterError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    tokenizer = None
    if args.prompt or args.chat:
        try:
            tokenizer = Tokenizer(args.tokenizer or ckpt)
        except TokenizerError as e:
            raise SystemExit(f"error: --tokenizer {e}") from None
    if args.chat:
        chat(model, tokenizer, state, args)
        if dist.is_initialized():
            dist.destroy_process_group()
        return
    if args.prompt:
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
