"""Mixture-of-experts MLP (Mixtral's sparse MoE block), expert-parallel over `state.ep_group`.

For N tokens x_n (rows of the (B, T, H) input), E experts, top-k routing:

    logits  l_n = x_n G^T                                   (fp32; G = `gate.weight` (E, H), replicated)
    scores  s_n = softmax(l_n)  or  sigmoid(l_n)            (config.router_score)
    chosen  K_n = top-k_e (s_n,e + b_e)                     (b = `expert_bias`, selection only; 0 without it)
    weights w_n,e = s_n,e for e in K_n, / sum_{e in K_n} s_n,e when config.norm_topk_prob
    output  y_n = sum_{e in K_n, kept} w_n,e FFN_e(x_n)  +  shared(x_n)
    FFN_e(x) = W2_e (silu(W1_e x) * W3_e x)                 (Mixtral: w1 = gate, w3 = up, w2 = down)

Parameters: `gate` (nn.Linear(H, E), replicated), this rank's E/ep experts stacked as `w1` (E/ep, I, H), `w3`
(E/ep, I, H), `w2` (E/ep, H, I), ep rank r holding experts [r E/ep, (r+1) E/ep). Expert parameters carry
`expert_parallel = True` and `tp_split_dim = None`: they are not tensor-split. Under tp > 1 every tensor rank
computes the same experts on the same tokens (the duplicated work of a replicated FFN); under sequence parallelism
each tensor rank routes its own T/tp tokens, and the router and expert weights enter through copy_to_region so their
gradients are summed over the tensor group. The optional shared experts are one tensor-parallel SwiGLUMLP of
intermediate size num_shared_experts * intermediate_size, `shared_experts`. The routed experts have no bias
(Mixtral has none); config.mlp_bias applies to the shared experts.

Capacity (config.capacity_factor = cf, else dropless): each expert takes at most C = ceil(cf * N * k / E) of this
rank's N k assignments (N: the tokens of this rank's forward, T/tp of them per sequence under sequence
parallelism). Over capacity, an expert keeps the assignments with the largest weight w_n,e (ties: earlier
assignment n k + j first) and drops the rest; a dropped assignment contributes 0 to y_n (the token keeps its
residual path and its other experts). With parallel.moe_pad_to_capacity, a training forward sends every expert C
rows from every rank, padded (parallel.experts.dispatch_padded): no host sync for the split sizes, the same y_n.
Every rank of the expert group must then route the same number of tokens N (the trainer's fixed batch shapes do).

Losses (this rank's tokens, Megatron's default under data/expert parallelism), stored by forward as `aux_loss`:

    lb = E * sum_e f_e P_e      f_e = (assignments chosen for e, before dropping) / N   (sum_e f_e = k)
                                P_e = mean_n p_n,e, p = softmax(l) (sigmoid: s_n / sum_e s_n,e)
    z  = mean_n logsumexp(l_n)^2                                                      (ST-MoE router z-loss)
    aux_loss = router_aux_loss_coef * lb + router_z_loss_coef * z

Under sequence parallelism (tp ranks routing the tp chunks of the same sequences) the counts in f_e are summed over
the tensor group and each rank's aux_loss is 1/tp of the above on its chunk: the router gradients, summed over the
tensor group by copy_to_region, are then those of the unsplit sequence's loss (mean_t z_t = z and
mean_t E sum_e f_e P_t,e = lb for equal chunks). Context parallelism (cp ranks holding the cp chunks of the same
sequences) does the same over the context group (the engines sum the router gradients over it). The logged values
(training.moe_metrics) average the chunks.

With softmax scores and no expert bias, lb is transformers' `load_balancing_loss_func` for one layer. For a whole
model transformers computes one loss over all layers' logits (`mixtral_aux_loss` here), which is not the sum or
the mean of per-layer values: see its docstring.

Auxiliary-loss-free balancing (config.router_expert_bias, DeepSeek-V3): the per-expert bias b only shifts the
top-k selection. Training forwards accumulate the chosen-assignment counts; `update_expert_bias()` (called by the
trainer after each optimizer step) sums them over the data-parallel group (which contains the expert group; under
sequence parallelism also over the tensor group), so every replica applies the same update
b += router_bias_update_rate * sign(mean(load) - load). The counts are this rank's own (`rank_local_buffers`: a
data-parallel wrapper must not overwrite them with rank 0's, as DDP's buffer broadcast would; parallel/engine.py).

Precision: routing and combining run in fp32 with autocast off (under autocast `F.linear` and `bmm` would return
bf16 whatever the inputs' dtype), so the scores, the top-k choice, the weights and the weighted sum of the expert
outputs are fp32; only the expert FFNs (and the shared experts) follow autocast. The token rows travel to the
experts in the compute dtype (bf16 under autocast: the all-to-all moves half the bytes of fp32, and the experts'
matmuls would round them anyway). `expert_bias` and `expert_load` are fp32 buffers whatever the model's dtype
(parallel/deepspeed_engine.py restores them where DeepSpeed casts).

Host-device synchronisations (a GPU's queue drains at each): none in routing, dropping, the losses or the
statistics (`stats` holds device tensors; training.moe_metrics reads a whole step's once). The experts run as one
grouped GEMM (torch._grouped_mm, offsets on the device) where `grouped_gemm_supported` says so, else as a loop
over the experts, whose row counts must be host integers. A layer's forward (and its recomputation under
activation checkpointing) therefore synchronises: at ep=1, never with the grouped GEMM, once with the loop; at
ep>1, once, for the all-to-all's split sizes (as Megatron's dispatcher does). With parallel.moe_pad_to_capacity
under a capacity, a training forward (module in training mode, gradients on) never does: its split sizes are fixed.
The backward never does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from modeling.config import ModelConfig
from modeling.mlp import SwiGLUMLP
from parallel.experts import bincount, combine, dispatch, dispatch_padded, position_in_expert
from parallel.layers import InitMethod, cpu_has_native_bf16, linear
from parallel.mappings import compute_dtype, copy_to_region, group_size
from parallel.state import ParallelConfigError, ParallelState


class MoEMLP(nn.Module):
    """Top-k routed SwiGLU experts (+ optional shared experts), a drop-in for SwiGLUMLP on (B, T, H).

    After each forward: `aux_loss` (differentiable scalar, already scaled by the config's coefficients; under
    sequence parallelism this chunk's 1/tp share), `router_logits` (N, E) fp32 (in the graph), and `stats`, device
    tensors (reading them is a host sync: training.moe_metrics does it once per step): tokens_per_expert (E,) long
    (assignments chosen for each expert among this rank's tokens, before dropping), and the 0-dim fp32
    dropped_fraction, lb_loss, z_loss (unscaled, of this rank's tokens).
    """

    # statistics of this rank's tokens, summed over the replicas only by update_expert_bias(): a data-parallel
    # wrapper must leave them out of any buffer broadcast (parallel.engine.TorchEngine reads this)
    rank_local_buffers = ("expert_load",)

    def __init__(
        self,
        config: ModelConfig,
        state: ParallelState,
        *,
        init_method: InitMethod,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        state.require_groups()
        E, H, I = config.num_local_experts, config.hidden_size, config.intermediate_size  # noqa: E741
        if E < 1:
            raise ParallelConfigError("MoEMLP needs model.num_local_experts >= 1 (0 means a dense MLP: use SwiGLUMLP)")
        if E % state.ep_size:
            raise ParallelConfigError(
                f"model.num_local_experts={E} is not divisible by parallel.ep={state.ep_size}; "
                f"choose an ep that divides it"
            )
        self.config, self.state = config, state
        self.num_experts, self.top_k = E, config.num_experts_per_tok
        self.num_local_experts = E // state.ep_size
        self.expert_offset = state.ep_rank * self.num_local_experts  # global index of local expert 0
        factory = {"device": device, "dtype": dtype}

        gate_device = torch.get_default_device() if device is None else device  # skip_init's None is meta
        self.gate = nn.utils.skip_init(nn.Linear, H, E, bias=False, device=gate_device, dtype=dtype)
        _init(self.gate.weight, init_method)
        self.gate.weight.tp_split_dim = None  # type: ignore[attr-defined]
        # the full (E, ...) tensors are drawn and sliced, so any ep degree holds the same experts for one seed
        self.w1 = self._expert_param((E, I, H), init_method, factory)
        self.w3 = self._expert_param((E, I, H), init_method, factory)
        self.w2 = self._expert_param((E, H, I), init_method, factory)
        self.shared_experts = None
        if config.num_shared_experts:
            shared = dataclasses.replace(config, intermediate_size=config.num_shared_experts * I)
            self.shared_experts = SwiGLUMLP(shared, state, init_method=init_method, **factory)
        on = config.router_expert_bias
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32, device=device) if on else None)
        # chosen-assignment counts since the last update_expert_bias(); not part of a checkpoint
        load = torch.zeros(E, dtype=torch.float32, device=device) if on else None
        self.register_buffer("expert_load", load, persistent=False)
        self.aux_loss: torch.Tensor | None = None
        self.router_logits: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}

    def _expert_param(self, full_shape: tuple[int, ...], init: InitMethod, factory: dict) -> nn.Parameter:
        full = torch.empty(full_shape, **factory)
        _init(full, init)
        start = self.expert_offset
        param = nn.Parameter(full[start : start + self.num_local_experts].clone())  # (E/ep, ...)
        param.expert_parallel = True  # type: ignore[attr-defined]
        param.tp_split_dim = None  # type: ignore[attr-defined]
        return param

    def _tp_replicated(self, weight: torch.Tensor) -> torch.Tensor:
        """Under sequence parallelism each tensor rank sees other tokens: sum the weight's gradient over them."""
        return copy_to_region(weight, self.state.tp_group) if self.state.sequence_parallel else weight

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, H) -> logits (N, E), scores (N, E), chosen experts (N, k), weights (N, k): fp32, autocast or not."""
        with _no_autocast(tokens):  # autocast would run this F.linear in bf16 despite the fp32 operands
            logits = F.linear(tokens.float(), self._tp_replicated(self.gate.weight).float())  # (N, E)
            scores = logits.softmax(-1) if self.config.router_score == "softmax" else logits.sigmoid()
            selection = scores if self.expert_bias is None else scores.detach() + self.expert_bias.float()
            indices = torch.topk(selection, self.top_k, dim=-1).indices  # (N, k)
            weights = scores.gather(1, indices)  # (N, k)
            if self.config.norm_topk_prob:
                weights = weights / weights.sum(-1, keepdim=True)
        return logits, scores, indices, weights

    def capacity(self, n: int) -> int:
        """C = ceil(capacity_factor * N * k / E): the assignments an expert takes of N tokens."""
        return math.ceil(self.config.capacity_factor * n * self.top_k / self.num_experts)

    def drop_over_capacity(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(N, k) chosen experts -> the same with -1 where an assignment is over its expert's capacity.

        Capacity C = ceil(capacity_factor * N * k / E); within an expert the largest weights are kept (ties:
        earlier assignment first).
        """
        n, k = indices.shape
        capacity = self.capacity(n)
        flat = indices.reshape(-1)  # (N k,)
        by_weight = torch.argsort(weights.detach().reshape(-1), descending=True, stable=True)  # (N k,)
        by_expert = by_weight[torch.argsort(flat[by_weight], stable=True)]  # (N k,) per expert, heaviest first
        keep = position_in_expert(flat, by_expert, self.num_experts) < capacity  # (N k,)
        return torch.where(keep, flat, -1).view(n, k)  # (N, k)

    def experts(
        self, rows: torch.Tensor, counts: torch.Tensor, host: list[int] | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """(M, H) rows grouped by local expert -> (M, H): FFN_e of each expert's rows, in `dtype`.

        counts (E/ep,) on the device; host: the same as host integers, or None for the grouped GEMM, which runs the
        rows past sum(counts) (spare rows, whose outputs combine discards) through the last expert.
        """
        w1, w3, w2 = (self._tp_replicated(w) for w in (self.w1, self.w3, self.w2))
        if host is None:
            # offs[j]: end of local expert j's rows; the last group runs to the end of the rows (the spare rows)
            ends = torch.cumsum(counts[:-1], 0)
            offs = torch.cat([ends, ends.new_full((1,), rows.shape[0])]).to(torch.int32)  # (E/ep,)
            w1, w3, w2 = (w.to(dtype).transpose(-2, -1) for w in (w1, w3, w2))  # (E/ep, in, out) views
            h = F.silu(torch._grouped_mm(rows, w1, offs=offs)) * torch._grouped_mm(rows, w3, offs=offs)  # (M, I)
            return torch._grouped_mm(h, w2, offs=offs)  # (M, H)
        out = []  # with host counts, dispatch leaves no spare rows: the counts cover every row
        # unbind, not w[j]: its backward stacks the E/ep gradients once, where indexing adds E/ep full-size ones
        experts = zip(rows.split(host), w1.unbind(0), w3.unbind(0), w2.unbind(0), strict=True)
        for x, w1_j, w3_j, w2_j in experts:  # an expert with no rows still gets a 0 gradient
            h = F.silu(linear(x, w1_j)) * linear(x, w3_j)  # (n_j, I)
            out.append(linear(h, w2_j))  # (n_j, H)
        return torch.cat(out)  # (M, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, T, H) (T/tp under sequence parallelism); sets aux_loss, router_logits and stats.

        The output is in x's dtype promoted with the router's (fp32 under autocast with fp32 weights).
        """
        tokens = x.reshape(-1, x.shape[-1])  # (N, H)
        n, k = tokens.shape[0], self.top_k
        logits, scores, indices, weights = self.route(tokens)
        load = bincount(indices.reshape(-1), self.num_experts)  # (E,)
        capacity = self.config.capacity_factor is not None
        routed = self.drop_over_capacity(indices, weights) if capacity else indices

        dtype = compute_dtype(tokens)
        grouped = grouped_gemm_supported(tokens.device, dtype, x.shape[-1], self.w1.shape[1])
        group = self.state.ep_group
        if capacity and self.state.moe_pad_to_capacity and self.training and torch.is_grad_enabled():
            # training forwards only: the trainer gives every rank of the group the same N tokens, so the same C
            pad = self.capacity(n)
            rows, counts, host, plan = dispatch_padded(tokens, routed, self.num_experts, pad, group, dtype=dtype)
        else:
            rows, counts, host, plan = dispatch(
                tokens, routed, self.num_experts, group, host_counts=not grouped, may_drop=capacity, dtype=dtype
            )
        out = combine(self.experts(rows, counts, None if grouped else host, dtype), plan)  # (N k, H), 0 if dropped
        with _no_autocast(out):  # fp32 weights times the experts' outputs, not a bf16 bmm
            out = torch.bmm(weights.unsqueeze(1), out.view(n, k, -1).float())  # (N, 1, H) = sum_j w_nj FFN_j(x_n)
        out = out.view(x.shape).to(torch.promote_types(x.dtype, self.gate.weight.dtype))  # (B, T, H)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)

        dropped = (routed < 0).sum() if capacity else torch.zeros((), dtype=torch.long, device=x.device)
        with _no_autocast(logits):
            self._losses(logits, scores, load, dropped)
        if self.expert_bias is not None and self.training and torch._C._current_graph_task_id() == -1:
            # not when an activation-checkpointed layer is recomputed inside backward: that would count twice
            self.expert_load += load
        return out

    def _losses(self, logits: torch.Tensor, scores: torch.Tensor, load: torch.Tensor, dropped: torch.Tensor) -> None:
        n = logits.shape[0]
        probs = scores if self.config.router_score == "softmax" else scores / scores.sum(-1, keepdim=True)
        counts, chunks = load.float(), 1  # (E,)
        for group in self.state.sequence_groups():  # f_e over the whole sequence, not this chunk
            chunks *= group_size(group)
            dist.all_reduce(counts, group=group)
        lb = self.num_experts * torch.dot(counts / (n * chunks), probs.mean(0))
        z = torch.logsumexp(logits, dim=-1).square().mean()
        # this chunk's share: the shares of the tensor (and context) group sum to the unsplit sequence's loss
        self.aux_loss = (self.config.router_aux_loss_coef * lb + self.config.router_z_loss_coef * z) / chunks
        self.router_logits = logits
        self.stats = {  # on the device: no host sync here
            "tokens_per_expert": load.detach(),
            "dropped_fraction": dropped.float() / (n * self.top_k),
            "lb_loss": lb.detach(),
            "z_loss": z.detach(),
        }

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Expert bias b += rate * sign(mean(load) - load), loads since the last call summed over all replicas.

        Every rank must call it (it all-reduces over the data-parallel group, and under sequence parallelism the
        tensor group); it does nothing without config.router_expert_bias.
        """
        if self.expert_bias is None:
            return
        load = self.expert_load.clone()
        if group_size(self.state.dp_group) > 1:
            dist.all_reduce(load, group=self.state.dp_group)  # the expert group is inside the data-parallel group
        for group in self.state.sequence_groups():  # tensor or context ranks routed other chunks of the sequences
            dist.all_reduce(load, group=group)
        self.expert_bias += self.config.router_bias_update_rate * torch.sign(load.mean() - load)
        self.expert_load.zero_()

    def extra_repr(self) -> str:
        """Shape summary for print(model)."""
        start = self.expert_offset
        return (
            f"experts={self.num_experts} (local {start}..{start + self.num_local_experts - 1}), top_k={self.top_k}, "
            f"score={self.config.router_score}, capacity_factor={self.config.capacity_factor}"
        )


def grouped_gemm_supported(device: torch.device, dtype: torch.dtype, hidden: int, intermediate: int) -> bool:
    """Whether the experts run as torch._grouped_mm (no host sync) rather than a loop over the experts (one).

    CUDA: torch 2.13's grouped GEMM has a kernel for bf16 on compute capability 9.x and 10.x (Hopper, Blackwell),
    which reads the group offsets on the device; anywhere else it falls back to a loop that copies them to the host
    on every call, 9 syncs per layer and step against the loop's 1, so the loop is kept there. The kernel needs
    16-byte aligned rows: hidden and intermediate sizes multiples of 8 (bf16). Blackwell is left out: its kernel
    gives an expert without tokens a nonzero weight gradient (pytorch/pytorch#172439, open at torch 2.13).
    CPU: _grouped_mm is a C++ loop over the same matmuls (its host offsets cost nothing), measured against the
    Python loop by bench/moe_experts.py: see CPU_GROUPED_GEMM.
    """
    if not hasattr(torch, "_grouped_mm") or (hidden * dtype.itemsize) % 16 or (intermediate * dtype.itemsize) % 16:
        return False
    if device.type == "cuda":
        major = torch.cuda.get_device_capability(device)[0]
        return dtype == torch.bfloat16 and torch.version.hip is None and major == 9
    if device.type == "cpu":  # bf16 without bf16 hardware: the loop's `linear` multiplies in fp32 instead
        return dtype in CPU_GROUPED_GEMM and (dtype != torch.bfloat16 or cpu_has_native_bf16())
    return False


# dtypes for which the CPU runs the experts as one _grouped_mm: where bench/moe_experts.py found it not slower than
# the loop (2-core Xeon with AMX, 4096 assignments, H=256, I=512, E=8: loop/grouped 0.35x-0.90x in fp32 over four
# runs, 0.95x-1.62x in bf16)
CPU_GROUPED_GEMM: tuple[torch.dtype, ...] = (torch.bfloat16,)


def _no_autocast(like: torch.Tensor) -> torch.autocast:
    """A region with autocast off on `like`'s device: the fp32 operations in it stay fp32."""
    return torch.autocast(like.device.type, enabled=False)


def _init(weight: torch.Tensor, init: InitMethod) -> None:
    if weight.device.type != "meta":
        with torch.no_grad():
            init(weight)


def mixtral_aux_loss(router_logits_per_layer: Sequence[torch.Tensor], top_k: int, num_experts: int) -> torch.Tensor:
    """The `aux_loss` of transformers' Mixtral (load_balancing_loss_func, no attention mask), all layers at once.

    With L layers of N tokens, f_l,e = (top-k choices of e in layer l) / N and P_l,e = mean_n softmax(l_l,n)_e:

        mixtral = E * sum_e (mean_l f_l,e) (mean_l P_l,e) = (1/L^2) sum_l sum_m E sum_e f_l,e P_m,e

    The per-layer losses lb_l = E sum_e f_l,e P_l,e are its diagonal terms only: mixtral = mean_l lb_l exactly when
    L = 1, and in general mixtral = (1/L^2) (sum_l lb_l + sum_{l != m} E sum_e f_l,e P_m,e). The result is not
    scaled by router_aux_loss_coef (transformers returns it unscaled and adds coef * aux_loss to its loss).
    """
    tokens_per_expert, prob_sum, rows = 0.0, 0.0, 0
    for logits in router_logits_per_layer:
        probs = logits.float().softmax(-1)  # (N, E)
        chosen = torch.topk(probs, top_k, dim=-1).indices  # (N, k)
        tokens_per_expert = tokens_per_expert + bincount(chosen.reshape(-1), num_experts)
        prob_sum = prob_sum + probs.sum(0)
        rows += probs.shape[0]
    return num_experts * torch.dot(tokens_per_expert.float() / rows, prob_sum / rows)
