"""Pipeline stages cut from the one LlamaForCausalLM, for training (a schedule) and for eval and generation.

    plan = PipelinePlan.build(config, pp=2, schedule="1f1b")          # which layers each stage runs
    model = LlamaForCausalLM(config, state, part=plan.part(state.pp_rank))   # this rank's layers only
    stages = [StageModule(model, plan, s, microbatches=4) for s in plan.rank_stages(state.pp_rank)]
    # training: parallel.pipeline.PipelineSchedule(stages, ...); eval and generation: PipelinedCausalLM(model, plan)

Stage s runs: the embedding (s = 0), its decoder layers (global indices, as the checkpoint names them), and on the
last stage the final norm, the fused head and the loss. Every stage computes the positions and the attention mask
from the same `document_ids`, which the schedule hands to every stage with the micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from modeling.config import ModelConfig
from modeling.llama import Cache, CausalLMOutput, LlamaForCausalLM, ModelPart
from parallel.pipeline import (
    attach_loss,
    broadcast_from_rank,
    check_pipeline,
    rank_stages,
    recv_tensor,
    send_tensor,
    stage_layer_counts,
    stage_layers,
    stage_rank,
)
from parallel.state import ParallelState


@dataclass(frozen=True)
class PipelinePlan:
    """The stages of a pipeline: their layers and the ranks that run them."""

    pp: int
    schedule: str
    layers: tuple[tuple[int, ...], ...]  # per stage, global layer indices

    @classmethod
    def build(
        cls,
        config: ModelConfig,
        *,
        pp: int,
        schedule: str = "1f1b",
        stages_per_rank: int = 1,
        pp_layers: list[int] | None = None,
        microbatches: int | None = None,
    ) -> PipelinePlan:
        """Check the keys (parallel.pp_*) against the model and cut the layers; ParallelConfigError if impossible."""
        check_pipeline(
            pp=pp,
            schedule=schedule,
            stages_per_rank=stages_per_rank,
            num_layers=config.num_hidden_layers,
            pp_layers=pp_layers,
            microbatches=microbatches if microbatches is not None else pp,
        )
        counts = stage_layer_counts(config.num_hidden_layers, pp * stages_per_rank, pp_layers)
        return cls(pp, schedule, tuple(stage_layers(counts)))

    @property
    def num_stages(self) -> int:
        """Stages over all pipeline ranks."""
        return len(self.layers)

    def owner(self, stage: int) -> int:
        """The pipeline rank running `stage`."""
        return stage_rank(stage, self.pp, self.schedule)

    def rank_stages(self, pp_rank: int) -> list[int]:
        """The stages `pp_rank` runs, in order."""
        return rank_stages(pp_rank, self.pp, self.num_stages // self.pp, self.schedule)

    def part(self, pp_rank: int) -> ModelPart:
        """What `pp_rank` holds of the model: its stages' layers, the embedding and the head where they run."""
        mine = self.rank_stages(pp_rank)
        layers = tuple(i for s in mine for i in self.layers[s])
        return ModelPart(layers, embedding=0 in mine, head=self.num_stages - 1 in mine)


