"""Tensor-parallel layers: ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelHead.

Each parameter carries `tp_split_dim`: the dimension along which it is split over the tensor group (None when it
is replicated), and a padded one `tp_full_size` (its real length along it; below). Checkpoint code merges and
re-splits shards from these attributes alone.

Weights are initialised as the full (master) matrix with the global RNG, identically on every tensor rank, and each
rank keeps its slice: a model built at any tp degree from one seed holds the same full weights, and at tp=1 a layer
holds exactly what nn.Linear / nn.Embedding would (same names, same init, same numbers).

A vocabulary that does not divide by tp is padded, as Megatron-LM does: the embedding's and the head's full
(V, H) weight gets zero rows up to `padded_size(V, tp)`, so the last rank's shard ends in padding. Only real ids
are looked up, the padded logits are masked out of the loss (-inf) and sliced off the gathered logits, and
`tp_chunk(..., pad=False)` strips the padding from a shard before it is saved: files only hold the real rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor.inductor_prims import force_stride_order

from parallel.cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from parallel.mappings import (
    all_gather_from_region,
    copy_to_region,
    gather_from_region,
    reduce_from_region,
    reduce_scatter_to_region,
)
from parallel.state import ParallelConfigError, ParallelState
from parallel.token_ids import check_token_ids

InitMethod = Callable[[torch.Tensor], object]

SEQ_DIM = 1  # activations are (B, T, ...): sequence parallelism splits dim 1


_native_bf16: bool | None = None  # cpu_has_native_bf16's answer, once asked


@torch._dynamo.assume_constant_result  # a constant of the machine: no graph break where compiled code asks
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); without it torch emulates bf16 matmuls.

    Cached in a module variable, not functools.cache: dynamo warns when compiled code calls a cached function.
    """
    global _native_bf16
    if _native_bf16 is None:
        cpu = torch.cpu
        _native_bf16 = any(
            getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        )
    return _native_bf16


