"""Regional compilation (train.compile): each decoder layer through torch.compile, one graph for all of them.

As torchtitan does, the unit of compilation is the decoder layer, not the model: every layer runs the same code
(`DecoderLayer.forward`), so dynamo traces it once and reuses the graph for every layer of the same structure (its
parameters are graph inputs, torch's default `inline_inbuilt_nn_modules`); compile time does not grow with depth,
and the parts that do not trace well stay outside. What runs where:

- attention, norms, the dense SwiGLU MLP and the residual adds: compiled (inductor), forward and backward; on the
  CPU attention runs parallel.sdpa.CpuAttention, faster than torch's CPU flash kernels: bf16 (bf16 hardware), up to
  2048 tokens, torch's flash forward and a blocked backward that inductor fuses; fp32 causal, up to 1024 tokens,
  blocked both ways with the forward's probabilities kept for the backward. With bf16 hardware the layers
  whose local shard widens (at tp=1 q/k/v and gate/up) multiply their weight gradients with row-major operands
  (parallel.layers.linear);
- tensor and sequence parallelism: parallel.mappings' autograd collectives call `dist.all_reduce` and friends,
  which dynamo rewrites into functional collectives inside the graph (no graph break; checked at tp=2 with
  sequence parallelism); Ulysses context attention (all-to-all) likewise; ring attention runs eagerly between
  the compiled parts (`torch.compiler.disable`): its p2p (dynamo compiles no p2p by default) and its one host
  read break the graph anyway;
- a mixture-of-experts MLP runs eagerly (a graph break at the MoE call): dropless routing has data-dependent
  sizes (rows per expert, the all-to-all's splits), which would recompile or need unbacked symbols every step;
- the head and its loss, without tensor parallelism (`_plain_head`: tp=1, no bias, LoRA or vocabulary padding):
  compiled as plain ops (`_head_loss`: the logits' matmul, log-sum-exp and target gather), which inductor turns
  into the matmul and one fused pass over the logits each way, the logits saved in the matmul dtype; in bf16 on a
  (busy) 2-core CPU, head and loss forward and backward (2048 x 512 by 32000) took 0.6 s against 1.4 s for the
  eager fused function (parallel.cross_entropy, whose fp32 max/exp/gradient passes run one by one; fp32: level;
  bench/README.md); in bf16 on the CPU the weight's gradient is multiplied as (x^T dZ)^T (parallel.layers.linear's
  `CpuBf16Matmul`, as for the layers that widen: oneDNN runs a transposed left operand at about half speed). With
  tp > 1 the vocab-parallel fused function stays eager (its all-reduces sit between its passes);
- activation checkpointing wraps the compiled layer (`checkpoint(layer, ...)` in modeling.llama.run_layers): the
  recomputation in backward runs the same compiled forward;
- only the training forward is compiled: with gradients off (eval) or with a KV cache (samples, generation) the
  layer runs eagerly, so neither compiles a second graph in the middle of a run.

The autograd functions that the compiled code traces (RMSNorm, SwiGLU, CpuAttention, CpuBf16Matmul, the head's
`_TokenNll`) change no tensor in place in their forward while compiling: torch 2.11's dynamo routes the gradient of
an output made by an in-place op to the wrong slot (pytorch/pytorch#180642, fixed in 2.12), which silently zeroed
the norms' and gate/up's gradients there; tests/unit/test_compiled_functions.py checks the traced graphs. (At tp > 1
dynamo rewrites the collectives in parallel.mappings' functions into functional ones copied into their outputs; the
tp=2 scenarios of tests/integration/test_compile.py agree with eager under 2.11 too.)

The engines (DDP, DeepSpeed ZeRO 1 and 2) wrap the model as before: only the layers' `forward` is replaced, so
module hooks run around the compiled code as they do around eager code. ZeRO-3 is refused (configs/schema.py): it
gathers a weight when its module runs or its attribute is read, and inside a compiled graph neither triggers the
gather.

Compiled graphs are cached on disk by inductor (the FX graph and AOT autograd caches, keyed by the graph, the
shapes and torch's version): `cache_dir()` is $TORCHINDUCTOR_CACHE_DIR when set, else the user's cache
(~/.cache/llama_pretrain/inductor, or under $XDG_CACHE_HOME), so that a second run of the same config, or a resumed
one, skips most of the compile time. `CompileWatch` counts the graphs dynamo compiles; after the first step a new
graph is a recompilation, logged and warned about.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch._inductor.config
from torch import nn

from modeling.llama import DecoderLayer, LlamaForCausalLM
from modeling.moe import MoEMLP
from parallel.cross_entropy import IGNORE_INDEX, REDUCTIONS
from parallel.layers import VocabParallelHead, emulated_bf16, linear
from parallel.token_ids import check_token_ids

# One compiled function for every layer (and every model in the process): dynamo caches its graphs on this code.
_compiled_layer_forward = None
_compiled_head_loss = None


def cache_dir() -> Path:
    """Where inductor keeps compiled graphs between runs: $TORCHINDUCTOR_CACHE_DIR, else the user's cache."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llama_pretrain" / "inductor"