class StageModule(nn.Module):
    """One pipeline stage of this rank's model: [embedding] -> its layers -> [norm, head, loss].

    forward(x, targets=, document_ids=) takes the stage input (ids on the first stage, the residual stream
    (B, T, H) or (B, T/tp, H) under sequence parallelism elsewhere) and returns the residual stream, or on the last
    stage the micro-batch's objective: mean cross-entropy + the MoE aux losses of its layers, under `autocast_dtype`
    when set (bf16 training on the torch engine). A stage that is not
    the last attaches its layers' aux losses to its output (parallel.pipeline.attach_loss), scaled like the
    objective. The cross-entropy of each micro-batch is kept in `ce_losses` (detached) for the log; `on_forward`,
    if set, is called with the stage's aux loss and layer indices after each forward (MoE statistics).
    """

    def __init__(self, model: LlamaForCausalLM, plan: PipelinePlan, stage: int, *, microbatches: int) -> None:
        super().__init__()
        # the rank's model stays out of this module's tree: parameters() are this stage's only, which torch's
        # schedules iterate (the zero-bubble weight pass, gradient scaling)
        object.__setattr__(self, "model", model)
        self.stage = stage
        self.layer_ids = plan.layers[stage]
        self.first, self.last = stage == 0, stage == plan.num_stages - 1
        self.scale = 1.0 / microbatches
        self.layers = nn.ModuleDict({str(i): model.model.layers[str(i)] for i in self.layer_ids})
        self.embed_tokens = model.model.embed_tokens if self.first else None
        self.norm = model.model.norm if self.last else None
        self.lm_head = model.lm_head if self.last else None
        if self.last and plan.schedule == "zbv":  # its backward runs twice (input, then weight gradients)
            model.lm_head.reuse_loss_buffers = False
        self.ce_losses: list[torch.Tensor] = []
        self.on_forward: Callable[[torch.Tensor | None, tuple[int, ...]], None] | None = None
        self.autocast_dtype: torch.dtype | None = None  # the forward's autocast (the schedule also runs backward)

    def io_meta(self, micro_batch: int, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, output) of one micro-batch on the meta device; the residual stream in `dtype`."""
        state = self.model.state
        local = seq_len // state.cp_size if state.context_parallel else seq_len  # this rank's tokens of a sequence
        local = local // state.tp_size if state.sequence_parallel else local
        stream = torch.empty(micro_batch, local, self.model.config.hidden_size, dtype=dtype, device="meta")
        stream.requires_grad_(True)
        ids = torch.empty(micro_batch, seq_len, dtype=torch.long, device="meta")
        loss = torch.empty((), dtype=torch.float32, device="meta", requires_grad=True)
        return (ids if self.first else stream), (loss if self.last else stream)

    def forward(
        self, x: torch.Tensor, *, targets: torch.Tensor | None = None, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Stage input -> stage output (the objective on the last stage)."""
        # autocast around the forward only: the schedule runs backward in the same call, and under autocast the
        # matmuls of the fp32 formula backwards (RMSNorm, the fused loss) would run in bf16
        dtype = self.autocast_dtype
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return self._forward(x, targets, document_ids)

    def _forward(
        self, x: torch.Tensor, targets: torch.Tensor | None, document_ids: torch.Tensor | None
    ) -> torch.Tensor:
        m = self.model
        B, T = targets.shape if targets is not None else x.shape[:2]
        position_ids, mask = m.attention_inputs((B, T), x.device, None, document_ids, None)
        if self.first:
            x = m.embed(m.local(x))  # this rank's tokens under context parallelism
        x = m.run_layers(x, position_ids, mask, layers=self.layer_ids)
        aux = m.aux_loss(self.layer_ids)
        if self.on_forward is not None:
            self.on_forward(aux, self.layer_ids)
        if not self.last:
            return x if aux is None or not torch.is_grad_enabled() else attach_loss(x, aux, self.scale)
        out = m.finish(x, m.local(targets), aux=aux)
        self.ce_losses.append(out.ce_loss.detach())
        return out.loss


class PipelinedCausalLM(nn.Module):
    """LlamaForCausalLM's forward over the pipeline, for evaluation and generation (no schedule, no backward).

    Every rank of a pipeline group calls it with the same arguments; the stages run one after the other, each
    rank's activations going to the next stage's rank, and the last stage's result (loss or logits) is broadcast
    to every stage, so the output is what the whole model returns. `config`, `state` and the parameters are the
    rank's model's, so modeling.generation's KV cache and loop work on it unchanged.
    """

    def __init__(self, model: LlamaForCausalLM, plan: PipelinePlan) -> None:
        super().__init__()
        self.model, self.plan = model, plan
        self.config, self.state = model.config, model.state
        self._moe = any(model.config.is_moe_layer(i) for i in range(model.config.num_hidden_layers))

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        targets: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        num_logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """As LlamaForCausalLM.forward, on every rank of the pipeline."""
        m, plan, state = self.model, self.plan, self.state
        B, T = input_ids.shape
        position_ids, mask = m.attention_inputs((B, T), input_ids.device, position_ids, document_ids, cache)
        me, last = state.pp_rank, plan.num_stages - 1
        x, out = None, None
        for stage in plan.rank_stages(me):
            if stage == 0:
                x = m.embed(m.local(input_ids), cache)
            elif plan.owner(stage - 1) != me:
                x = recv_tensor(_peer(state, plan.owner(stage - 1)), state.pp_group, input_ids.device)
            x = m.run_layers(x, position_ids, mask, cache, layers=plan.layers[stage])
            if stage == last:
                out = m.finish(x, m.local(targets), num_logits_to_keep)
            elif plan.owner(stage + 1) != me:
                send_tensor(x, _peer(state, plan.owner(stage + 1)), state.pp_group)
        src = plan.owner(last)
        if targets is not None:  # [ce of the last stage, aux of every stage's MoE layers], summed over the stages
            parts = torch.zeros(2, dtype=torch.float32, device=input_ids.device)
            if out is not None:
                parts[0] = out.ce_loss.float()
            aux = m.aux_loss()
            if aux is not None:
                parts[1] = aux.float()
            if state.pp_size > 1:
                dist.all_reduce(parts, group=state.pp_group)
            ce, aux_total = parts[0], parts[1] if self._moe else None
            return CausalLMOutput(loss=ce if aux_total is None else ce + aux_total, ce_loss=ce, aux_loss=aux_total)
        kept = num_logits_to_keep or T
        logits = broadcast_from_rank(
            out.logits.float().contiguous() if me == src else None,  # sliced off the padded vocabulary
            src,
            state,
            lambda: torch.empty(B, kept, self.config.vocab_size, device=input_ids.device),
        )
        return CausalLMOutput(logits=logits)


def _peer(state: ParallelState, pp_rank: int) -> int:
    """Global rank of pipeline rank `pp_rank` in this rank's pipeline group."""
    return dist.get_global_rank(state.pp_group, pp_rank)
