"""LoRA adapters on tensor-parallel linears, split like their base weight (their files: modeling.lora_files).

Math, as PEFT's LoRA: y = W x + s B A dropout(x), s = alpha / r, A (r, in) kaiming-uniform, B (out, r) zeros.
W is frozen and only A and B train; B = 0 at init, so a fresh adapter leaves the model's output unchanged.

Tensor parallelism. The factor that touches W's split dimension is split the same way, the other is replicated:

    column-parallel W_r (out/tp, in):  A (r, in) replicated,          B_r (out/tp, r) split on dim 0, like W
        y_r = W_r x + s B_r (A x)                x: the replicated input the base matmul already has
    row-parallel W_r (out, in/tp):     A_r (r, in/tp) split on dim 1, like W,   B (out, r) replicated
        y = sum_r [W_r x_r + s B (A_r x_r)]      the sum: the base layer's all-reduce (or reduce-scatter)

The row-parallel delta is folded into the base layer's partial output before its reduction. That is exact because
B (A_r x_r) is linear in the partial sum A_r x_r: sum_r B A_r x_r = B A x. Unfolded, A x would need an all-reduce
of its own in every forward (and every generated token); folded, the forward communicates nothing beyond the base.

Backward. The replicated factor's gradient is a partial sum on each tensor rank: a column layer's rank sees only
its output slice (dA_r = s (B_r^T dy_r) x^T), a row layer's rank only its input slice (dB_r = s dy (A_r x_r)^T).
The replicated factor therefore enters through copy_to_region (fwd: identity / bwd: all-reduce), as RMSNorm's
weight does under sequence parallelism: one all-reduce of r*in (column) or out*r (row) numbers per adapter,
whatever the batch size. The split factor's gradient is local and complete. Sequence parallelism changes nothing:
the adapter reads the input the base matmul reads (the gathered sequence in a column layer, split features in a
row layer) and its output joins the base output before the base layer's own collective.

Initialisation draws the full A (B is zero) and keeps this rank's slice (parallel.layers._shard_param), from a
generator seeded by one draw of the global RNG and the module's name: a model built at any tp degree, or a pipeline
stage holding some of the layers, holds the same adapters for one seed. Dropout draws its mask
for the full input and keeps this rank's slice, so with equal RNG states on every rank (the training loop seeds all
ranks alike) tp=N drops exactly what tp=1 drops.

Names follow PEFT: the adapter of `model.layers.0.self_attn.q_proj` is `model.layers.0.self_attn.q_proj.lora_A.weight`
and `...q_proj.lora_B.weight` (PEFT's files prefix `base_model.model.`).

    model = apply_lora(LlamaForCausalLM(config, state), r=8, alpha=16)  # base frozen, adapters trainable
    shards, dims = lora_state_dict(model), lora_split_dims(model)      # this rank's slices, their split dims
    merged = merge_lora_state_dict(base_full, adapter_full, scale)      # W + s B A, for export
"""

from __future__ import annotations

import contextlib
import functools
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from parallel.layers import ColumnParallelLinear, RowParallelLinear, _shard_param, linear
from parallel.mappings import copy_to_region
from parallel.state import ParallelState

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


class AdapterError(ValueError):
    """A LoRA setting or adapter file that cannot work; the message names the key or file and what to do."""


