"""Per-layer expert load of a mixture-of-experts model over one optimizer step, for metrics.jsonl and wandb.

After each micro-batch's forward, `add` reads every MoE layer's `stats` (modeling.moe.MoEMLP). `row` reduces the step
over the data-parallel group (under sequence parallelism also over the tensor group, whose ranks routed different
chunks of the sequences) and returns, for MoE layer i (its index among the decoder layers):

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
    """Accumulates one step's expert statistics; `row()` reduces them (collective) and starts the next step."""

    def __init__(self, model: LlamaForCausalLM, state: ParallelState) -> None:
        self.layers = model.moe_layers()
        self.state = state
        self._reset()

    def _reset(self) -> None:
        self.micro_batches = 0
        self.aux = 0.0
        self.tokens = [0 for _ in self.layers]
        self.scalars = [[0.0, 0.0, 0.0] for _ in self.layers]  # dropped_fraction, lb_loss, z_loss

    def add(self, aux_loss: torch.Tensor | None) -> None:
        """Record the micro-batch just forwarded (its total aux loss and every MoE layer's stats)."""
        if not self.layers:
            return
        self.micro_batches += 1
        self.aux += float(aux_loss.detach())
        for j, (_, moe) in enumerate(self.layers):
            st = moe.stats
            self.tokens[j] = self.tokens[j] + st["tokens_per_expert"].cpu()
            for k, key in enumerate(("dropped_fraction", "lb_loss", "z_loss")):
                self.scalars[j][k] += st[key]

    def row(self) -> dict[str, Any]:
        """The step's metrics (empty for a dense model), identical on every rank; resets the accumulators."""
        if not self.layers or self.micro_batches == 0:
            self._reset()
            return {}
        n_layers = len(self.layers)
        means = torch.tensor([self.aux] + [v for s in self.scalars for v in s], dtype=torch.float64)
        means /= self.micro_batches
        counts = torch.stack(self.tokens).to(torch.float64)  # (L, E)
        device = next(self.layers[0][1].parameters()).device
        flat = torch.cat([means, counts.reshape(-1)]).to(device)  # one collective for the whole row
        if group_size(self.state.dp_group) > 1:
            dist.all_reduce(flat, group=self.state.dp_group)
        chunks = group_size(self.state.tp_group) if self.state.sequence_parallel else 1
        if chunks > 1:
            dist.all_reduce(flat, group=self.state.tp_group)
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
        self._reset()
        return out