def _layer_forward(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None, cache=None):
    """DecoderLayer.forward, called with the layer as an argument so that one compiled function serves all."""
    return DecoderLayer.forward(layer, x, cos, sin, mask, cache)


def _compiled() -> object:
    """The process's one torch.compile of _layer_forward (created on first use)."""
    global _compiled_layer_forward
    if _compiled_layer_forward is None:
        _compiled_layer_forward = torch.compile(_layer_forward)
    return _compiled_layer_forward


class _TokenNll(torch.autograd.Function):
    """Per-token cross-entropy of (N, V) logits against (N,) target ids, computed in fp32 (0 where ignored).

    Written out for its backward: the logits' gradient is softmax times the upstream gradient, one pass over the
    logits, with the target column then overwritten by (p_t - 1) g (an in-place write of N values). autograd's
    gradient of a target gather is an (N, V) fp32 zero tensor with -g scattered in, which the softmax pass then
    reads: two more passes over logits-sized memory (compiled bf16 step 0.9-1.6% faster, fp32 0.7%;
    bench/README.md).
    """

    @staticmethod
    def forward(ctx, z, target):
        """(N, V) logits in the matmul dtype, (N,) ids -> (N,) fp32 loss, 0 where ignored."""
        valid = target != IGNORE_INDEX
        safe = torch.where(valid, target, 0)
        zf = z.float()
        lse = torch.logsumexp(zf, dim=-1)
        z_t = zf.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(z, lse, z_t, safe, valid)
        return torch.where(valid, lse - z_t, 0.0)

    @staticmethod
    def backward(ctx, grad):
        """dL/dz = (softmax(z) - onehot(target)) g, in the logits' dtype; rows of ignored targets 0."""
        z, lse, z_t, safe, valid = ctx.saved_tensors
        g = torch.where(valid, grad, 0.0)
        dz = (torch.exp(z.float() - lse.unsqueeze(-1)) * g.unsqueeze(-1)).to(z.dtype)
        at_target = ((torch.exp(z_t - lse) - 1.0) * g).to(z.dtype)  # in fp32 before rounding: p_t may be near 1
        rows = torch.arange(z.shape[0], device=z.device)
        return dz.index_put_((rows, safe), at_target), None  # dz is this function's own


