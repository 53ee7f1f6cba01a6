"""MoEMLP at ep=1 against transformers' Mixtral sparse MoE block and a per-token Python loop over the same weights.

transformers is the reference for the Mixtral path (softmax, top-k renormalised, dropless, no bias): output, router
logits, every gradient and the load-balancing loss. Everything Mixtral lacks (capacity dropping, sigmoid scores,
shared experts, expert bias) is checked against `_naive`, which routes token by token with plain Python sorting.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func

from configs.schema import load_config
from modeling.config import ModelConfig
from modeling.moe import MoEMLP, grouped_gemm_supported, mixtral_aux_loss
from parallel.experts import combine, dispatch
from parallel.layers import cpu_has_native_bf16
from parallel.state import ParallelConfigError, ParallelState
from tests.host_syncs import HostSyncs
from training.moe_metrics import MoEStepStats

ATOL = 1e-5
B, T, H, I, E, K = 2, 5, 16, 24, 4, 2  # noqa: E741


def _config(**kw) -> ModelConfig:
    base = dict(vocab_size=32, hidden_size=H, intermediate_size=I, num_hidden_layers=3, num_attention_heads=2)
    return ModelConfig(**base, **{"num_local_experts": E, "num_experts_per_tok": K, **kw})


def _moe(seed: int = 0, state: ParallelState | None = None, **kw) -> MoEMLP:
    torch.manual_seed(seed)
    init = lambda w: torch.nn.init.normal_(w, 0.0, 0.5)  # noqa: E731
    return MoEMLP(_config(**kw), state or ParallelState(), init_method=init)


def _x(seed: int = 1, requires_grad: bool = False) -> torch.Tensor:
    x = torch.randn(B, T, H, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(requires_grad)


def _mixtral_block(moe: MoEMLP) -> MixtralSparseMoeBlock:
    hf = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
    hf._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(hf)
    with torch.no_grad():  # transformers 5 stores the experts fused: gate_up_proj (E, 2I, H) = [w1; w3]
        block.gate.weight.copy_(moe.gate.weight)
        block.experts.gate_up_proj.copy_(torch.cat([moe.w1, moe.w3], dim=1))
        block.experts.down_proj.copy_(moe.w2)
    return block


def _naive(moe: MoEMLP, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Route token by token in plain Python; returns (output (B, T, H), dropped assignments)."""
    cfg = moe.config
    tokens = x.detach().reshape(-1, H)  # (N, H)
    n_tokens = tokens.shape[0]
    bias = moe.expert_bias.tolist() if moe.expert_bias is not None else [0.0] * E
    assignments = []  # (expert, weight, assignment id, token)
    for n in range(n_tokens):
        logits = moe.gate.weight.detach() @ tokens[n]
        scores = (logits.softmax(0) if cfg.router_score == "softmax" else logits.sigmoid()).tolist()
        chosen = sorted(range(E), key=lambda e: -(scores[e] + bias[e]))[:K]
        total = sum(scores[e] for e in chosen) if cfg.norm_topk_prob else 1.0
        assignments += [(e, scores[e] / total, n * K + j, n) for j, e in enumerate(chosen)]
    kept = assignments
    if cfg.capacity_factor is not None:
        capacity = math.ceil(cfg.capacity_factor * n_tokens * K / E)
        kept = []
        for e in range(E):
            mine = sorted((a for a in assignments if a[0] == e), key=lambda a: (-a[1], a[2]))
            kept += mine[:capacity]
    out = torch.zeros_like(tokens)
    for e, w, _, n in kept:
        h = F.silu(moe.w1[e] @ tokens[n]) * (moe.w3[e] @ tokens[n])
        out[n] += w * (moe.w2[e] @ h).detach()
    if moe.shared_experts is not None:
        s = moe.shared_experts
        out += F.linear(F.silu(F.linear(tokens, s.gate_proj.weight)) * F.linear(tokens, s.up_proj.weight),
                        s.down_proj.weight).detach()  # fmt: skip
    return out.view(x.shape), len(assignments) - len(kept)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference, relative to b's largest magnitude where that exceeds 1 (fp32 rounding scales with it)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    b = b.detach().double()
    return ((a.detach().double() - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


@pytest.fixture(params=[True, False], ids=["grouped-gemm", "expert-loop"])
def experts_path(request, monkeypatch):
    """Run the experts as one grouped GEMM or as a loop over the experts, whatever this machine would choose."""
    monkeypatch.setattr("modeling.moe.grouped_gemm_supported", lambda *_: request.param)
    return request.param


def test_matches_transformers_mixtral_block(experts_path):
    moe = _moe(router_z_loss_coef=0.01)
    block = _mixtral_block(moe)
    logits_hf = []
    block.gate.register_forward_hook(lambda _m, _i, out: logits_hf.append(out[0]))
    x, x_hf = _x(requires_grad=True), _x(requires_grad=True)
    dy = torch.randn(B, T, H, generator=torch.Generator().manual_seed(2))

    y, y_hf = moe(x), block(x_hf)
    assert _diff(y, y_hf) <= ATOL
    assert _diff(moe.router_logits, logits_hf[0]) <= ATOL
    y.backward(dy)
    y_hf.backward(dy)
    assert _diff(x.grad, x_hf.grad) <= ATOL
    assert _diff(moe.gate.weight.grad, block.gate.weight.grad) <= ATOL
    gate_up = block.experts.gate_up_proj.grad  # (E, 2I, H)
    assert _diff(moe.w1.grad, gate_up[:, :I]) <= ATOL
    assert _diff(moe.w3.grad, gate_up[:, I:]) <= ATOL
    assert _diff(moe.w2.grad, block.experts.down_proj.grad) <= ATOL

    lb = load_balancing_loss_func((logits_hf[0],), E, K)
    z = torch.stack([torch.log(torch.exp(row).sum()) ** 2 for row in logits_hf[0]]).mean()
    assert moe.stats["lb_loss"] == pytest.approx(lb.item(), abs=ATOL)
    assert moe.stats["z_loss"] == pytest.approx(z.item(), abs=ATOL)
    assert _diff(moe.aux_loss, 0.001 * lb + 0.01 * z) <= ATOL
    assert moe.stats["dropped_fraction"] == 0.0
    chosen = logits_hf[0].topk(K, dim=-1).indices.reshape(-1)
    assert moe.stats["tokens_per_expert"].tolist() == [int((chosen == e).sum()) for e in range(E)]


def test_mixtral_aux_loss_over_layers_is_transformers_not_the_mean_of_layers():
    moes = [_moe(seed) for seed in range(3)]
    x = _x()
    per_layer = []
    for moe in moes:
        moe(x)
        per_layer.append(moe.stats["lb_loss"])
    logits = tuple(moe.router_logits for moe in moes)
    hf = load_balancing_loss_func(logits, E, K)
    assert _diff(mixtral_aux_loss(logits, K, E), hf) <= ATOL
    assert abs(sum(per_layer) / 3 - hf.item()) > 1e-3  # one loss over all layers, not a mean of per-layer losses
    assert mixtral_aux_loss(logits[:1], K, E).item() == pytest.approx(per_layer[0], abs=ATOL)


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_capacity_drops_what_a_python_loop_drops(capacity_factor, experts_path):
    moe = _moe(capacity_factor=capacity_factor)
    x = _x()
    y = moe(x)
    expected, dropped = _naive(moe, x)
    assert dropped > 0  # the test must exercise dropping
    assert moe.stats["dropped_fraction"] == dropped / (B * T * K)
    assert _diff(y, expected) <= ATOL


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_rows_padded_to_capacity_give_the_same_layer_without_host_syncs(capacity_factor, experts_path):
    """parallel.moe_pad_to_capacity: every expert computes C rows, padding included; the loop reads no counts."""
    padded = _moe(state=ParallelState(moe_pad_to_capacity=True), capacity_factor=capacity_factor).train()
    plain = _moe(capacity_factor=capacity_factor).train()
    x, x_ref = _x(requires_grad=True), _x(requires_grad=True)
    with HostSyncs() as syncs:
        y = padded(x)
        (y.square().sum() + padded.aux_loss).backward()
    assert syncs.count == 0, syncs.calls
    expected, dropped = _naive(padded, x)
    assert dropped > 0 and padded.stats["dropped_fraction"] == dropped / (B * T * K)
    assert _diff(y, expected) <= ATOL
    (plain(x_ref).square().sum() + plain.aux_loss).backward()
    for name in ("w1", "w2", "w3"):
        assert _diff(getattr(padded, name).grad, getattr(plain, name).grad) <= ATOL, name
    assert _diff(padded.gate.weight.grad, plain.gate.weight.grad) <= ATOL
    assert _diff(x.grad, x_ref.grad) <= ATOL


def test_large_capacity_drops_nothing():
    x = _x()
    assert _diff(_moe(capacity_factor=E)(x), _moe()(x)) == 0.0


@pytest.mark.parametrize(
    "kw",
    [
        dict(router_score="sigmoid", num_shared_experts=2),
        dict(router_score="sigmoid", norm_topk_prob=False, capacity_factor=1.0),
        dict(norm_topk_prob=False, num_shared_experts=1),
    ],
    ids=["sigmoid-shared", "sigmoid-unnormalised-capacity", "softmax-unnormalised-shared"],
)
def test_variants_match_python_loop(kw):
    moe = _moe(**kw)
    x = _x()
    assert _diff(moe(x), _naive(moe, x)[0]) <= ATOL
    if kw.get("router_score") == "sigmoid":
        s = moe.router_logits.sigmoid()
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        f = moe.stats["tokens_per_expert"].float() / (B * T)
        assert moe.stats["lb_loss"] == pytest.approx(E * (f * p).sum().item(), abs=ATOL)


def test_expert_bias_selects_but_does_not_weight():
    moe = _moe(router_expert_bias=True)
    x = _x()
    with torch.no_grad():
        moe.expert_bias[1] = 10.0  # every token picks expert 1, with its unbiased (renormalised) weight
    y = moe(x)
    assert moe.stats["tokens_per_expert"][1] == B * T
    assert _diff(y, _naive(moe, x)[0]) <= ATOL


def test_expert_bias_update_direction_and_accounting():
    rate = 0.01
    moe = _moe(router_expert_bias=True, router_bias_update_rate=rate).train()
    x1, x2 = _x(1, requires_grad=True), _x(3)
    # once plain, once under activation checkpointing: the recompute in backward must not count twice
    moe(x2)
    load = moe.stats["tokens_per_expert"].clone()
    with set_checkpoint_early_stop(False):  # recompute the whole forward, as a layer with later ops would
        checkpoint(moe, x1, use_reentrant=False).sum().backward()
    load += moe.stats["tokens_per_expert"]
    moe.eval()(x2)  # evaluation does not count
    assert moe.expert_load.tolist() == load.float().tolist()
    assert load.max() > load.float().mean() > load.min()  # the test needs an imbalance
    moe.update_expert_bias()
    expected = rate * torch.sign(load.float().mean() - load.float())
    assert moe.expert_bias.tolist() == expected.tolist()
    assert moe.expert_bias[load.argmax()] == -rate and moe.expert_bias[load.argmin()] == rate  # over down, under up
    assert moe.expert_load.sum() == 0
    assert "expert_bias" in moe.state_dict() and "expert_load" not in moe.state_dict()


def test_gradients_reach_router_and_experts():
    moe = _moe(router_z_loss_coef=0.01)
    x = _x(requires_grad=True)
    moe(x)
    moe.aux_loss.backward()  # the balancing losses alone train the router
    assert moe.gate.weight.grad.abs().sum() > 0
    moe.zero_grad()
    with torch.no_grad():
        moe.gate.weight[3] = -100.0  # with positive inputs, expert 3 has by far the lowest logit: never chosen
    x = torch.rand(B, T, H) + 0.1
    moe(x).square().sum().backward()
    assert moe.stats["tokens_per_expert"][3] == 0
    assert moe.gate.weight.grad.abs().sum() > 0
    for w in (moe.w1, moe.w2, moe.w3):
        assert (w.grad[:3].flatten(1).abs().sum(1) > 0).all()
        assert w.grad[3].abs().sum() == 0  # an expert without tokens gets a zero gradient, not None


def test_expert_parameters_are_marked_and_sliced_from_the_full_draw():
    moe = _moe(num_shared_experts=1)
    for name, p in moe.named_parameters():
        is_expert = name in ("w1", "w2", "w3")
        assert getattr(p, "expert_parallel", False) == is_expert, name
        assert p.tp_split_dim is None or name.startswith("shared_experts."), name
    assert moe.w1.shape == (E, I, H) and moe.w3.shape == (E, I, H) and moe.w2.shape == (E, H, I)
    torch.manual_seed(0)
    expected = torch.empty(E, H).normal_(0.0, 0.5), torch.empty(E, I, H).normal_(0.0, 0.5)
    assert torch.equal(moe.gate.weight, expected[0]) and torch.equal(moe.w1, expected[1])


def test_config_errors_name_the_key():
    with pytest.raises(ParallelConfigError, match="model.num_local_experts"):
        MoEMLP(_config(num_local_experts=0), ParallelState(), init_method=torch.nn.init.normal_)


@pytest.mark.parametrize("host_counts", [True, False], ids=["host-counts", "device-only"])
def test_dispatch_and_combine_are_a_permutation_on_one_rank(host_counts):
    x = torch.arange(6.0).unsqueeze(1).repeat(1, 3).requires_grad_()  # (6, 3): row n holds n
    idx = torch.tensor([[2, 0], [0, -1], [3, 2], [0, 3], [-1, 2], [2, 0]])  # expert 1: no token; two dropped
    rows, counts, host, plan = dispatch(x, idx, 4, None, host_counts=host_counts)
    assert counts.tolist() == [4, 0, 4, 2] and host == ([4, 0, 4, 2] if host_counts else None)
    by_expert = [0, 1, 3, 5, 0, 2, 4, 5, 2, 3]  # by expert, token order within an expert
    spare = [] if host_counts else [1, 4]  # without host counts the dropped assignments (3, 8) trail, in order
    assert rows[:, 0].tolist() == by_expert + spare
    out = combine(rows * 2, plan)  # (12, 3) in assignment order, zeros where dropped
    expected = torch.stack([2 * x[n // 2] if idx.view(-1)[n] >= 0 else torch.zeros(3) for n in range(12)])
    assert torch.equal(out, expected)
    out.sum().backward()
    assert x.grad[:, 0].tolist() == [4.0, 2.0, 4.0, 4.0, 2.0, 4.0]


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (
            ["parallel.ep=2", "parallel.deepspeed_config=configs/deepspeed/zero3.json"],
            2,
            r"parallel\.ep=2 with configs/deepspeed/zero3\.json \(ZeRO stage 3\).*zero1\.json, zero2\.json",
        ),
        (["parallel.ep=3"], 3, r"model\.num_local_experts=4 is not divisible by parallel\.ep=3"),
        (["parallel.moe_pad_to_capacity=true"], 1, r"moe_pad_to_capacity=true .*model\.capacity_factor set"),
    ],
    ids=["zero3-with-ep", "experts-not-divisible-by-ep", "padding-without-capacity"],
)
def test_training_config_refuses_what_expert_parallelism_cannot_run(overrides, world, message):
    base = ["model.preset=tiny", "model.num_local_experts=4", "data.train=shards/*.jsonl.zst", "data.tokenizer=tok"]
    base += ["train.micro_batch_size=1", "train.global_batch_size=12"]
    cfg = load_config(None, [*base, *overrides])
    with pytest.raises(ValueError, match=message):
        cfg.validate(world_size=world)


@pytest.mark.parametrize("router_score", ["softmax", "sigmoid"])
def test_routing_and_combining_stay_fp32_under_bf16_autocast(router_score, monkeypatch):
    """Autocast (bf16 on CUDA by default) would run the router's F.linear and the combining bmm in bf16."""
    moe = _moe(router_score=router_score, router_expert_bias=True)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.013, -0.007, 0.002, 0.0]))
    x = _x()
    tokens = x.reshape(-1, H)
    ref_logits = F.linear(tokens, moe.gate.weight)  # plain fp32, no autocast
    ref_scores = ref_logits.softmax(-1) if router_score == "softmax" else ref_logits.sigmoid()
    ref_idx = torch.topk(ref_scores + moe.expert_bias, K, dim=-1).indices
    ref_w = ref_scores.gather(1, ref_idx)
    ref_w = ref_w / ref_w.sum(-1, keepdim=True) if moe.config.norm_topk_prob else ref_w

    combined = []  # what combine hands back: each assignment's expert output (N k, H)
    real_combine = combine
    monkeypatch.setattr(
        "modeling.moe.combine", lambda rows, plan: combined.append(real_combine(rows, plan)) or combined[-1]
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, scores, idx, w = moe.route(tokens)
    assert [t.dtype for t in (logits, scores, w)] == [torch.float32] * 3
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert moe.router_logits.dtype == moe.aux_loss.dtype == torch.float32
    torch.testing.assert_close(moe.router_logits, ref_logits, rtol=0, atol=1e-6)
    # the weighted sum of the experts' (bf16) outputs, taken in fp32 with the fp32 weights
    expected = (ref_w.unsqueeze(-1) * combined[-1].float().view(-1, K, H)).sum(1).view(B, T, H)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
@pytest.mark.parametrize("activation_checkpointing", [False, True], ids=["stored", "recomputed"])
def test_host_syncs_per_layer(experts_path, capacity_factor, activation_checkpointing):
    """At ep=1 a layer never synchronises with the grouped GEMM; the loop reads its row counts once per forward.

    The backward never does, except that activation checkpointing runs each layer's forward again in it.
    """
    layers = [_moe(seed, capacity_factor=capacity_factor, router_expert_bias=True).train() for seed in range(2)]
    x = _x(requires_grad=True)
    dy = torch.randn(B, T, H, generator=torch.Generator().manual_seed(2))

    def block(h):
        for moe in layers:
            h = h + moe(h)
        return h

    with HostSyncs() as fwd:
        y = checkpoint(block, x, use_reentrant=False) if activation_checkpointing else block(x)
        loss = (y * dy).sum() + sum(moe.aux_loss for moe in layers)
    with HostSyncs() as bwd:
        loss.backward()
    per_layer = 0 if experts_path else 1
    assert fwd.count == len(layers) * per_layer, fwd.calls
    assert bwd.count == (len(layers) * per_layer if activation_checkpointing else 0), bwd.calls
    if capacity_factor is not None:
        assert sum(moe.stats["dropped_fraction"] for moe in layers) > 0  # the dropping path ran
    assert all(moe.gate.weight.grad.abs().sum() > 0 and moe.w2.grad.abs().sum() > 0 for moe in layers)


@pytest.mark.parametrize("capacity_factor", [None, 0.5], ids=["dropless", "capacity"])
def test_grouped_gemm_equals_the_expert_loop_under_bf16_autocast(capacity_factor, monkeypatch):
    """Both ways of running the experts give the same output and gradients in bf16 (same rows, same rounding)."""
    results = []
    for grouped in (True, False):
        monkeypatch.setattr("modeling.moe.grouped_gemm_supported", lambda *_, grouped=grouped: grouped)
        moe = _moe(capacity_factor=capacity_factor)
        x = _x(requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = moe(x)
        (y.square().sum() + moe.aux_loss).backward()
        results.append([y, x.grad, moe.w1.grad, moe.w2.grad, moe.w3.grad, moe.gate.weight.grad])
    for grouped, loop in zip(*results, strict=True):
        torch.testing.assert_close(grouped, loop, rtol=1e-2, atol=1e-2)
    ref = _naive(_moe(capacity_factor=capacity_factor), _x())[0]  # fp32, token by token
    assert 1e-4 < _diff(results[0][0], ref) < 0.05  # bf16 experts: rounded, but the same function


def test_grouped_gemm_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert grouped_gemm_supported(cpu, torch.bfloat16, 16, 24) == cpu_has_native_bf16()
    assert not grouped_gemm_supported(cpu, torch.bfloat16, 16, 4)  # 8-byte rows: the kernel needs 16-byte strides
    assert not grouped_gemm_supported(cpu, torch.float32, 16, 24)  # the loop was faster (bench/moe_experts.py)
    assert not grouped_gemm_supported(cpu, torch.float64, 16, 24)
    assert not grouped_gemm_supported(torch.device("meta"), torch.float32, 16, 24)
    if not torch.cuda.is_available():
        with pytest.MonkeyPatch.context() as mp:
            for capability, dtype, expected in [
                ((9, 0), torch.bfloat16, True),
                ((10, 0), torch.bfloat16, False),  # Blackwell: wrong gradients for empty groups (torch#172439)
                ((9, 0), torch.float32, False),  # fp32 runs torch's fallback, a host sync per call
                ((8, 0), torch.bfloat16, False),
            ]:
                mp.setattr(torch.cuda, "get_device_capability", lambda _device, c=capability: c)
                assert grouped_gemm_supported(cuda, dtype, 64, 128) == expected, (capability, dtype)


class _Layers:
    """The part of LlamaForCausalLM that MoEStepStats reads."""

    def __init__(self, moes: list[MoEMLP]):
        self.moes, self.config = moes, moes[0].config

    def moe_layers(self) -> list[tuple[int, MoEMLP]]:
        """(layer index, MoEMLP) pairs, as LlamaForCausalLM.moe_layers."""
        return [(2 * i + 1, moe) for i, moe in enumerate(self.moes)]


def test_step_stats_stay_on_the_device_until_the_row():
    moes = [_moe(seed, capacity_factor=1.0) for seed in range(2)]
    stats = MoEStepStats(_Layers(moes), ParallelState())
    expected = {}
    for micro_batch in range(2):
        for moe in moes:
            moe(_x(10 + micro_batch))
        aux = sum(moe.aux_loss for moe in moes)
        with HostSyncs() as syncs:
            stats.add(aux)
        assert syncs.count == 0, syncs.calls
        expected["aux"] = expected.get("aux", 0.0) + float(aux.detach()) / 2
        for i, moe in zip((1, 3), moes, strict=True):
            expected[i] = [expected.get(i, [0] * E)[e] + int(moe.stats["tokens_per_expert"][e]) for e in range(E)]
            expected[(i, "lb")] = expected.get((i, "lb"), 0.0) + float(moe.stats["lb_loss"]) / 2
            expected[(i, "dropped")] = expected.get((i, "dropped"), 0.0) + float(moe.stats["dropped_fraction"]) / 2
    with HostSyncs() as syncs:
        row = stats.row()
    assert syncs.count == 1, syncs.calls  # the whole step's values come to the host at once
    assert row["moe/aux_loss"] == pytest.approx(expected["aux"], abs=1e-6)
    for i in (1, 3):
        assert row[f"moe/layer{i}/tokens_per_expert"] == expected[i] and sum(expected[i]) == 2 * B * T * K
        assert row[f"moe/layer{i}/lb_loss"] == pytest.approx(expected[(i, "lb")], abs=1e-6)
        assert row[f"moe/layer{i}/dropped_frac"] == pytest.approx(expected[(i, "dropped")], abs=1e-6)
        assert expected[(i, "dropped")] > 0
