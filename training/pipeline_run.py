"""Pipeline parallelism in the training loop (parallel.pp > 1): the plan, this rank's stages and their schedule.

The Trainer builds a TrainingPipeline before its model, because the plan decides which layers this rank holds
(`part`); `attach` then cuts this rank's stages from the built model and sets up parallel.pipeline's schedule over
them; `accumulate` runs a step's micro-batches through the schedule, forward and backward. Checkpoints record the
stages (`record`), so that a resume at another pipeline layout can say what changed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from configs.sections import ParallelSection
from modeling.config import ModelConfig
from modeling.llama import LlamaForCausalLM, ModelPart
from modeling.pipeline import PipelinedCausalLM, PipelinePlan, StageModule
from parallel.pipeline import PipelineSchedule
from parallel.state import ParallelState

Batch = dict[str, torch.Tensor]


class TrainingPipeline:
    """The pipeline of a training run: which layers each stage runs, this rank's stages, their schedule."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        parallel: ParallelSection,
        state: ParallelState,
        microbatches: int,
        *,
        say: Callable[[str], None],
    ) -> None:
        """The plan for `parallel.pp` stages; `say` warns when the bubble dominates (fewer micro-batches than pp)."""
        self.state, self.microbatches, self.schedule_name = state, microbatches, parallel.pp_schedule
        self.plan = PipelinePlan.build(
            model_cfg,
            pp=parallel.pp,
            schedule=parallel.pp_schedule,
            stages_per_rank=parallel.pp_stages_per_rank,
            pp_layers=parallel.pp_layers,
            microbatches=microbatches,
        )
        if microbatches < parallel.pp:
            say(
                f"warning: {microbatches} micro-batches per step for parallel.pp={parallel.pp} stages: the pipeline "
                f"bubble ({parallel.pp - 1} of {microbatches + parallel.pp - 1} slots) dominates the step; raise "
                f"train.global_batch_size or lower train.micro_batch_size"
            )
        self.stages: list[StageModule] = []
        self.schedule: PipelineSchedule | None = None

    def part(self) -> ModelPart:
        """The part of the model this rank builds (its stages' layers, the embedding and head where they fall)."""
        return self.plan.part(self.state.pp_rank)

    def record(self) -> list[list[int]]:
        """[pipeline rank, first layer, layers] per stage, recorded in checkpoints."""
        return [[self.plan.owner(s), layers[0], len(layers)] for s, layers in enumerate(self.plan.layers)]

    def attach(
        self,
        model: LlamaForCausalLM,
        *,
        on_forward: Callable,
        autocast_dtype: torch.dtype | None,
        micro_batch_size: int,
        seq_len: int,
        device: torch.device,
    ) -> PipelinedCausalLM:
        """This rank's stages of `model` and their schedule; returns the whole pipeline's model (eval and samples).

        `on_forward` sees each stage's forward (the MoE statistics); `autocast_dtype` is what the stages autocast
        their forwards to (None: no autocast).
        """
        self.stages = [
            StageModule(model, self.plan, s, microbatches=self.microbatches)
            for s in self.plan.rank_stages(self.state.pp_rank)
        ]
        for stage in self.stages:
            stage.on_forward = on_forward
            stage.autocast_dtype = autocast_dtype
        dtype = next(model.parameters()).dtype  # the residual stream's (bf16 where DeepSpeed cast it)
        self.schedule = PipelineSchedule(
            self.stages,
            [stage.stage for stage in self.stages],
            [stage.io_meta(micro_batch_size, seq_len, dtype) for stage in self.stages],
            state=self.state,
            schedule=self.schedule_name,
            microbatches=self.microbatches,
            device=device,
        )
        return PipelinedCausalLM(model, self.plan)

    def accumulate(
        self, batches: list[Batch], to_device: Callable[[torch.Tensor], torch.Tensor], document_attention: bool
    ) -> tuple[torch.Tensor, torch.Tensor, int, dict[str, torch.Tensor]]:
        """A step's micro-batches through the schedule: (mean loss, loss non-finite, tokens, {}), as Trainer's.

        Every stage reads the same batches; the last stage's mean cross-entropy reaches every stage. A non-finite
        loss is seen after the backward: the trainer then skips the step on every rank.
        """
        tokens = sum(b["input_ids"].numel() for b in batches)
        whole = {k: to_device(_joined([b[k] for b in batches])) for k in batches[0]}  # (accum x B, T)
        kwargs = {}
        if "document_ids" in whole and document_attention:
            kwargs["document_ids"] = whole["document_ids"]
        self.schedule.step(whole["input_ids"], whole["targets"], **kwargs)  # the stages autocast their forwards
        ce = [loss for stage in self.stages for loss in stage.ce_losses]
        for stage in self.stages:
            stage.ce_losses.clear()
        loss = torch.stack(ce).mean() if ce else torch.zeros((), device=whole["input_ids"].device)
        dist.all_reduce(loss, group=self.state.pp_group)  # only the last stage's is not zero
        return loss, ~torch.isfinite(loss), tokens, {}


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The micro-batches' rows in one tensor, page-locked where they were.

    A copy to the GPU from pageable memory first waits for the GPU's queued work: a host sync each step.
    """
    pinned = parts[0].is_pinned()
    out = torch.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype, pin_memory=pinned)
    return torch.cat(parts, out=out)