def _head_loss(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """Cross-entropy of the logits x W^T ((..., H) x, (V, H) W) against (N,) target ids, -100 ignored.

    The loss of parallel.cross_entropy.vocab_parallel_linear_cross_entropy at tp=1, as plain ops for inductor
    (`_TokenNll`): the mean over the valid targets (0 when there is none), or with reduction="none" the (N,)
    per-token loss, 0 where ignored. The ids were checked against the vocabulary before (check_token_ids).
    """
    nll = _TokenNll.apply(linear(x.reshape(-1, x.shape[-1]), weight), target)  # logits in the matmul dtype
    return nll if reduction == "none" else nll.sum() / (target != IGNORE_INDEX).sum().clamp(min=1)


def _plain_head(head: VocabParallelHead, x: torch.Tensor) -> bool:
    """Whether the head's loss is `_head_loss`: one rank's whole vocabulary, nothing added to the logits.

    Not with tp > 1 or sequence parallelism (the vocab-parallel loss), a bias or a LoRA adapter, vocabulary
    padding, a head whose backward may run twice (reuse_loss_buffers False), or bf16 on a CPU that emulates it
    (the eager head multiplies in fp32 there).
    """
    state = head.state
    if state.tp_size > 1 or state.sequence_parallel or head.bias is not None or head.lora_A is not None:
        return False
    if head.gather_output or not head.reuse_loss_buffers or head.weight.shape[0] != head.out_features:
        return False
    return not emulated_bf16(x)


def _dispatch_head(head: VocabParallelHead):
    """The head's forward: the loss through the compiled `_head_loss` when training a plain head, else eager."""
    global _compiled_head_loss
    if _compiled_head_loss is None:
        _compiled_head_loss = torch.compile(_head_loss)
    compiled = _compiled_head_loss

    def forward(x: torch.Tensor, targets: torch.Tensor | None = None, *, reduction: str = "mean") -> torch.Tensor:
        """VocabParallelHead.forward; given targets while training a plain head, its loss compiled."""
        if targets is None or not torch.is_grad_enabled() or reduction not in REDUCTIONS or not _plain_head(head, x):
            return VocabParallelHead.forward(head, x, targets, reduction=reduction)
        targets = check_token_ids(targets, head.out_features, "target", ignore_index=IGNORE_INDEX)
        return compiled(x, head.weight, targets.reshape(-1), reduction)

    return forward


def compile_layers(model: LlamaForCausalLM) -> int:
    """Compile every decoder layer this rank holds (in place; the first training forward compiles); returns how many.

    The head's loss is compiled too where it is a plain one (`_plain_head`).

    Sets TORCHINDUCTOR_CACHE_DIR to `cache_dir()` unless it is set, so that compiled graphs survive the run.
    """
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir()))
    # random ops (LoRA dropout) draw from torch's generator as eager does: the same masks compiled or not, and on
    # every tensor rank the same full mask (parallel.lora slices it), at the cost of not fusing the draw
    torch._inductor.config.fallback_random = True
    compiled = _compiled()
    for layer in model.model.layers.values():
        if isinstance(layer.mlp, MoEMLP):
            # data-dependent sizes: a graph break here instead of a recompile per step (see the module docstring)
            layer.mlp.forward = torch.compiler.disable(layer.mlp.forward, recursive=True)
        layer.forward = _dispatch(layer, compiled)
    if isinstance(model.lm_head, VocabParallelHead):  # None on a pipeline stage without the head
        model.lm_head.forward = _dispatch_head(model.lm_head)
    return len(model.model.layers)


def _dispatch(layer: DecoderLayer, compiled: object):
    """The layer's forward: compiled for training (gradients on, no KV cache), eager otherwise."""

    def forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None, cache=None) -> torch.Tensor:
        """(B, T, H) -> (B, T, H): DecoderLayer.forward, through torch.compile when training."""
        if cache is None and torch.is_grad_enabled():
            return compiled(layer, x, cos, sin, mask, cache)
        return DecoderLayer.forward(layer, x, cos, sin, mask, cache)

    return forward


def is_compiled(module: nn.Module) -> bool:
    """Whether compile_layers has compiled this model's layers."""
    layers = getattr(getattr(module, "model", None), "layers", None) or {}
    return any("forward" in vars(layer) for layer in layers.values())


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (every compile and recompile of any frame)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompileWatch:
    """Counts the graphs compiled after the first steps: a run that keeps recompiling is losing its speed-up.

    `row(step)` returns the metrics of a logged row: `compile/graphs` (compiled so far in this process) and
    `compile/recompiles` (compiled after step `warmup_steps`, except inside `outside()`), and prints a warning
    when the latter grew since the last row.
    """

    def __init__(self, *, warmup_steps: int = 1, enabled: bool = True, say=print) -> None:
        self.warmup_steps, self.enabled, self.say = warmup_steps, enabled, say
        self.start = graphs_compiled()
        self.after_warmup: int | None = None  # the count when the warm-up steps ended
        self.reported = 0
        self.excluded = 0  # graphs compiled inside outside()

    @contextmanager
    def outside(self) -> Iterator[None]:
        """Around work besides the training step (eval, samples): graphs compiled there are not recompilations.

        They compile once, at that work's first run: on CUDA its eager layers' masked attention compiles a
        gradient-free FlexAttention graph.
        """
        before = graphs_compiled()
        try:
            yield
        finally:
            self.excluded += graphs_compiled() - before

    def row(self, step: int) -> dict[str, int]:
        """The compile metrics at `step` (empty when compilation is off); warns about new recompilations."""
        if not self.enabled:
            return {}
        now = graphs_compiled()
        if step >= self.warmup_steps and self.after_warmup is None:
            self.after_warmup = now - self.excluded
        recompiles = 0 if self.after_warmup is None else now - self.excluded - self.after_warmup
        if recompiles > self.reported:
            self.say(
                f"warning: torch.compile compiled {recompiles - self.reported} new graph(s) by step {step}, "
                f"{recompiles} since step {self.warmup_steps} (train.compile): each recompilation costs seconds; "
                f"run with TORCH_LOGS=recompiles to see which guard failed"
            )
            self.reported = recompiles
        return {"compile/graphs": now - self.start, "compile/recompiles": recompiles}