@dataclass(frozen=True)
class LoRAConfig:
    """Rank r, alpha (scaling = alpha / r), dropout on the adapter input, and the target projections' names."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise AdapterError(f"lora r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise AdapterError(f"lora targets {list(self.targets)}: choose a non-empty subset of {list(LORA_TARGETS)}")
        object.__setattr__(self, "targets", tuple(t for t in LORA_TARGETS if t in self.targets))  # canonical order

    @property
    def scaling(self) -> float:
        """The factor on B A: alpha / r."""
        return self.alpha / self.r

    def to_json_dict(self) -> dict:
        """The hyper-parameters in PEFT's key names (r, lora_alpha, lora_dropout, target_modules)."""
        targets = list(self.targets)
        return {"r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout, "target_modules": targets}

    @classmethod
    def from_json_dict(cls, d: dict, *, source: str) -> LoRAConfig:
        """Read what to_json_dict (or PEFT's adapter_config.json) wrote; `source` names the file in errors."""
        missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in d]
        if missing:
            raise AdapterError(f"{source}: missing keys {missing}; is this an adapter_config.json?")
        targets = d["target_modules"]
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        try:
            return cls(r=d["r"], alpha=d["lora_alpha"], dropout=d.get("lora_dropout", 0.0), targets=targets)
        except AdapterError as e:
            raise AdapterError(f"{source}: {e}") from None


class LoRAFactor(nn.Module):
    """One adapter factor, x -> scaling * dropout(x) W^T, with W (out, in) split like the base weight or replicated.

    `weight.tp_split_dim`: 0 = output rows split (column B), 1 = input columns split (row A), None = replicated
    (column A, row B), in which case W enters through copy_to_region: its gradient is a partial sum on each rank.
    Dropout (A only) draws a mask for the full `in_features` and keeps this rank's slice.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        state: ParallelState,
        *,
        in_features: int,
        scaling: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.weight, self.state = weight, state
        self.in_features, self.scaling, self.dropout = in_features, scaling, dropout
        self.enabled = True  # on an A factor, False: its layer leaves the adapter out (adapters_off)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in or in/tp) -> (..., out or out/tp)."""
        if self.dropout and self.training:
            x = x * self._keep_mask(x)
        w = self.weight
        if w.tp_split_dim is None:
            w = copy_to_region(w, self.state.tp_group)
        y = linear(x, w)
        return y if self.scaling == 1.0 else y * self.scaling

    def _keep_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Bernoulli(1 - p) / (1 - p), drawn for the full input; this rank's chunk of it when the input is split."""
        shape = (*x.shape[:-1], self.in_features)
        if torch.compiler.is_compiling():  # inductor fills an empty tensor's bernoulli_ with NaNs (torch 2.13)
            mask = (torch.rand(shape, device=x.device) < 1.0 - self.dropout).to(x.dtype)
        else:
            mask = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(1.0 - self.dropout)
        if self.weight.tp_split_dim == 1 and self.state.tp_size > 1:
            mask = mask.chunk(self.state.tp_size, dim=-1)[self.state.tp_rank]  # (..., in/tp)
        return mask / (1.0 - self.dropout)  # a new tensor: the full mask is not kept for backward

    def extra_repr(self) -> str:
        """Shape summary for print(model)."""
        w = self.weight
        return f"local {tuple(w.shape)}, split_dim={w.tp_split_dim}, scaling={self.scaling:g}, dropout={self.dropout:g}"


