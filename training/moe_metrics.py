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

The values stay on the device until `row`, which reads the whole step's at once: one host-device synchronisation
per logged step (plus the row's collectives) instead of one per layer and micro-batch. The trainer calls `reset` at
the start of every step and `row` only where it logs the step (logging.log_every): other steps read nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from modeling.llama import LlamaForCausalLM
from parallel.mappings import group_size
from parallel.state import ParallelState


class MoEStepStats:
    """Accumulates one step's expert statistics (`reset()` starts a step); `row()` reduces them (collective).

    Under pipeline parallelism each stage sees its own MoE layers: `add_stage` records one stage's forward, and
    `row()` joins the stages' rows over the pipeline group (their aux losses add up).
    """

    def __init__(self, model: LlamaForCausalLM, state: ParallelState) -> None:
        self.layers = model.moe_layers()
        self.state = state
        cfg = model.config
        self.any_moe = any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))  # on any pipeline stage
        self.reset()

    def reset(self) -> None:
        """Forget what was recorded (the trainer starts each step with it; no collective)."""
        self.calls = [0 for _ in self.layers]  # forwards seen per layer (micro-batches)
        # sums on the device, None until the first forward: the aux loss (), per layer the counts (E,) and the
        # (3,) dropped_fraction, lb_loss, z_loss
        self.aux: torch.Tensor | None = None
        self.tokens: list[torch.Tensor | None] = [None for _ in self.layers]
        self.scalars: list[torch.Tensor | None] = [None for _ in self.layers]

    def add(self, aux_loss: torch.Tensor | None) -> None:
        """Record the micro-batch just forwarded (its total aux loss and every MoE layer's stats)."""
        self.add_stage(aux_loss, None)

    def add_stage(self, aux_loss: torch.Tensor | None, layer_ids: tuple[int, ...] | None) -> None:
        """Record one forward of the given layers (None: all of this rank's) and their summed aux loss."""
        if aux_loss is None:
            return
        self.aux = _add(self.aux, aux_loss.detach().double())
        for j, (i, moe) in enumerate(self.layers):
            if layer_ids is not None and i not in layer_ids:
                continue
            st = moe.stats
            self.calls[j] += 1
            self.tokens[j] = _add(self.tokens[j], st["tokens_per_expert"])
            scalars = torch.stack([st[key].double() for key in ("dropped_fraction", "lb_loss", "z_loss")])  # (3,)
            self.scalars[j] = _add(self.scalars[j], scalars)

    def row(self) -> dict[str, Any]:
        """The step's metrics (empty for a dense model), identical on every rank; resets the accumulators."""
        out = self._local_row() if self.layers and max(self.calls) else {}
        self.reset()
        if self.any_moe and group_size(self.state.pp_group) > 1:  # every stage's layers, on every rank
            rows: list[dict[str, Any]] = [{} for _ in range(self.state.pp_size)]
            dist.all_gather_object(rows, out, group=self.state.pp_group)
            out = {k: v for r in rows for k, v in r.items()}
            if any(rows):
                out["moe/aux_loss"] = sum(r.get("moe/aux_loss", 0.0) for r in rows)
        return out

    def _local_row(self) -> dict[str, Any]:
        """This rank's layers, reduced over the data-parallel (and sequence-parallel) ranks."""
        micro_batches = max(self.calls)
        first = self.layers[0][1]
        device, n_experts = first.gate.weight.device, first.num_experts
        zeros = torch.zeros(n_experts, dtype=torch.float64, device=device)
        sums = zip(self.scalars, self.calls, strict=True)
        scalars = torch.stack([zeros[:3] if s is None else s / max(c, 1) for s, c in sums])  # (L, 3)
        aux = zeros[:1] if self.aux is None else (self.aux / micro_batches).reshape(1)
        means = torch.cat([aux, scalars.reshape(-1)])  # (1 + 3L,)
        counts = torch.stack([zeros if t is None else t.double() for t in self.tokens])  # (L, E)
        flat = torch.cat([means, counts.reshape(-1)])  # one collective for the whole row
        if group_size(self.state.dp_group) > 1:
            dist.all_reduce(flat, group=self.state.dp_group)
        chunks = 1
        for group in self.state.sequence_groups():  # ranks that routed other chunks of the same sequences
            chunks *= group_size(group)
            dist.all_reduce(flat, group=group)
        flat[: means.numel()] /= self.state.dp_size * chunks
        values = flat.tolist()  # the step's one host sync
        n_means = means.numel()
        # a chunk's aux_loss is its 1/tp share of the objective: the shares add up, the other values average
        out: dict[str, Any] = {"moe/aux_loss": values[0] * chunks}
        for j, (i, _) in enumerate(self.layers):
            dropped, lb, z = values[1 + 3 * j : 4 + 3 * j]
            c = values[n_means + j * n_experts : n_means + (j + 1) * n_experts]  # (E,) summed counts
            out[f"moe/layer{i}/tokens_per_expert"] = [int(v) for v in c]
            out[f"moe/layer{i}/max_load"] = max(c) / max(sum(c) / len(c), 1e-9)
            out[f"moe/layer{i}/dropped_frac"] = dropped
            out[f"moe/layer{i}/lb_loss"] = lb
            out[f"moe/layer{i}/z_loss"] = z
        return out


def _add(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """The running sum on the device: `value` for the first, else total + value."""
    return value.clone() if total is None else total + value
