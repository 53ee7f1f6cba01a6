"""Checkpoint conversion Hugging Face <-> native, and one entry point that loads any checkpoint.

The native format (what training checkpoints use: config.json + model-tpNN-of-NN.safetensors and, for mixture of
experts, experts-epNN-of-NN.safetensors, loadable at any tp and ep degree) is modeling.native_format.

Hugging Face format: config.json + model.safetensors (or sharded with model.safetensors.index.json, or
pytorch_model*.bin read with weights_only=True). Llama's tensor names are the same in both formats, and RoPE uses
the same rotate-half layout, so conversion renames nothing and permutes nothing. Mistral (MistralForCausalLM) is a
Llama without biases plus `sliding_window`, with Llama's tensor names: a Mistral directory loads as the native model
with that window, and a dense native model with a window exports as Mistral (one without as Llama); biases, which
Mistral lacks, stop that export. Mixtral (MixtralForCausalLM, its sliding_window read and written) renames and
stacks only its expert tensors (modeling.hf_mixtral); settings Mixtral cannot represent (sigmoid routing, capacity,
shared experts, expert bias, dense layers between MoE ones) stop the export with the config key named.

    python -m modeling.convert --from-hf HF_DIR --out DIR [--tp N] [--ep N] [--dtype bf16]
    python -m modeling.convert --to-hf DIR --out HF_DIR [--dtype bf16]

LoRA adapters (modeling.lora_files: a native adapter directory, adapter_config.json + adapter-tpNN-of-NN.safetensors
saved at any tp degree, or a PEFT LoRA export). `--merge-lora` folds the adapter into the weights being converted,
W <- W + (alpha / r) B A, so the output is a plain model; `--to-peft` writes the adapter alone in PEFT's format,
which peft.PeftModel.from_pretrained loads onto the Hugging Face export of the base model:

    python -m modeling.convert --to-hf BASE_DIR --merge-lora ADAPTER_DIR --out HF_DIR [--dtype bf16]
    python -m modeling.convert --from-hf HF_DIR --merge-lora ADAPTER_DIR --out DIR [--tp N]
    python -m modeling.convert --to-peft ADAPTER_DIR --out PEFT_DIR [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modeling.config import CheckpointError, ConfigError, ModelConfig, resolve_checkpoint_dir
from modeling.generation import eos_ids
from modeling.hf_mixtral import MixtralLayoutError, mixtral_to_native, native_to_mixtral
from modeling.llama import LlamaForCausalLM
from modeling.lora_files import load_adapter_full, save_peft_adapter
from modeling.native_format import (
    EXPERT_SHARDS,
    EXPERT_SPLIT_DIM,
    MODEL_SHARDS,
    check_state_dict,
    expected_tensors,
    expert_tensor_names,
    is_native,
    load_native_state_dict,
    split_for_rank,
)
from parallel.lora import AdapterError, merge_lora_state_dict
from parallel.state import ParallelState

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",  # transformers 5 writes the chat template here
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_MAX_SHARD_BYTES = 5 * 2**30


# ---- Hugging Face format ----


def read_hf_state_dict(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face checkpoint directory (safetensors, sharded or not, or .bin)."""
    hf = Path(hf_dir)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (hf / index_name).exists():
            files = sorted(set(json.loads((hf / index_name).read_text())["weight_map"].values()))
            break
    else:
        files = ["model.safetensors"] if (hf / "model.safetensors").exists() else ["pytorch_model.bin"]
    state_dict: dict[str, torch.Tensor] = {}
    for name in files:
        path = hf / name
        if not path.exists():
            raise CheckpointError(f"{hf}: weight file {name} not found (need model.safetensors or pytorch_model.bin)")
        if name.endswith(".safetensors"):
            with safe_open(str(path), framework="pt") as f:
                state_dict.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open has no iter)
        else:
            state_dict.update(torch.load(path, map_location="cpu", weights_only=True))
    return state_dict