def apply_lora(
    model: nn.Module,
    *,
    targets: tuple[str, ...] | list[str] = LORA_TARGETS,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
) -> nn.Module:
    """Freeze every parameter of `model` and give each target projection a trainable adapter; returns `model`.

    Targets are the last components of module names (q_proj, ..., down_proj) of Column/RowParallelLinear layers.
    A is kaiming-uniform, drawn per module from a generator seeded by one draw of the global RNG and the module's
    name (so the layers a pipeline stage holds get the adapters the whole model would), B zeros, on the base
    weight's device and dtype. The config is kept as `model.lora_config`.
    """
    config = LoRAConfig(r=r, alpha=alpha, dropout=dropout, targets=tuple(targets))
    if getattr(model, "lora_config", None) is not None:
        raise AdapterError("the model already has LoRA adapters; apply_lora once per model")
    layers = {
        name: layer
        for name, layer in model.named_modules()
        if name.rsplit(".", 1)[-1] in config.targets and isinstance(layer, ColumnParallelLinear | RowParallelLinear)
    }
    found = {name.rsplit(".", 1)[-1] for name in layers}
    if found != set(config.targets):
        raise AdapterError(
            f"lora targets {sorted(set(config.targets) - found)} match no Column/RowParallelLinear of the model; "
            f"remove them from the targets"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    seed = int(torch.randint(0, 2**62, ()).item())
    for name, layer in layers.items():
        column, state = isinstance(layer, ColumnParallelLinear), layer.state
        kw = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        generator = torch.Generator(layer.weight.device).manual_seed(seed + zlib.crc32(name.encode()))
        init = functools.partial(nn.init.kaiming_uniform_, a=math.sqrt(5), generator=generator)  # PEFT's (nn.Linear's)
        a = _shard_param((r, layer.in_features), None if column else 1, state, init, **kw)
        b = _shard_param((layer.out_features, r), 0 if column else None, state, nn.init.zeros_, **kw)
        layer.lora_A = LoRAFactor(a, state, in_features=layer.in_features, scaling=config.scaling, dropout=dropout)
        layer.lora_B = LoRAFactor(b, state, in_features=r)
        for factor in (layer.lora_A, layer.lora_B):
            factor.train(layer.training)  # a model already in eval() keeps its new adapters in eval too
    model.lora_config = config
    return model


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model is its frozen base: every layer leaves its adapter's delta out (not computed).

    The reference policy of preference tuning under LoRA (dpo.py) without a second copy of the weights.
    """
    factors = [f for name, f in lora_factors(model).items() if name.endswith(".lora_A")]  # the flag the layer reads
    for factor in factors:
        factor.enabled = False
    try:
        yield model
    finally:
        for factor in factors:
            factor.enabled = True


def lora_factors(model: nn.Module) -> dict[str, LoRAFactor]:
    """Module path (`...q_proj.lora_A`) -> LoRAFactor, for every adapter factor of the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRAFactor)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's adapter shards, `<module path>.lora_A.weight` / `.lora_B.weight` -> tensor (detached)."""
    return {f"{name}.weight": m.weight.detach() for name, m in lora_factors(model).items()}


def lora_split_dims(model: nn.Module) -> dict[str, int | None]:
    """Adapter tensor name -> the dimension it is split along over the tensor group (None = replicated)."""
    return {f"{name}.weight": m.weight.tp_split_dim for name, m in lora_factors(model).items()}


def lora_pairs(adapter_sd: dict[str, torch.Tensor], source: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`<module path>` -> (A, B), checking that every key is a factor and every factor has its partner."""
    prefixes = {}
    for key in adapter_sd:
        suffix = next((s for s in FACTOR_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise AdapterError(f"{source}: tensor {key} is not a LoRA factor (<module>.lora_A.weight / .lora_B.weight)")
        prefixes.setdefault(key.removesuffix(suffix), set()).add(suffix)
    lonely = sorted(p for p, s in prefixes.items() if len(s) != 2)
    if lonely:
        raise AdapterError(f"{source}: {lonely[:4]} have only one of lora_A / lora_B; the adapter file is incomplete")
    return {p: (adapter_sd[p + ".lora_A.weight"], adapter_sd[p + ".lora_B.weight"]) for p in sorted(prefixes)}


def merge_lora_state_dict(
    base_full_sd: dict[str, torch.Tensor], adapter_full_sd: dict[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    """A new full state dict with W <- W + scale * B @ A for every adapter (computed in fp32, stored in W's dtype)."""
    merged = dict(base_full_sd)
    for prefix, (a, b) in lora_pairs(adapter_full_sd, "adapter").items():
        key = prefix + ".weight"
        if key not in merged:
            raise AdapterError(f"adapter tensor {prefix}.lora_A.weight has no base weight {key}; wrong base model?")
        w = merged[key]
        if a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise AdapterError(
                f"adapter {prefix}: B {tuple(b.shape)} @ A {tuple(a.shape)} does not match the base weight "
                f"{key} {tuple(w.shape)}; was the adapter trained on another model size?"
            )
        merged[key] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return merged
