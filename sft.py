"""Supervised fine-tuning: chat-templated conversations, loss on assistant turns only, full or LoRA.

    python sft.py --config configs/sft_tiny.yaml                                   # one process
    torchrun --nproc_per_node 2 sft.py --config configs/sft_tiny.yaml parallel.tp=2 lora.enabled=true

The training loop, launchers, checkpoints, resume and logging are pretrain_llama.py's (training/loop.py); this file
only changes what is trained on and what is trained:
- data: `dataset/sft.py` reads `.jsonl(.zst)` records (prompt/response, instruction/input/output or chat
  `messages`), rendered by `dataset/chat.py`'s chat template; several conversations per sequence with document-aware
  attention (`data.pack`), labels only on assistant turns and their end-of-turn token;
- model: `model.init_from` (native checkpoint, run directory or Hugging Face directory) gives architecture and
  weights; with `lora.enabled` the base is frozen, adapters (`parallel/lora.py`) train, and checkpoints hold only
  the adapter: `python -m modeling.convert --to-hf BASE --merge-lora RUN_DIR --out HF_DIR` folds it in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from configs.sections import ConfigError, resolve_path
from dataset.chat import ChatError, ChatRenderer
from dataset.loader import GlobalBatchLoader
from dataset.sft import ChatDataset, SFTDataError, SFTDataset, build_sft_loader
from dataset.tokenizer import TokenizerError
from modeling.config import resolve_checkpoint_dir
from modeling.generation import generate
from modeling.llama import LlamaForCausalLM
from modeling.lora_files import load_adapter, save_adapter
from parallel.lora import AdapterError, apply_lora
from training.cli import main as train_main
from training.data import TrainData
from training.loop import Trainer


class SFTTrainer(Trainer):
    """The pretraining Trainer with SFT data, chat samples and optional LoRA."""

    script = "sft.py"  # named in errors
    dataset_cls: type[ChatDataset] = SFTDataset
    packs = True  # several conversations per row (data.pack); dpo.py's rows hold one pair each

    def __init__(self, cfg: Any, *, resume: bool = True) -> None:
        self.check_config(cfg)
        if not cfg.data.tokenizer:  # checkpoints and HF directories carry their tokenizer
            cfg.data.tokenizer = str(resolve_checkpoint_dir(resolve_path(cfg.model.init_from)))
        try:
            super().__init__(cfg, resume=resume)
        except (SFTDataError, TokenizerError) as e:  # bad records, a tokenizer without chat markers, a changed data set
            raise ConfigError(str(e)) from None

    def check_config(self, cfg: Any) -> None:
        """What fine-tuning needs beyond TrainConfig.validate: a model to start from, unweighted files, packing keys."""
        if not cfg.model.init_from:
            raise ConfigError(
                "model.init_from is not set: fine-tuning starts from a checkpoint; set it to a native checkpoint, a "
                "run directory (outputs/tiny) or a Hugging Face model directory"
            )
        if self.packs and cfg.data.pack and not cfg.data.document_attention:
            raise ConfigError(
                "data.pack=true needs data.document_attention=true (or packed conversations attend to each other); "
                "set it, or data.pack=false for one padded conversation per row"
            )
        if any(s.weight != 1.0 for s in cfg.data_sources()):
            raise ConfigError(
                f"data.train: {self.script} reads every listed file once per epoch and has no mixture weights; drop "
                "the weight keys"
            )

    def weights_source(self) -> Path:
        """LoRA checkpoints hold only the adapter: with LoRA the base always comes from model.init_from."""
        if self.cfg.lora.enabled:
            return resolve_path(self.cfg.model.init_from)
        return super().weights_source()

    def build_model(self) -> LlamaForCausalLM:
        """The base (Trainer.build_model); adapters on top with LoRA (loaded from the checkpoint we resume)."""
        lora = self.cfg.lora
        model = super().build_model()
        if lora.enabled:
            apply_lora(model, targets=lora.targets, r=lora.r, alpha=lora.alpha, dropout=lora.dropout)
            if self.resume_from is not None:
                try:
                    load_adapter(model, self.resume_from)
                except AdapterError as e:
                    raise ConfigError(
                        f"{e}; resume with the run's lora.r, lora.alpha and lora.targets, or start afresh "
                        "(--no-resume or another checkpoint.dir)"
                    ) from None
        return model

    def _dataset(self, key: str, paths: Any, seed: int) -> ChatDataset:
        d = self.cfg.data
        try:
            return self.dataset_cls(
                paths,
                self.tokenizer,
                d.seq_len,
                dp_rank=self.state.dp_rank,
                dp_size=self.state.dp_size,
                seed=seed,
                truncation=d.truncation,
                on_error=d.on_error,
                **({"pack": d.pack} if self.packs else {}),
            )
        except (SFTDataError, ChatError) as e:
            raise ConfigError(f"{key}: {e} (keys: data.seq_len, data.truncation, data.on_error)") from None

    def build_data(self) -> TrainData:
        """This rank's share of the records, reshuffled each epoch, resumable; data.valid is read here too."""
        paths = [p for s in self.cfg.data_sources() for p in ([s.path] if isinstance(s.path, str) else s.path)]
        self.valid = self._dataset("data.valid", self.cfg.data.valid, 0) if self.cfg.data.valid else None
        self.train_set = train = self._dataset("data.train", paths, self.cfg.train.seed)
        if self.is_main:
            n, unit = train.stats(), train.unit
            print(
                f"data.train: {n[unit]} {unit}; {n['dropped']} dropped and {n['truncated']} cut as longer than "
                f"data.seq_len + 1 = {self.cfg.data.seq_len + 1} tokens (data.truncation={self.cfg.data.truncation}), "
                f"{n['skipped']} bad records skipped",
                flush=True,
            )
        try:  # one stream per sequence (a pair for dpo.py) of the global batch, whatever the layout
            return GlobalBatchLoader(
                train,
                micro_batch=self.cfg.train.micro_batch_size,
                grad_accum=self.grad_accum,
                dp_rank=self.state.dp_rank,
                dp_size=self.state.dp_size,
                pin_memory=self.device.type == "cuda",
            )
        except SFTDataError as e:
            raise ConfigError(f"data.train: {e}") from None

    def eval_batches(self) -> Any:
        """The first eval_batches batches of data.valid (a fixed order: same seed every time)."""
        loader = build_sft_loader(self.valid, self.cfg.train.micro_batch_size)
        return (next(loader) for _ in range(self.cfg.train.eval_batches))

    def write_weights(self, directory: Path) -> None:
        """LoRA checkpoints hold only the adapter; full fine-tuning writes the whole model."""
        if not self.cfg.lora.enabled:
            return super().write_weights(directory)
        with self.engine.full_parameters():
            save_adapter(self.model, directory)

    @torch.no_grad()
    def sample(self) -> list[str]:
        """Assistant replies to the sample prompts, each asked as a one-turn chat."""
        renderer = ChatRenderer(self.tokenizer)
        prompts = [
            renderer.render([{"role": "user", "content": p}], add_generation_prompt=True)[0]
            for p in self.cfg.train.sample_prompts
        ]
        with self.engine.full_parameters():
            ids = generate(
                self.forward_model, prompts, max_new_tokens=self.cfg.train.sample_tokens, eos_token_id=renderer.eot
            )
        self.model.train()
        replies = [self.tokenizer.decode([i for i in out if i != renderer.eot]) for out in ids]
        return [f"{p} -> {r}" for p, r in zip(self.cfg.train.sample_prompts, replies, strict=True)]


def main(argv: list[str] | None = None) -> None:
    """Load and validate the config, then fine-tune."""
    train_main(argv, description=__doc__, trainer_cls=SFTTrainer)


if __name__ == "__main__":
    main()
