"""Per-layer expert load of a mixture-of-experts model over one optimizer step, for metrics.jsonl and wandb.

After each micro-batch's forward, `add` reads every MoE layer's `stats` (modeling.moe.MoEMLP). `row` reduces the step
over the data-parallel group (under sequence or context parallelism also over the tensor or context group, whose
ranks routed different chunks of the sequences) and returns, for MoE layer i (its index among the decoder layers):

    moe/aux_loss                      sum over layers of the scaled aux losses in the objective (mean over micro-batches
                                      and data-parallel ranks); the logged `loss` is the cross-entropy alone
    moe/layer{i}/tokens_per_expert    (E,) list: assignments routed to each expert over the whole step (before
                                      dropping), summed over every data-parallel rank
    moe/layer{i}/max_load             max / mean of tokens_per_expert (1.0 = perfectly balanced)
    moe/layer{i}/dropped_frac         fraction of assignments over capacity (0 when dropless)
    moe/layer{i}/lb_loss, z_loss      unscaled load-balancing and router z-loss, mean over micro-batches and ranks
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from modeling.llama import LlamaForCausalLM
from parallel.mappings import group_size
from parallel.state import ParallelState


class MoEStepStats:
    """Accumulates one step's expert statistics; `row()` reduces them (collective) and starts the next step.

    Under pipeline parallelism each stage sees its own MoE layers: `add_stage` records one stage's forward, and
    `row()` joins the stages' rows over the pipeline group (their aux losses add up).
    """

    def __init__(self, model: LlamaForCausalLM, state: ParallelState) -> None:
        self.layers = model.moe_layers()
        self.state = state
        cfg = model.config
        self.any_moe = any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))  # on any pipeline stage
        self._reset()

    def _reset(self) -> None:
        self.calls = [0 for _ in self.layers]  # forwards seen per layer (micro-batches)
        self.aux = 0.0
        self.tokens = [0 for _ in self.layers]
        self.scalars = [[0.0, 0.0, 0.0] for _ in self.layers]  # dropped_fraction, lb_loss, z_loss

    def add(self, aux_loss: torch.Tensor | None) -> None:
        """Record the micro-batch just forwarded (its total aux loss and every MoE layer's stats)."""
        self.add_stage(aux_loss, None)

    def add_stage(self, aux_loss: torch.Tensor | None, layer_ids: tuple[int, ...] | None) -> None:
        """Record one forward of the given layers (None: all of this rank's) and their summed aux loss."""
        if aux_loss is None:
            return
        self.aux += float(aux_loss.detach())
        for j, (i, moe) in enumerate(self.layers):
            if layer_ids is not None and i not in layer_ids:
                continue
            st = moe.stats
            self.calls[j] += 1
            self.tokens[j] = self.tokens[j] + st["tokens_per_expert"].cpu()
            for k, key in enumerate(("dropped_fraction", "lb_loss", "z_loss")):
                self.scalars[j][k] += st[key]

    def row(self) -> dict[str, Any]:
        """The step's metrics (empty for a dense model), identical on every rank; resets the accumulators."""
        out = self._local_row() if self.layers and max(self.calls) else {}
        self._reset()
        if self.any_moe and group_size(self.state.pp_group) > 1:  # every stage's layers, on every rank
            rows: list[dict[str, Any]] = [{} for _ in range(self.state.pp_size)]
            dist.all_gather_object(rows, out, group=self.state.pp_group)
            out = {k: v for r in rows for k, v in r.items()}
            if any(rows):
                out["moe/aux_loss"] = sum(r.get("moe/aux_loss", 0.0) for r in rows)
        return out

    def _local_row(self) -> dict[str, Any]:
        """This rank's layers, reduced over the data-parallel (and sequence-parallel) ranks."""
        n_layers, micro_batches = len(self.layers), max(self.calls)
        scalars = torch.tensor(self.scalars, dtype=torch.float64) / torch.tensor(self.calls).clamp(min=1)[:, None]
        means = torch.cat([torch.tensor([self.aux / micro_batches], dtype=torch.float64), scalars.reshape(-1)])
        counts = torch.stack(self.tokens).to(torch.float64)  # (L, E)
        device = next(self.layers[0][1].parameters()).device
        flat = torch.cat([means, counts.reshape(-1)]).to(device)  # one collective for the whole row
        if group_size(self.state.dp_group) > 1:
            dist.all_reduce(flat, group=self.state.dp_group)
        chunks = 1
        for group in self.state.sequence_groups():  # ranks that routed other chunks of the same sequences
            chunks *= group_size(group)
            dist.all_reduce(flat, group=group)
        flat[: means.numel()] /= self.state.dp_size * chunks
        flat = flat.cpu()
        means, counts = flat[: means.numel()], flat[means.numel() :].view(n_layers, -1)  # (1 + 3L,), (L, E)
        # a chunk's aux_loss is its 1/tp share of the objective: the shares add up, the other values average
        out: dict[str, Any] = {"moe/aux_loss": means[0].item() * chunks}
        for j, (i, _) in enumerate(self.layers):
            c = counts[j]
            dropped, lb, z = means[1 + 3 * j : 4 + 3 * j].tolist()
            out[f"moe/layer{i}/tokens_per_expert"] = [int(v) for v in c.tolist()]
            out[f"moe/layer{i}/max_load"] = (c.max() / c.mean().clamp(min=1e-9)).item()
            out[f"moe/layer{i}/dropped_frac"] = dropped
            out[f"moe/layer{i}/lb_loss"] = lb
            out[f"moe/layer{i}/z_loss"] = z
        return out