def load_hf_checkpoint(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and validated full state dict (native names) of a Hugging Face Llama, Mistral or Mixtral directory."""
    hf = Path(hf_dir)
    config = ModelConfig.load(hf / "config.json")
    state_dict = read_hf_state_dict(hf)
    if config.num_local_experts:
        state_dict = mixtral_to_native(state_dict, config, str(hf))
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}  # old exports
    if config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)  # same tensor as the embedding
    check_state_dict(state_dict, config, str(hf))
    return config, state_dict


def save_hf_checkpoint(
    config: ModelConfig, state_dict: dict[str, torch.Tensor], out_dir: str | Path, *, tokenizer_dir: Path | None = None
) -> None:
    """Write config.json, generation_config.json and safetensors (sharded above 5 GiB) that transformers loads.

    A mixture-of-experts model is written as Mixtral, a dense one with a sliding window as Mistral (same tensor names
    as Llama), any other as Llama; CheckpointError when it uses what that architecture cannot represent.
    generation_config.json stops at EOS and at the end of turn of `tokenizer_dir`'s chat template, if it has one.
    """
    if config.num_local_experts:
        bad = config.mixtral_incompatibilities()
        if bad:
            raise CheckpointError(
                f"this model cannot be exported as Hugging Face Mixtral, which has no equivalent of model.{bad[0]}"
                f" (all: {', '.join(bad)}); transformers would compute other numbers. Keep the native checkpoint, "
                f"or train with Mixtral's settings (softmax routing, norm_topk_prob, every layer MoE, dropless, "
                f"no shared experts or expert bias)"
            )
        state_dict = native_to_mixtral(state_dict)
    elif config.sliding_window is not None:
        bad = config.mistral_incompatibilities()
        if bad:
            raise CheckpointError(
                f"this model has model.sliding_window={config.sliding_window}, so it exports as Hugging Face Mistral "
                f"(Llama has no window), which has no equivalent of model.{bad[0]} (all: {', '.join(bad)}): Mistral's "
                f"projections have no biases. Keep the native checkpoint, or train without biases"
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = config.to_hf_dict()
    hf_config["dtype"] = str(next(iter(state_dict.values())).dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    # transformers' generate() stops at any of these ids: EOS, and the chat template's end of turn, so that a reply
    # ends there as in generate.py --chat
    stops = sorted(eos_ids(config.eos_token_id) | _end_of_turn_ids(tokenizer_dir))
    gen = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": stops[0] if len(stops) == 1 else stops or None,
        "pad_token_id": config.pad_token_id,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > HF_MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---- one entry point for any checkpoint ----


def load_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and full state dict of a native or Hugging Face checkpoint directory (or a run's latest), validated."""
    path = resolve_checkpoint_dir(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass a native checkpoint or a Hugging Face model directory")
    if not is_native(path):
        return load_hf_checkpoint(path)
    config = ModelConfig.load(path / "config.json")
    state_dict = load_native_state_dict(path)
    check_state_dict(state_dict, config, str(path))
    return config, state_dict


def load_model(
    path: str | Path,
    state: ParallelState | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> LlamaForCausalLM:
    """Build the model for `state` (this rank's shard) from a native or Hugging Face checkpoint."""
    state = state or ParallelState()
    config, full = load_checkpoint(path)
    model = LlamaForCausalLM(config, state, device=device, dtype=dtype, skip_init=True)
    shard = split_for_rank(full, config, state.tp_rank, state.tp_size, ep_rank=state.ep_rank, ep_size=state.ep_size)
    model.load_state_dict(shard, strict=False)  # lm_head.weight is absent when tied: it is the embedding
    return model


def _cast(state_dict: dict[str, torch.Tensor], dtype: str | None) -> dict[str, torch.Tensor]:
    return state_dict if dtype is None else {k: v.to(DTYPES[dtype]) for k, v in state_dict.items()}


def merge_adapter(state_dict: dict[str, torch.Tensor], adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """The full state dict with the LoRA adapter in `adapter_dir` (native or PEFT; a run's latest) folded in."""
    config, adapter = load_adapter_full(resolve_checkpoint_dir(adapter_dir))
    return merge_lora_state_dict(state_dict, adapter, config.scaling)


def hf_to_native(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    tp: int = 1,
    ep: int = 1,
    dtype: str | None = None,
    merge_lora: str | Path | None = None,
) -> None:
    """Convert a Hugging Face Llama, Mistral or Mixtral directory into native shards for tp x ep ranks (LoRA merged)."""
    config, full = load_hf_checkpoint(hf_dir)
    config.validate_parallel(tp, ep)
    if merge_lora is not None:
        full = merge_adapter(full, merge_lora)
    full = _cast(full, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    experts = expert_tensor_names(config)
    dims = {name: dim for name, (_, dim) in expected_tensors(config).items() if name not in experts}
    dense = {k: v for k, v in full.items() if k not in experts}
    for rank in range(tp):
        MODEL_SHARDS.write(split_for_rank(dense, config, rank, tp, pad=False), dims, out, rank, tp)
    for rank in range(ep if experts else 0):
        shard = split_for_rank({k: full[k] for k in experts}, config, 0, 1, ep_rank=rank, ep_size=ep)
        EXPERT_SHARDS.write(shard, dict.fromkeys(shard, EXPERT_SPLIT_DIM), out, rank, ep)
    config.save(out / "config.json")
    copy_tokenizer(Path(hf_dir), out)


def _end_of_turn_ids(tokenizer_dir: Path | None) -> set[int]:
    """The id of the chat template's end of turn in `tokenizer_dir`'s tokenizer.json (empty: none there).

    The marker is dataset/tokenizer.py's CHAT_TOKENS[-1], spelled out (modeling/ does not import dataset/); it is an
    added token in tokenizer files written since the markers became special, a vocabulary piece in older ones.
    """
    path = None if tokenizer_dir is None else tokenizer_dir / "tokenizer.json"
    if path is None or not path.is_file():
        return set()
    data = json.loads(path.read_text(encoding="utf-8"))
    found = {t["id"] for t in data.get("added_tokens", []) if t["content"] == "<|eot_id|>"}
    vocab = data.get("model", {}).get("vocab")
    if not found and isinstance(vocab, dict) and "<|eot_id|>" in vocab:
        found.add(vocab["<|eot_id|>"])
    return found


def native_to_hf(
    ckpt_dir: str | Path, out_dir: str | Path, *, dtype: str | None = None, merge_lora: str | Path | None = None
) -> None:
    """Merge native shards (and a LoRA adapter) into a directory that AutoModelForCausalLM.from_pretrained loads."""
    config, full = load_checkpoint(ckpt_dir)
    if merge_lora is not None:
        full = merge_adapter(full, merge_lora)
    source = resolve_checkpoint_dir(ckpt_dir)
    save_hf_checkpoint(config, _cast(full, dtype), out_dir, tokenizer_dir=source)
    copy_tokenizer(source, Path(out_dir))


def adapter_to_peft(adapter_dir: str | Path, out_dir: str | Path, *, dtype: str | None = None) -> None:
    """Write a native LoRA adapter (saved at any tp degree; a run's latest) in PEFT's format."""
    config, full = load_adapter_full(resolve_checkpoint_dir(adapter_dir))
    save_peft_adapter(
        _cast(full, dtype),
        r=config.r,
        alpha=config.alpha,
        dropout=config.dropout,
        targets=config.targets,
        out_dir=out_dir,
    )


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files found in src (SentencePiece and Hugging Face) into dst."""
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)


def main(argv: list[str] | None = None) -> None:
    """Command line: --from-hf, --to-hf (either with --merge-lora) or --to-peft."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="HF_DIR", help="Hugging Face Llama, Mistral or Mixtral directory to convert")
    src.add_argument("--to-hf", metavar="DIR", help="native checkpoint directory to export to Hugging Face")
    src.add_argument("--to-peft", metavar="ADAPTER_DIR", help="native LoRA adapter directory to export to PEFT")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of the native shards (--from-hf)")
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel degree of the native expert shards (--from-hf)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep their dtype)")
    ap.add_argument(
        "--merge-lora", metavar="ADAPTER_DIR", help="fold this LoRA adapter into the weights (--from-hf, --to-hf)"
    )
    args = ap.parse_args(argv)
    if args.to_peft and args.merge_lora:
        ap.error("--merge-lora folds an adapter into model weights: use it with --to-hf or --from-hf, not --to-peft")
    try:
        if args.from_hf:
            hf_to_native(args.from_hf, args.out, tp=args.tp, ep=args.ep, dtype=args.dtype, merge_lora=args.merge_lora)
        elif args.to_hf:
            native_to_hf(args.to_hf, args.out, dtype=args.dtype, merge_lora=args.merge_lora)
        else:
            adapter_to_peft(args.to_peft, args.out, dtype=args.dtype)
    except (CheckpointError, ConfigError, AdapterError, MixtralLayoutError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
