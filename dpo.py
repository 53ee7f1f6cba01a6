r"""Preference tuning: DPO and IPO on chosen/rejected pairs, full or LoRA, on pretrain_llama.py's training loop.

    python dpo.py --config configs/dpo_tiny.yaml                                   # one process
    torchrun --nproc_per_node 2 dpo.py --config configs/dpo_tiny.yaml parallel.tp=2 lora.enabled=true
    torchrun --nproc_per_node 2 dpo.py --config configs/dpo_tiny.yaml \
        parallel.deepspeed_config=configs/deepspeed/zero2.json                    # ZeRO-2 over 2 data-parallel ranks

Launchers, checkpoints, resume (at any layout), logging and keys are those of sft.py (training/loop.py), which this
file extends the way sft.py extends pretraining:
- data: `dataset/preference.py` reads `.jsonl(.zst)` records {"prompt", "chosen", "rejected"} (optional "system"),
  {"messages": [...], "chosen": {...}, "rejected": {...}} or TRL's conversational form, rendered by the chat
  template; only the final response and its end-of-turn carry labels. A row is one pair: its chosen and rejected
  sequences go through one forward, concatenated along the batch. `train.global_batch_size` counts pairs.
- model: `model.init_from` gives the policy's start and the reference policy (training/dpo_reference.py): with
  `lora.enabled` the base with its adapters switched off, otherwise a frozen copy sharded like the policy, or with
  `dpo.precompute_reference` a table of its log-probabilities computed once and stored with the run.
- loss (training/dpo_loss.py): `dpo.loss: sigmoid` (DPO; `dpo.label_smoothing` for conservative DPO) or `ipo`, with
  `dpo.beta`. Sequence log-probabilities come from the vocab-parallel per-token log-probs: the vocabulary is never
  gathered under tensor parallelism.
- metrics per logged step and per eval on data.valid: the loss, rewards/chosen, rewards/rejected, rewards/margin,
  rewards/accuracy, logps/chosen and logps/rejected (the policy's). Export and chat as for SFT (README "Fine-tuning").

Pipeline and context parallelism are refused (parallel.pp=1, parallel.cp=1): a pair's log-probabilities are summed
over its whole sequence, which those layouts split over ranks.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from configs.sections import ConfigError, resolve_path
from dataset.preference import PreferenceDataset
from sft import SFTTrainer
from training.cli import main as train_main
from training.dpo_loss import dpo_batch_metrics, preference_loss, sequence_logps
from training.dpo_reference import (
    ReferencePolicy,
    flatten_pairs,
    frozen_reference,
    lora_reference,
    precomputed_reference,
)


class DPOTrainer(SFTTrainer):
    """The SFT trainer with preference pairs, a reference policy and the DPO/IPO objective."""

    script = "dpo.py"
    dataset_cls = PreferenceDataset
    packs = False  # one pair per row

    def __init__(self, cfg: Any, *, resume: bool = True) -> None:
        super().__init__(cfg, resume=resume)
        if cfg.lora.enabled and not cfg.dpo.precompute_reference and self.model_cfg.router_expert_bias:
            raise ConfigError(
                "lora.enabled with a model that has router_expert_bias: the live reference (the base with the "
                "adapters off) would share the expert bias that training moves; set dpo.precompute_reference=true "
                "(the reference is read once, at the start) or fine-tune fully (a frozen copy)"
            )
        say = (lambda s: print(s, flush=True)) if self.is_main else (lambda s: None)

        def live() -> Any:
            return lora_reference(self.model, self.autocast) if cfg.lora.enabled else frozen_reference(self)

        if cfg.dpo.precompute_reference:  # the live reference is built only for the pass, if the table is not there
            datasets = {"train": self.train_set, **({"valid": self.valid} if self.valid is not None else {})}
            self.reference = precomputed_reference(self, live, datasets, say)
        else:
            self.reference = ReferencePolicy(live())

    def check_config(self, cfg: Any) -> None:
        """SFT's checks, and a layout that keeps each sequence on one rank (no pipeline or context parallelism)."""
        super().check_config(cfg)
        for key in ("pp", "cp"):
            if getattr(cfg.parallel, key) > 1:
                raise ConfigError(
                    f"parallel.{key}={getattr(cfg.parallel, key)}: dpo.py sums each sequence's log-probabilities on "
                    f"one rank; use parallel.{key}=1 (tensor parallelism and ZeRO shard the model instead)"
                )

    def init_source(self) -> Path:
        """Where the reference's weights come from: model.init_from, also when resuming."""
        return resolve_path(self.cfg.model.init_from)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The policy's autocast (bf16 under the torch engine), for the reference's forwards."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self._autocast())

    def _preference(self, batch: dict[str, torch.Tensor], split: str) -> tuple[torch.Tensor, dict, Any]:
        """(mean preference loss, its metrics, the policy's output) of a batch of pairs against the reference."""
        ids = flatten_pairs(self._to_device(batch["input_ids"]))  # (2B, T): chosen rows, then rejected rows
        targets = flatten_pairs(self._to_device(batch["targets"]))  # (2B, T)
        out = self._forward({"input_ids": ids, "targets": targets}, per_token=True)
        if split == "train":  # the MoE layers' statistics of this forward, before the reference's replaces them
            self.moe_stats.add(out.aux_loss)
        policy, count = sequence_logps(out.token_logps, targets)  # (2B,) each
        reference = self.reference.logps(ids, targets, self._to_device(batch["pair_index"]), split)  # (2B,)
        if self.cfg.dpo.loss == "ipo":  # IPO compares per-token means (as TRL)
            policy, reference = policy / count.clamp(min=1), reference / count.clamp(min=1)
        B, d = ids.shape[0] // 2, self.cfg.dpo
        res = preference_loss(
            policy[:B],
            policy[B:],
            reference[:B],
            reference[B:],
            beta=d.beta,
            loss=d.loss,
            label_smoothing=d.label_smoothing,
        )
        return res.losses.mean(), dpo_batch_metrics(res, policy[:B], policy[B:]), out

    def micro_batch_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The preference loss (+ the MoE aux losses) to backpropagate; the loss and rewards/logps to log."""
        loss, metrics, out = self._preference(batch, "train")
        return (loss if out.aux_loss is None else loss + out.aux_loss), loss, metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The preference loss and its metrics over the first eval_batches batches of data.valid (mean over pairs)."""
        self.model.eval()
        sums, pairs = [], 0
        for batch in self.eval_batches():
            loss, metrics, _ = self._preference(batch, "valid")
            n = batch["pair_index"].numel()
            sums.append(torch.stack([loss, *metrics.values()]).double() * n)
            pairs += n
        names = ["loss", *metrics]
        count = torch.full((1,), float(pairs), dtype=torch.float64, device=self.device)
        totals = torch.cat([torch.stack(sums).sum(0), count])
        if self.state.dp_size > 1:
            dist.all_reduce(totals, group=self.state.dp_group)
        self.model.train()
        *values, n = totals.tolist()
        return {f"eval_{k}": v / n for k, v in zip(names, values, strict=True)}


def main(argv: list[str] | None = None) -> None:
    """Load and validate the config, then tune on preferences."""
    train_main(argv, description=__doc__, trainer_cls=DPOTrainer)


if __name__ == "__main__":
    main()