class _Fp32Linear(torch.autograd.Function):
    """fwd: y = bf16(x32 W32^T + b32) / bwd: dX, dW, db in fp32 from the saved x and W, cast to x's and W's dtypes.

    Autocast is off inside (it would cast the fp32 products back to bf16); the output is bf16 as autocast's is.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        with torch.autocast("cpu", enabled=False):
            y = F.linear(x.float(), weight.float(), bias.float() if bias is not None else None)
        return y.to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        with torch.autocast("cpu", enabled=False):
            g = grad.float().reshape(-1, grad.shape[-1])  # (N, out)
            dx = (g @ weight.float()).to(x.dtype).view_as(x) if ctx.needs_input_grad[0] else None
            dw = (g.t() @ x.float().reshape(-1, x.shape[-1])).to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = g.sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def bf16_cpu_matmul(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """Whether a matmul of x (by weight, when given) runs in bf16 on the CPU.

    That is: the operands bf16, or each fp32 or bf16 under bf16 autocast (which casts F.linear's operands).
    """
    if x.device.type != "cpu":
        return False
    operands = (x,) if weight is None else (x, weight)
    if torch.is_autocast_enabled("cpu"):
        cast = (torch.float32, torch.bfloat16)
        return torch.get_autocast_dtype("cpu") == torch.bfloat16 and all(t.dtype in cast for t in operands)
    return all(t.dtype == torch.bfloat16 for t in operands)


def emulated_bf16(x: torch.Tensor) -> bool:
    """Whether a matmul of x would run in bf16 on a CPU that emulates it (no AVX512-BF16 or AMX).

    That is: x bf16, or fp32 or bf16 under bf16 autocast (the trainer's bf16 on the torch engine: fp32 weights).
    The matmuls then run in fp32 instead (`linear`, the head, attention).
    """
    return bf16_cpu_matmul(x) and not cpu_has_native_bf16()


class CpuBf16Matmul(torch.autograd.Function):
    """x W^T of bf16 (N, in) x and (out, in) W on the CPU, with W's gradient computed as (x^T dY)^T.

    autograd's dW = dY^T x hands oneDNN a transposed (out, N) left operand, which it multiplies at about half
    speed on a Xeon with AMX: for the head (2048 x 32000 by 2048 x 512 on 2 cores) 860 GFLOP/s against 1530 for
    x^T dY with x^T copied contiguous, the (in, out) product then transposed into W's layout (bench/README.md).
    The layouts are forced (inductor's force_stride_order): inductor would pick the transposed ones back. For
    compiled code; eagerly, force_stride_order copies even a row-major tensor.
    """

    @staticmethod
    def forward(ctx, x, weight):
        """(N, in) x, (out, in) W -> (N, out)."""
        ctx.save_for_backward(x, weight)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad):
        """The gradients dY W of x and (x^T dY)^T of W, each product with a row-major left operand.

        Compiled, a gradient nobody needs (a frozen weight: LoRA's base layers) is dropped from the graph.
        """
        x, weight = ctx.saved_tensors
        x_t = force_stride_order(x.t(), (x.shape[0], 1))  # (in, N) row-major
        dw_t = force_stride_order(x_t @ grad, (grad.shape[1], 1))  # (in, out) row-major
        return grad @ weight, force_stride_order(dw_t.t(), (x.shape[1], 1))  # dW (out, in) row-major


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except for two bf16 cases on the CPU.

    - Without bf16 hardware it multiplies in fp32 and stores bf16, for bf16 x and under bf16 autocast alike
      (`emulated_bf16`): emulated bf16 matmuls run hundreds of times slower than fp32 there (bench/README.md),
      and the fp32 product is also the more accurate one. Activations stay bf16 in memory.
    - With it, in compiled code (train.compile), a layer whose local weight widens (in < out; at tp=1 q/k/v,
      gate/up and the head) runs `CpuBf16Matmul`, whose weight gradient multiplies row-major operands: the x^T it
      copies (N x in) and the product it transposes (in x out) are small next to the product. Where in >= out (o,
      down) the copies cost what the faster product saves (bench/README.md), so those keep F.linear, as does a
      layer with a bias.
    """
    if emulated_bf16(x):
        return _Fp32Linear.apply(x, weight, bias)
    if torch.compiler.is_compiling() and bias is None and weight.shape[1] < weight.shape[0]:
        if bf16_cpu_matmul(x, weight) and cpu_has_native_bf16():
            y = CpuBf16Matmul.apply(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), weight.to(torch.bfloat16))
            return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def padded_size(n: int, tp: int) -> int:
    """`n` rounded up to a multiple of `tp`: the padded length of a dimension split over tp ranks."""
    return -(-n // tp) * tp


def tp_chunk(full: torch.Tensor, dim: int, rank: int, tp: int, *, pad: bool = True) -> torch.Tensor:
    """Rank `rank`'s chunk of `full` along `dim` out of `tp`, `full` zero-padded at the end to padded_size first.

    With pad=False the chunk keeps only the real rows (the last ranks' chunks are then shorter): what a file holds.
    """
    n = full.shape[dim]
    local = padded_size(n, tp) // tp
    start = min(rank * local, n)
    chunk = full.narrow(dim, start, min(local, n - start))
    missing = local - chunk.shape[dim]
    if pad and missing:
        zeros = chunk.new_zeros((*chunk.shape[:dim], missing, *chunk.shape[dim + 1 :]))
        chunk = torch.cat([chunk, zeros], dim=dim)
    return chunk.contiguous()


def strip_padding(shard: torch.Tensor, dim: int, rank: int, full_size: int) -> torch.Tensor:
    """The real rows of this rank's padded shard along `dim` (all of them when `full_size` divides evenly)."""
    local = shard.shape[dim]
    return shard.narrow(dim, 0, max(0, min(local, full_size - rank * local)))


def _shard_param(
    full_shape: tuple[int, ...],
    split_dim: int | None,
    state: ParallelState,
    init: InitMethod,
    *,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> nn.Parameter:
    """Initialise the full tensor, keep this tensor rank's chunk along `split_dim` (all of it when None).

    A split dimension that tp does not divide is zero-padded (tp_chunk); `tp_full_size` records its real length.
    """
    state.require_groups()
    full = torch.empty(full_shape, device=device, dtype=dtype)
    if full.device.type != "meta":
        with torch.no_grad():
            init(full)
    if split_dim is not None and state.tp_size > 1:
        full = tp_chunk(full, split_dim, state.tp_rank, state.tp_size).clone()  # not a view keeping `full` alive
    param = nn.Parameter(full)
    param.tp_split_dim = split_dim  # type: ignore[attr-defined]
    if split_dim is not None:
        param.tp_full_size = full_shape[split_dim]  # type: ignore[attr-defined]
    return param


def _check_divisible(what: str, value: int, tp: int) -> None:
    if value % tp:
        raise ParallelConfigError(f"{what}={value} is not divisible by parallel.tp={tp}; choose a tp that divides it")


def _linear_weight_init(weight: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear.reset_parameters


def _linear_bias_init(fan_in: int) -> InitMethod:
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return lambda b: nn.init.uniform_(b, -bound, bound)


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A (out, in) split along `out` over the tensor group.

    Rank r holds A_r (out/tp, in) and b_r and computes Y_r = X A_r^T + b_r, its slice of the output features.
    The input enters with copy_to_region (fwd identity, bwd all-reduce of the partial dX = dY_r A_r), or, under
    sequence parallelism, with all_gather_from_region along the sequence (fwd all-gather, bwd reduce-scatter).
    With `gather_output` the slices are all-gathered into the full Y. A LoRA adapter (parallel.lora) adds
    lora_B(lora_A(X)) to Y_r, computed from the same replicated X.
    """

    pads_output = False  # the vocabulary head pads `out` to a multiple of tp instead of requiring one

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        state: ParallelState | None = None,
        bias: bool = False,
        gather_output: bool = False,
        init_method: InitMethod | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.state = state or ParallelState()
        if not self.pads_output:
            _check_divisible(f"output features of ColumnParallelLinear({in_features}, {out_features})",
                             out_features, self.state.tp_size)  # fmt: skip
        self.in_features, self.out_features, self.gather_output = in_features, out_features, gather_output
        kw = {"device": device, "dtype": dtype}
        self.weight = _shard_param((out_features, in_features), 0, self.state, init_method or _linear_weight_init, **kw)
        self.bias = _shard_param((out_features,), 0, self.state, _linear_bias_init(in_features), **kw) if bias else None
        self.lora_A: nn.Module | None = None  # LoRA factors, set by parallel.lora.apply_lora
        self.lora_B: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) replicated, or (B, T/tp, in) under sequence parallelism -> (..., out/tp) or (..., out)."""
        x = _enter_column_region(x, self.state)
        y = _add_lora(self, x, linear(x, self.weight, self.bias))
        return gather_from_region(y, self.state.tp_group, -1) if self.gather_output else y

    def extra_repr(self) -> str:
        """Shape summary for print(model)."""
        local = self.weight.shape[0]
        return f"in={self.in_features}, out={self.out_features} (local {local}), gather={self.gather_output}"


class VocabParallelHead(ColumnParallelLinear):
    """The output head: a ColumnParallelLinear(hidden, vocab) whose forward, given targets, returns the loss.

    head(x) gives this rank's (..., V'/tp) logits, as ColumnParallelLinear, where V' = padded_size(vocab, tp)
    (the columns past `out_features` are padding: slice them off the gathered logits). head(x, targets) gives the
    mean cross-entropy over the real vocabulary (ignore_index -100, padded logits masked out) without gathering
    the logits or keeping them: vocab_parallel_linear_cross_entropy fuses the matmul with the loss; with
    reduction="none" the (N,) per-token losses of the N = prod(...) flattened tokens instead (every rank holds all
    N, under sequence parallelism too: the input is gathered along the sequence first). It goes through forward,
    so that hooks on the module (ZeRO-3 gathers its weight in one) see the call.
    """

    pads_output = True
    # the loss's backward writes dL/dz over the buffers its forward saved; False keeps them (a schedule whose
    # backward runs twice over one forward: zero-bubble pipelines split it into input and weight gradients)
    reuse_loss_buffers = True

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, *, reduction: str = "mean") -> torch.Tensor:
        """(..., in) -> (..., V'/tp) logits, or with (...) target ids the scalar mean loss ((N,) for "none")."""
        if targets is None:
            return super().forward(x)
        group, vocab = self.state.tp_group, self.out_features
        if self.bias is not None or self.lora_A is not None or self.gather_output:  # nothing to fuse into
            logits = super().forward(x)
            if self.gather_output:
                return vocab_parallel_cross_entropy(logits[..., :vocab], targets, reduction=reduction)
            reuse = self.reuse_loss_buffers
            return vocab_parallel_cross_entropy(
                logits, targets, group, vocab_size=vocab, reuse_buffers=reuse, reduction=reduction
            )
        x = _enter_column_region(x, self.state)
        matmul_dtype = torch.float32 if emulated_bf16(x) else None
        return vocab_parallel_linear_cross_entropy(
            x,
            self.weight,
            targets,
            group,
            vocab_size=vocab,
            matmul_dtype=matmul_dtype,
            reuse_buffers=self.reuse_loss_buffers,
            reduction=reduction,
        )


def _enter_column_region(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """copy_to_region (bwd all-reduce), or under sequence parallelism all-gather along the sequence."""
    if state.sequence_parallel:
        return all_gather_from_region(x, state.tp_group, SEQ_DIM)
    return copy_to_region(x, state.tp_group)


def _add_lora(layer: ColumnParallelLinear | RowParallelLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The output plus lora_B(lora_A(x)) where parallel.lora.apply_lora gave the layer an adapter that is on."""
    return y if layer.lora_A is None or not layer.lora_A.enabled else y + layer.lora_B(layer.lora_A(x))


def fused_column_parallel(x: torch.Tensor, layers: Sequence[ColumnParallelLinear]) -> list[torch.Tensor]:
    """[x A_1^T + b_1, ..., x A_k^T + b_k] for column-parallel layers that share their input (q/k/v, gate/up).

    The input enters the tensor-parallel region once (one all-reduce of dX in backward, or one all-gather under
    sequence parallelism, instead of k) and one matmul runs over the concatenated local shards [A_1,r; ...; A_k,r].
    Each layer keeps its own parameters, so names, shards and checkpoints are those of the separate layers.
    A layer's LoRA adapter, if any, adds its delta to that layer's output chunk.
    """
    if any(layer.gather_output for layer in layers):
        raise ValueError("fused_column_parallel returns local shards: build the layers with gather_output=False")
    x = _enter_column_region(x, layers[0].state)
    weight = torch.cat([layer.weight for layer in layers])  # (sum out_i/tp, in)
    biases = [layer.bias for layer in layers]
    bias = torch.cat(biases) if biases[0] is not None else None
    y = linear(x, weight, bias)  # (..., sum out_i/tp)
    ys = y.split([layer.weight.shape[0] for layer in layers], dim=-1)
    return [_add_lora(layer, x, y_i) for layer, y_i in zip(layers, ys, strict=True)]


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A (out, in) split along `in` over the tensor group; the input arrives already split.

    Rank r holds A_r (out, in/tp) and computes the partial sum Y_r = X_r A_r^T, so Y = sum_r Y_r. The sum is an
    all-reduce (reduce_from_region), or under sequence parallelism a reduce-scatter along the sequence. The bias is
    replicated and added once, after the sum. A LoRA adapter (parallel.lora) adds its delta lora_B(lora_A(X_r)), a
    partial sum like Y_r, before the sum, so the base layer's collective also reduces the adapter's output.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        state: ParallelState | None = None,
        bias: bool = False,
        init_method: InitMethod | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.state = state or ParallelState()
        _check_divisible(f"input features of RowParallelLinear({in_features}, {out_features})", in_features,
                         self.state.tp_size)  # fmt: skip
        self.in_features, self.out_features = in_features, out_features
        kw = {"device": device, "dtype": dtype}
        self.weight = _shard_param((out_features, in_features), 1, self.state, init_method or _linear_weight_init, **kw)
        self.bias = (
            _shard_param((out_features,), None, self.state, _linear_bias_init(in_features), **kw) if bias else None
        )
        self.lora_A: nn.Module | None = None  # LoRA factors, set by parallel.lora.apply_lora
        self.lora_B: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in/tp) -> (..., out) replicated, or (B, T/tp, out) under sequence parallelism."""
        group = self.state.tp_group
        y = _add_lora(self, x, linear(x, self.weight))  # partial sums, adapter's included
        if self.state.sequence_parallel:
            y = reduce_scatter_to_region(y, group, SEQ_DIM)
            # each rank sees only its sequence chunk: the replicated bias's gradient must be summed over ranks
            bias = copy_to_region(self.bias, group) if self.bias is not None else None
        else:
            y = reduce_from_region(y, group)
            bias = self.bias
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        """Shape summary for print(model)."""
        return f"in={self.in_features} (local {self.weight.shape[1]}), out={self.out_features}"


class VocabParallelEmbedding(nn.Module):
    """Embedding whose vocabulary rows are split over the tensor group.

    Rank r holds rows [r V'/tp, (r+1) V'/tp) of the padded vocabulary V' = padded_size(V, tp) (the padding rows
    are zeros, never looked up). Ids outside that range look up row 0 and are zeroed, so exactly one
    rank contributes each token's vector and an all-reduce (or, under sequence parallelism, a reduce-scatter along
    the sequence) assembles the embedding. Ids outside [0, V) raise TokenIdError first, at every tp.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        state: ParallelState | None = None,
        init_method: InitMethod | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.state = state or ParallelState()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = _shard_param(
            (num_embeddings, embedding_dim), 0, self.state, init_method or nn.init.normal_, device=device, dtype=dtype
        )
        self.vocab_start = self.state.tp_rank * self.weight.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, H), or (B, T/tp, H) under sequence parallelism; TokenIdError if out of range."""
        ids = check_token_ids(ids, self.num_embeddings, "input")
        if self.state.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, H)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.state.sequence_parallel:
            return reduce_scatter_to_region(out, self.state.tp_group, SEQ_DIM)
        return reduce_from_region(out, self.state.tp_group)

    def extra_repr(self) -> str:
        """Shape summary for print(model)."""
        return f"{self.num_embeddings}, {self.embedding_dim} (local rows {self.weight.shape[0]})"
