"""The compiled head loss of train.compile (modeling.compile._dispatch_head), the compiled bf16 CPU linear of
parallel.layers.linear, and the trainer's fused AdamW.

References are independent of the code under test: F.cross_entropy on float64 logits, and torch's single-tensor
(for-loop) AdamW.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from configs.sections import OptimSection
from modeling.compile import _dispatch_head, _plain_head, _TokenNll
from parallel.layers import CpuBf16Matmul, VocabParallelHead, cpu_has_native_bf16, linear
from training.optim import build_optimizer

N, H, V = 24, 16, 40


def _head(dtype: torch.dtype = torch.float32) -> VocabParallelHead:
    torch.manual_seed(0)
    head = VocabParallelHead(H, V).to(dtype)
    head.forward = _dispatch_head(head)
    return head


class _MatmulLog(TorchDispatchMode):
    """Records (left shape, left strides, right shape) of every aten.mm run inside it, compiled code's included."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.mm:
            self.log.append((tuple(args[0].shape), args[0].stride(), tuple(args[1].shape)))
        return func(*args, **(kwargs or {}))


def _reference(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    logits = x.double().reshape(-1, H) @ weight.double().t()  # (N, V)
    return F.cross_entropy(logits, target.reshape(-1), ignore_index=-100, reduction=reduction)


def test_compiled_head_loss_equals_float64_cross_entropy_mean_and_per_token():
    head = _head()
    assert _plain_head(head, torch.zeros(1, H))
    x = torch.randn(2, N // 2, H, requires_grad=True)
    target = torch.randint(0, V, (2, N // 2))
    target[0, :3] = -100
    for reduction in ("mean", "none"):
        loss = head(x, target, reduction=reduction)
        ref_x = x.detach().double().requires_grad_()
        ref_w = head.weight.detach().double().requires_grad_()
        ref = _reference(ref_x, ref_w, target, reduction)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(ref) if reduction == "none" else torch.ones_like(ref)
        (loss * g.float()).sum().backward()
        (ref * g).sum().backward()
        torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(head.weight.grad.double(), ref_w.grad, rtol=1e-5, atol=1e-7)
        x.grad = head.weight.grad = None


def test_compiled_head_loss_is_zero_without_valid_targets_and_eager_without_grad():
    head = _head()
    x = torch.randn(1, 8, H, requires_grad=True)
    loss = head(x, torch.full((1, 8), -100))
    loss.backward()
    assert loss.item() == 0.0 and x.grad.abs().max().item() == 0.0
    target = torch.randint(0, V, (1, 8))
    with torch.no_grad():  # evaluation takes the eager fused head: the same loss
        eager = head(x, target)
    torch.testing.assert_close(eager.double(), _reference(x, head.weight, target, "mean"), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="the compiled head keeps bf16 only on a CPU with bf16 hardware")
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-weights", "fp32-weights-autocast"])
def test_compiled_bf16_head_gradients_through_the_transposed_weight_product(autocast):
    head = _head(torch.float32 if autocast else torch.bfloat16)
    x = torch.randn(2, N // 2, H, dtype=head.weight.dtype, requires_grad=True)
    target = torch.randint(0, V, (2, N // 2))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = head(x, target)
        with _MatmulLog() as products:
            loss.backward()
    # the reference multiplies the bf16-rounded operands (what the bf16 matmuls see) in float64
    ref_x = x.detach().bfloat16().double().requires_grad_()
    ref_w = head.weight.detach().bfloat16().double().requires_grad_()
    ref = _reference(ref_x, ref_w, target, "mean")
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-2, atol=1e-2)
    for got, want in ((x.grad, ref_x.grad), (head.weight.grad, ref_w.grad)):
        assert got.dtype == head.weight.dtype
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-2 * want.abs().max().item())
    # the weight gradient was multiplied as x^T (H, N) by dZ (N, V) with x^T row-major (oneDNN's fast layout): no
    # (V, N) or (H, N) left operand is a transposed view
    assert ((H, N), (N, 1), (N, V)) in products.log, products.log
    assert not [p for p in products.log if p[0] in ((V, N), (H, N)) and p[1] != (p[0][1], 1)], products.log


def test_cpu_bf16_head_matmul_gradients_are_exact_on_small_integers():
    # entries in {-1, 0, 1}: every product sums at most 40 of them, an integer that bf16 holds exactly, so the
    # compiled forced-layout products and transposes must give dZ W and dZ^T x to the last bit
    g = torch.Generator().manual_seed(1)
    x, w, dz = (torch.randint(-1, 2, shape, generator=g).to(torch.bfloat16) for shape in ((N, H), (V, H), (N, V)))
    x.requires_grad_(), w.requires_grad_()
    z = torch.compile(CpuBf16Matmul.apply, fullgraph=True)(x, w)
    z.backward(dz)
    x64, w64, dz64 = x.detach().double(), w.detach().double(), dz.double()
    assert torch.equal(z.double(), x64 @ w64.t())
    assert torch.equal(x.grad.double(), dz64 @ w64) and torch.equal(w.grad.double(), dz64.t() @ x64)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="the row-major weight gradient is for bf16 hardware")
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-weights", "fp32-weights-autocast"])
def test_compiled_bf16_linear_multiplies_a_widening_layers_weight_gradient_row_major(autocast):
    g = torch.Generator().manual_seed(2)
    dtype = torch.float32 if autocast else torch.bfloat16
    # a layer that widens (in 16 < out 40: q/k/v, gate/up) and one that narrows (40 -> 8: o, down)
    x, wide, narrow = (torch.randn(s, generator=g).to(dtype).requires_grad_() for s in ((2, 12, H), (V, H), (8, V)))
    dy = torch.randn(2, 12, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = torch.compile(lambda x, a, b: linear(linear(x, a), b), fullgraph=True)(x, wide, narrow)
        with _MatmulLog() as products:
            y.backward(dy.to(y.dtype))
    refs = [t.detach().bfloat16().double().requires_grad_() for t in (x, wide, narrow)]
    ref = (refs[0] @ refs[1].t()).bfloat16().double() @ refs[2].t()  # the compiled hidden is rounded to bf16
    ref.backward(dy.double())
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-2 * ref.abs().max().item())
    for got, want in zip((x.grad, wide.grad, narrow.grad), (r.grad for r in refs), strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-2 * want.abs().max().item())
    # the widening layer's weight gradient: x^T (H, N) row-major by dY (N, V); the narrowing one keeps F.linear's
    # (in the x^T form its left operand would be the hidden's (V, N) transpose, row-major)
    assert ((H, N), (N, 1), (N, V)) in products.log, products.log
    assert not [p for p in products.log if p[0] == (V, N) and p[1] == (N, 1)], products.log


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="the row-major weight gradient is for bf16 hardware")
def test_compiled_bf16_linear_computes_no_gradient_for_a_frozen_weight():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, H, generator=g).bfloat16().requires_grad_()
    w = torch.randn(V, H, generator=g).bfloat16()  # frozen, as LoRA's base layers are
    dy = torch.randn(N, V, generator=g).bfloat16()
    y = torch.compile(linear, fullgraph=True)(x, w)
    with _MatmulLog() as products:
        y.backward(dy)
    assert products.log == [((N, V), (V, 1), (V, H))], products.log  # dY W only
    torch.testing.assert_close(x.grad.double(), dy.double() @ w.double(), rtol=0, atol=1e-2 * x.grad.abs().max())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_token_nll_gradient_at_a_confident_target_is_computed_before_rounding(compiled):
    # p_t = 0.987: the target's gradient (p_t - 1) g = -0.013 g must come from fp32, not bf16(p_t g) - g (whose
    # bf16 rounding of p_t g alone is up to 0.002 g, 15% of it; inductor keeps fp32 between its ops, so the
    # eager run is the one that shows it)
    z = torch.zeros(N, V, dtype=torch.bfloat16)
    target = torch.arange(N) % V
    z[torch.arange(N), target] = 8.0
    target[0] = -100
    z.requires_grad_()
    g = torch.linspace(0.5, 2.0, N)
    (torch.compile(_TokenNll.apply, fullgraph=True) if compiled else _TokenNll.apply)(z, target).backward(g)
    ref_z = z.detach().double().requires_grad_()
    ref = F.cross_entropy(ref_z, target, ignore_index=-100, reduction="none")
    ref.backward(g.double())
    rows = torch.arange(1, N)
    got, want = z.grad[rows, target[1:]].double(), ref_z.grad[rows, target[1:]]
    torch.testing.assert_close(got, want, rtol=4e-3, atol=0)  # bf16's own rounding: 2^-9
    assert z.grad[0].abs().max() == 0  # the ignored row


def test_build_optimizer_is_fused_adamw_and_steps_like_the_loop_implementation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    ref = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    ref.load_state_dict(model.state_dict())
    cfg = OptimSection(lr=1e-2, warmup_steps=0, weight_decay=0.1)
    opt, _ = build_optimizer(model, cfg, max_steps=10)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    ref_opt = torch.optim.AdamW(
        [{"params": [ref[0].weight], "weight_decay": 0.1}, {"params": [ref[0].bias, *ref[1].parameters()]}],
        lr=1e-2, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=0.0, foreach=False,
    )  # fmt: skip
    for _ in range(3):
        x = torch.randn(4, 8)
        for m, o in ((model, opt), (ref, ref_opt)):
            m(x).square().sum().backward()
            o.step()
            o.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
