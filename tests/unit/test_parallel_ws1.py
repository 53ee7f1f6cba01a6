"""At world size 1 the parallel layers are exactly the plain torch layers (ARCHITECTURE.md, Layers).

One process, no process group: the default `ParallelState()` must give nn.Linear / nn.Embedding / F.cross_entropy
bit for bit, with the same parameter names and the same initialisation from the same seed. The internal autograd
functions (the sharded cross-entropy, the head fused with it) must agree with them up to rounding.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from parallel import cross_entropy, mappings
from parallel.cross_entropy import _VocabParallelCrossEntropy, vocab_parallel_cross_entropy
from parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelHead
from parallel.state import ParallelConfigError, ParallelDims, ParallelState

SEED = 1234


def _forward_backward(module: nn.Module, x: torch.Tensor, grad_out_seed: int):
    """Output, input gradient and parameter gradients (by name) of one forward/backward."""
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    y = module(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_out_seed))
    y.backward(g)
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    return y.detach(), (x.grad if x.is_floating_point() else None), grads


def _assert_same_module(ours: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    ours_params, ref_params = dict(ours.named_parameters()), dict(ref.named_parameters())
    assert list(ours_params) == list(ref_params)
    for name, p in ref_params.items():
        assert ours_params[name].shape == p.shape, name
        assert ours_params[name].dtype == p.dtype, name
        assert torch.equal(ours_params[name], p), name
    y, dx, grads = _forward_backward(ours, x, SEED + 1)
    y_ref, dx_ref, grads_ref = _forward_backward(ref, x, SEED + 1)
    assert torch.equal(y, y_ref)
    if dx_ref is not None:
        assert torch.equal(dx, dx_ref)
    assert list(grads) == list(grads_ref)
    for name in grads_ref:
        assert torch.equal(grads[name], grads_ref[name]), name


@pytest.mark.parametrize("layer_cls", [ColumnParallelLinear, RowParallelLinear])
@pytest.mark.parametrize(("in_features", "out_features"), [(16, 24), (7, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_parallel_linear_is_nn_linear(layer_cls, in_features, out_features, bias):
    torch.manual_seed(SEED)
    ours = layer_cls(in_features, out_features, bias=bias)
    after_ours = torch.rand(4)
    torch.manual_seed(SEED)
    ref = nn.Linear(in_features, out_features, bias=bias)
    after_ref = torch.rand(4)
    assert torch.equal(after_ours, after_ref)  # the global RNG was advanced identically
    if not bias:
        assert ours.bias is None
    x = torch.randn(3, 4, in_features, generator=torch.Generator().manual_seed(SEED + 2))
    _assert_same_module(ours, ref, x)


def test_column_parallel_gather_output_is_nn_linear_at_ws1():
    torch.manual_seed(SEED)
    ours = ColumnParallelLinear(8, 12, bias=True, gather_output=True)
    torch.manual_seed(SEED)
    ref = nn.Linear(8, 12)
    _assert_same_module(ours, ref, torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(SEED)))


def test_vocab_parallel_embedding_is_nn_embedding():
    vocab, hidden = 50, 12
    torch.manual_seed(SEED)
    ours = VocabParallelEmbedding(vocab, hidden)
    torch.manual_seed(SEED)
    ref = nn.Embedding(vocab, hidden)
    ids = torch.randint(0, vocab, (3, 7), generator=torch.Generator().manual_seed(SEED))
    ids[0, :3] = torch.tensor([0, vocab - 1, 0])  # the edges, and a repeated id (its gradient accumulates)
    _assert_same_module(ours, ref, ids)


def _logits_and_target(shape=(3, 5), vocab=11):
    gen = torch.Generator().manual_seed(SEED)
    logits = torch.randn(*shape, vocab, generator=gen) * 3
    target = torch.randint(0, vocab, shape, generator=gen)
    target[0, 0] = -100
    target[1, 2:4] = -100
    target[2, 1] = vocab - 1
    return logits, target


def test_vocab_parallel_cross_entropy_is_f_cross_entropy():
    logits, target = _logits_and_target()
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(ours_in, target)
    ref = F.cross_entropy(ref_in.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
    assert torch.equal(loss, ref)
    loss.backward()
    ref.backward()
    assert torch.equal(ours_in.grad, ref_in.grad)
    assert (ours_in.grad[0, 0] == 0).all() and (ours_in.grad[1, 2:4] == 0).all()


def test_vocab_parallel_cross_entropy_custom_ignore_index():
    logits, target = _logits_and_target()
    target[target == -100] = 3
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(ours_in, target, ignore_index=3)
    ref = F.cross_entropy(ref_in.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=3)
    assert torch.equal(loss, ref)
    loss.backward()
    ref.backward()
    assert torch.equal(ours_in.grad, ref_in.grad)


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_internal_vocab_parallel_cross_entropy_matches_f_cross_entropy(scale):
    logits, target = _logits_and_target(shape=(4, 6), vocab=13)
    logits = logits * scale  # large logits check the max-subtraction
    flat_logits, flat_target = logits.reshape(-1, 13), target.reshape(-1)
    ours_in = flat_logits.clone().requires_grad_()
    ref_in = flat_logits.clone().requires_grad_()
    loss = _VocabParallelCrossEntropy.apply(ours_in, flat_target, None, -100, 13, True)
    ref = F.cross_entropy(ref_in, flat_target, ignore_index=-100)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    upstream = torch.tensor(0.7)  # a non-unit upstream gradient scales the logits gradient
    loss.backward(upstream)
    ref.backward(upstream)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, atol=1e-6, rtol=1e-6)
    assert (ours_in.grad[flat_target == -100] == 0).all()


def _head_and_reference(bias: bool = False):
    torch.manual_seed(SEED)
    ours = VocabParallelHead(6, 13, bias=bias)
    torch.manual_seed(SEED)
    ref = nn.Linear(6, 13, bias=bias)
    return ours, ref


def test_head_logits_are_nn_linear():
    ours, ref = _head_and_reference()
    x = torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(SEED))
    _assert_same_module(ours, ref, x)


@pytest.mark.parametrize("bias", [False, True], ids=["fused", "bias"])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_head_loss_matches_linear_then_f_cross_entropy(bias, scale):
    ours, ref = _head_and_reference(bias)
    _, target = _logits_and_target(shape=(4, 6), vocab=13)
    x = torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(SEED)) * scale
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss = ours(x_ours, target)
    ref_loss = F.cross_entropy(ref(x_ref).reshape(-1, 13), target.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-6)
    upstream = torch.tensor(0.7)
    loss.backward(upstream)
    ref_loss.backward(upstream)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-5, rtol=1e-5)
    assert (x_ours.grad[target == -100] == 0).all()


@pytest.mark.parametrize("chunk_rows", [None, 5], ids=["one-chunk", "chunks-of-5-rows"])
def test_head_loss_under_bf16_autocast_matches_autograd(chunk_rows, monkeypatch):
    if chunk_rows is not None:  # the fp32 copy of the bf16 logits in row chunks, 24 rows = 5 + 5 + 5 + 5 + 4
        monkeypatch.setattr(cross_entropy, "_CHUNK_BYTES", 4 * 13 * chunk_rows)
    ours, ref = _head_and_reference()
    _, target = _logits_and_target(shape=(4, 6), vocab=13)
    x = torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(SEED))
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ours(x_ours, target)
        ref_loss = F.cross_entropy(ref(x_ref).float().reshape(-1, 13), target.reshape(-1))
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)  # the same bf16 product, loss in fp32
    assert x_ours.grad.dtype == torch.float32 and ours.weight.grad.dtype == torch.float32
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=2e-3, rtol=1e-2)


def test_fp32_chunks_of_bf16_logits_only_on_the_cpu(monkeypatch):
    monkeypatch.setattr(cross_entropy, "_CHUNK_BYTES", 4 * 13 * 5)
    assert cross_entropy.fp32_chunk_rows(torch.empty(24, 13, dtype=torch.bfloat16)) == 5
    # any other device (CUDA; "meta" stands in for it here) takes all rows in one fp32 copy
    assert cross_entropy.fp32_chunk_rows(torch.empty(24, 13, dtype=torch.bfloat16, device="meta")) == 24


def test_head_loss_one_fp32_copy_equals_row_chunks(monkeypatch):
    """The CUDA path (one fp32 copy of the bf16 logits) and the CPU's (row chunks) give the same loss and grads."""
    _, target = _logits_and_target(shape=(4, 6), vocab=13)
    x = torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(SEED))
    results, asked = {}, []
    for path, rows in (("chunks", lambda z: 5), ("one copy", lambda z: z.shape[0])):
        monkeypatch.setattr(cross_entropy, "fp32_chunk_rows", lambda z, rows=rows: asked.append(z.shape) or rows(z))
        ours, _ = _head_and_reference()
        x_in = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ours(x_in, target)
        loss.backward()
        results[path] = (loss, x_in.grad, ours.weight.grad)
    assert asked == [(24, 13), (24, 13)]  # the bf16 logits went through the dispatch in both runs
    for a, b in zip(results["chunks"], results["one copy"], strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_mappings_are_identity_at_group_none():
    x = torch.randn(2, 4, 6, requires_grad=True)
    for fn in (mappings.copy_to_region, mappings.reduce_from_region):
        assert fn(x, None) is x
    for fn in (mappings.split_to_region, mappings.gather_from_region):
        assert fn(x, None) is x
        assert fn(x, None, -1) is x
        assert fn(x, None, 1) is x
    for fn in (mappings.reduce_scatter_to_region, mappings.all_gather_from_region):
        assert fn(x, None) is x
        assert fn(x, None, 1) is x
    assert mappings.group_size(None) == 1
    assert mappings.group_rank(None) == 0


def test_default_parallel_state_is_world_size_1():
    state = ParallelState()
    assert state.tp_size == state.dp_size == state.ep_size == 1
    assert state.tp_rank == state.dp_rank == state.ep_rank == 0
    assert state.tp_group is state.dp_group is state.ep_group is state.edp_group is None
    assert not state.sequence_parallel
    assert ParallelState.build() == state  # no process group needed at tp=ep=1


def test_build_without_process_group_explains_how_to_launch():
    with pytest.raises(ParallelConfigError, match=r"parallel\.tp=2.*torchrun"):
        ParallelState.build(tp=2)


def test_parallel_dims_world_not_divisible_by_tp():
    with pytest.raises(ParallelConfigError, match=r"parallel\.tp=4") as excinfo:
        ParallelDims(world_size=6, tp=4)
    assert "6" in str(excinfo.value)


def test_parallel_dims_ep_must_divide_dp():
    with pytest.raises(ParallelConfigError, match=r"parallel\.ep=3") as excinfo:
        ParallelDims(world_size=8, tp=2, ep=3)
    assert "data-parallel degree 4" in str(excinfo.value)
    assert "degrees: world_size=8, tp=2, ep=3" in str(excinfo.value)  # every degree, as the user set them


@pytest.mark.parametrize("name", ["world_size", "tp", "ep"])
def test_parallel_dims_rejects_degrees_below_one(name):
    with pytest.raises(ParallelConfigError, match=rf"parallel\.{name}"):
        ParallelDims(**{name: 0})


def test_parallel_dims_error_is_a_value_error():
    assert issubclass(ParallelConfigError, ValueError)


def test_group_ranks_match_the_documented_layout():
    dims = ParallelDims(world_size=8, tp=2, ep=2)
    assert (dims.dp, dims.edp) == (4, 2)
    assert dims.group_ranks() == {
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "dp": [[0, 2, 4, 6], [1, 3, 5, 7]],
        "ep": [[0, 2], [4, 6], [1, 3], [5, 7]],
        "edp": [[0, 4], [2, 6], [1, 5], [3, 7]],
        "cp": [[r] for r in range(8)],
        "pp": [[r] for r in range(8)],
        "embed": [[r] for r in range(8)],
        "mp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "dp_cp": [[0, 2, 4, 6], [1, 3, 5, 7]],
    }


def test_pipeline_groups_put_stages_outermost():
    # Megatron's order: 8 ranks, tp=2, pp=2 -> dp=2; a stage is a block of 4 consecutive ranks
    dims = ParallelDims(world_size=8, tp=2, pp=2)
    groups = dims.group_ranks()
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["embed"] == groups["pp"]  # two stages: the first and last are the whole pipeline
    assert groups["mp"] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert dims.coords(6) == {"tp": 0, "cp": 0, "dp": 1, "pp": 1, "ep": 0, "edp": 1}
    assert ParallelDims(world_size=12, pp=3).group_ranks()["embed"][0] == [0, 8]


def test_context_groups_sit_between_data_and_tensor():
    # 16 ranks, tp=2, cp=2, pp=2 -> dp=2: a cp pair is 2 apart, the gradient group dp x cp of one stage and tp rank
    dims = ParallelDims(world_size=16, tp=2, cp=2, pp=2)
    groups = dims.group_ranks()
    assert dims.dp == 2 and groups["tp"][:2] == [[0, 1], [2, 3]]
    assert groups["cp"][:3] == [[0, 2], [1, 3], [4, 6]]
    assert groups["dp"][:2] == [[0, 4], [1, 5]]
    assert groups["dp_cp"] == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert groups["mp"][:2] == [[0, 1, 8, 9], [2, 3, 10, 11]]
    assert dims.coords(7) == {"tp": 1, "cp": 1, "dp": 1, "pp": 0, "ep": 0, "edp": 1}


def test_pipeline_degree_must_divide_the_world():
    with pytest.raises(ParallelConfigError, match=r"parallel\.pp=4 x parallel\.tp=2 = 8 does not divide"):
        ParallelDims(world_size=12, tp=2, pp=4)


@pytest.mark.parametrize(
    ("world_size", "tp", "ep", "pp", "cp"), [(1, 1, 1, 1, 1), (8, 2, 2, 1, 1), (8, 1, 4, 1, 1), (16, 4, 2, 1, 1),
                                             (6, 3, 1, 1, 1), (8, 2, 1, 2, 1), (16, 2, 2, 2, 1), (12, 1, 2, 3, 1),
                                             (16, 2, 1, 2, 2), (16, 1, 2, 1, 4)]
)  # fmt: skip
def test_group_ranks_partition_the_world_consistently_with_coords(world_size, tp, ep, pp, cp):
    dims = ParallelDims(world_size=world_size, tp=tp, ep=ep, pp=pp, cp=cp)
    sizes = {"tp": tp, "dp": dims.dp, "ep": ep, "edp": dims.edp, "pp": pp, "embed": min(pp, 2), "mp": tp * pp,
             "cp": cp, "dp_cp": dims.dp * cp}  # fmt: skip
    all_groups = dims.group_ranks()
    assert all_groups["embed"] == [sorted({g[0], g[-1]}) for g in all_groups["pp"]]  # middle stages are in none
    for kind, groups in all_groups.items():
        if kind != "embed":
            assert sorted(r for g in groups for r in g) == list(range(world_size)), kind
        for group in groups:
            assert len(group) == sizes[kind], kind
            if kind in ("embed", "mp", "dp_cp"):  # not mesh axes: no coordinate of their own
                continue
            # each rank's index inside its group is its coordinate of that kind
            assert [dims.coords(r)[kind] for r in group] == list(range(len(group))), (kind, group)


@pytest.mark.parametrize(("world_size", "tp", "ep"), [(1, 1, 1), (8, 2, 2), (8, 1, 4), (16, 4, 2), (6, 3, 1)])
def test_group_ranks_equal_the_explicit_megatron_layout(world_size, tp, ep):
    dims = ParallelDims(world_size=world_size, tp=tp, ep=ep)
    dp = world_size // tp
    rank = lambda d, t: d * tp + t  # noqa: E731
    expected = {
        "tp": [[rank(d, t) for t in range(tp)] for d in range(dp)],
        "cp": [[r] for r in range(world_size)],
        "dp": [[rank(d, t) for d in range(dp)] for t in range(tp)],
        "pp": [[r] for r in range(world_size)],
        "ep": [[rank(b * ep + e, t) for e in range(ep)] for t in range(tp) for b in range(dp // ep)],
        "edp": [[rank(b * ep + e, t) for b in range(dp // ep)] for t in range(tp) for e in range(ep)],
        "embed": [[r] for r in range(world_size)],
        "mp": [[rank(d, t) for t in range(tp)] for d in range(dp)],
        "dp_cp": [[rank(d, t) for d in range(dp)] for t in range(tp)],
    }
    assert dims.group_ranks() == expected and list(dims.group_ranks()) == list(expected)  # the creation order too
    for r in range(world_size):
        t, d = r % tp, r // tp
        assert dims.coords(r) == {"tp": t, "cp": 0, "dp": d, "pp": 0, "ep": d % ep, "edp": d // ep}


def test_enabled_predicates():
    dims = ParallelDims(world_size=8, tp=2, ep=2)
    assert dims.tp_enabled and dims.dp_enabled and dims.ep_enabled
    dims = ParallelDims(world_size=2, tp=2)
    assert dims.tp_enabled and not dims.dp_enabled and not dims.ep_enabled
    assert not any((ParallelDims().tp_enabled, ParallelDims().dp_enabled, ParallelDims().ep_enabled))
