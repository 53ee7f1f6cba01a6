"""Expert parallelism on gloo: MoEMLP at ep=2 and ep=4 against the ep=1 module built from the same full weights.

Each rank gets its own tokens (as data-parallel ranks do) and runs both the ep=1 reference and the expert-parallel
module on them. Outputs, input and router gradients and the losses must equal the reference's on the same rank.
An expert's gradient on its ep rank collects the tokens of the whole expert group, so it is compared with the
reference gradient summed over the expert group (sliced to the rank's experts). The router is forced so that expert
E-1 never gets a token and expert 0 gets tokens only from odd data-parallel ranks: per-rank counts are uneven and
some (rank, expert) pairs are empty. The expert bias after `update_expert_bias()` must equal the update from the
reference loads summed over the data-parallel group.

One spawn of 4 gloo processes (each spawn costs seconds) runs three layouts: ep=4 (tp=1, the expert group is the
whole data-parallel group), ep=2 (tp=1, two expert groups of 2 and dp=4: the bias update must cover the whole
data-parallel group, not one expert group; this is also everything a world of 2 at ep=2 would test), and tp=2 x
ep=2 under sequence parallelism (each tensor rank routes its own sequence chunk: the chunks' aux losses must add up
to the unsplit sequence's, so the router gradient equals the reference's). In every layout the step's metrics row
(training.moe_metrics) must equal the reference's counts and losses over the data-parallel group, and a layer's
forward must synchronise host and device once (the all-to-all's split sizes), its backward never. At ep=2 the
capacity configuration runs once more with the experts as one grouped GEMM instead of a loop, and at ep=4 and ep=2
once more with every expert's rows padded to the capacity (parallel.moe_pad_to_capacity): no host sync at all. The
rank returns `{check: (diff or error, tol)}` and the tests below read it.
"""

import dataclasses
import traceback

import pytest
import torch
import torch.distributed as dist
from torch import nn

import modeling.moe as moe_module
from modeling.config import ModelConfig
from modeling.moe import MoEMLP
from parallel.experts import combine, dispatch
from parallel.state import ParallelConfigError, ParallelState
from tests.dist_utils import run_distributed
from tests.host_syncs import HostSyncs
from training.moe_metrics import MoEStepStats

ATOL = 1e-5
EXACT = 0.0
B, T, H, I, E, K = 2, 6, 16, 8, 8, 2  # noqa: E741
SEED = 1234
RATE = 0.01
CONFIGS = {
    "mixtral": dict(router_z_loss_coef=0.01),
    "capacity": dict(
        capacity_factor=1.0,
        router_score="sigmoid",
        router_expert_bias=True,
        router_bias_update_rate=RATE,
        num_shared_experts=1,
        router_z_loss_coef=0.01,
    ),
    "sp": dict(
        num_shared_experts=1,
        router_expert_bias=True,
        router_bias_update_rate=RATE,
        router_aux_loss_coef=0.1,
        router_z_loss_coef=0.01,
    ),
}


class _Checker:
    """Collects `name -> (relative max abs diff, tol)`; a shape mismatch or an exception is recorded as text."""

    def __init__(self, prefix: str):
        self.results: dict[str, tuple[float | str, float]] = {}
        self.prefix, self.section = prefix, ""

    def _key(self, name: str) -> str:
        return f"[{self.section}] {self.prefix}{name}"

    def close(self, name: str, actual, expected: torch.Tensor, tol: float = ATOL) -> None:
        """Max abs difference, relative to the expected magnitude where that exceeds 1."""
        if actual is None or actual.shape != expected.shape:
            got = None if actual is None else tuple(actual.shape)
            self.results[self._key(name)] = (f"got {got}, expected {tuple(expected.shape)}", tol)
            return
        e = expected.detach().double()
        scale = e.abs().max().clamp(min=1.0) if e.numel() else 1.0
        diff = (actual.detach().double() - e).abs().max() / scale if e.numel() else torch.tensor(0.0)
        self.results[self._key(name)] = (float(diff), tol)

    def true(self, name: str, ok: bool) -> None:
        self.results[self._key(name)] = (0.0 if ok else "false", EXACT)

    def run(self, section: str, fn, *args) -> None:
        """Run one group of checks; an exception (raised alike on every rank) becomes a failed check."""
        self.section = section
        try:
            fn(self, *args)
        except Exception:
            self.results[self._key("raised")] = (traceback.format_exc(), EXACT)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


# ------------------------------------------------------------------------------------- dispatch/combine


def _indices(ep_rank: int, ep: int, n: int, k: int) -> torch.Tensor:
    """Assignments of one ep rank over 2 experts per rank; -1 = dropped; the last expert never appears.

    ep rank 0 only uses its own experts, so it sends nothing to the others.
    """
    g = torch.Generator().manual_seed(50 + ep_rank)
    high = 2 if ep_rank == 0 else 2 * ep - 1
    return torch.randint(-1, high, (n, k), generator=g)


def _check_dispatch(c: _Checker, state: ParallelState) -> None:
    ep, r, n, k = state.ep_size, state.ep_rank, 5, 2
    experts = 2 * ep
    x = _leaf((r * 100 + torch.arange(n, dtype=torch.float32)).unsqueeze(1).repeat(1, 3))  # (n, 3): row = id
    idx = _indices(r, ep, n, k)
    rows, counts, host, plan = dispatch(x, idx, experts, state.ep_group)
    all_idx = [_indices(s, ep, n, k).reshape(-1) for s in range(ep)]
    expected_rows, expected_counts = [], []
    for j in range(2):  # local expert j, global expert 2r + j: sources in ep-rank order, assignment order inside
        ids = [s * 100 + a // k for s in range(ep) for a in range(n * k) if all_idx[s][a] == 2 * r + j]
        expected_rows += ids
        expected_counts.append(len(ids))
    c.true("rows grouped by local expert, sources in rank order", rows[:, 0].tolist() == expected_rows)
    c.true("tokens per local expert", counts.tolist() == expected_counts and host == expected_counts)
    c.true("an expert with no token", r != ep - 1 or counts[1] == 0)

    out = combine(rows * 2, plan)  # (n k, 3) in assignment order
    flat = idx.reshape(-1)
    expected = torch.stack([2 * x[a // k] if flat[a] >= 0 else torch.zeros(3) for a in range(n * k)])
    c.close("combine returns each assignment's row, zero where dropped", out, expected, EXACT)
    g = torch.randn(n * k, 3, generator=torch.Generator().manual_seed(60 + r))
    out.backward(g)
    expected_grad = torch.zeros(n, 3).index_add_(0, torch.arange(n * k) // k, 2 * g * (flat >= 0).unsqueeze(1))
    c.close("backward brings each row's gradient home", x.grad, expected_grad)


# ---------------------------------------------------------------------------------------------- MoEMLP


def _config(**kw) -> ModelConfig:
    base = dict(vocab_size=32, hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2)
    return ModelConfig(**{**base, "num_local_experts": E, "num_experts_per_tok": K, **kw})


def _build(config: ModelConfig, state: ParallelState) -> MoEMLP:
    torch.manual_seed(SEED)
    moe = MoEMLP(config, state, init_method=lambda w: nn.init.normal_(w, 0.0, 0.5))
    with torch.no_grad():
        moe.gate.weight[E - 1] = 0.0
        moe.gate.weight[E - 1, 0] = -4.0  # tokens have x_0 ~ 3: expert E-1 is never chosen
        moe.gate.weight[0] = 0.0
        moe.gate.weight[0, 1] = 4.0  # even dp ranks have x_1 = -3: expert 0 gets tokens from odd dp ranks only
        if moe.expert_bias is not None:
            moe.expert_bias.copy_(torch.linspace(0.01, -0.01, E))
    return moe.train()


def _tokens(dp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + dp_rank)
    x = torch.randn(B, T, H, generator=g)
    x[..., 0] = 3.0 + 0.1 * x[..., 0]
    if dp_rank % 2 == 0:
        x[..., 1] = -3.0
    return x, torch.randn(B, T, H, generator=g)


def _check_moe(c: _Checker, state: ParallelState, config: ModelConfig, forward_syncs: int = 1) -> None:
    ref, par = _build(config, ParallelState()), _build(config, state)
    sl = slice(par.expert_offset, par.expert_offset + par.num_local_experts)
    for name in ("w1", "w2", "w3"):
        c.close(f"{name} holds the slice of the full draw", getattr(par, name), getattr(ref, name)[sl], EXACT)
    c.close("router weight replicated", par.gate.weight, ref.gate.weight, EXACT)

    x, dy = _tokens(state.dp_rank)
    sp = state.sequence_parallel
    x_ref = _leaf(x)
    y_ref = ref(x_ref)
    ((y_ref * dy).sum() + ref.aux_loss).backward()
    # under sequence parallelism each tensor rank backpropagates its chunk's share of the aux loss
    local = (lambda t: t.chunk(state.tp_size, dim=1)[state.tp_rank]) if sp else (lambda t: t)  # noqa: E731
    x_par = _leaf(local(x))
    with HostSyncs() as fwd:
        y = par(x_par)
    with HostSyncs() as bwd:
        ((y * local(dy)).sum() + par.aux_loss).backward()
    # the all-to-all's split sizes are host integers: one read of the sent and received counts (none when padded to
    # the capacity), none in backward
    syncs = f"{forward_syncs} host sync(s) in forward, none in backward: {fwd.calls} {bwd.calls}"
    c.true(syncs, fwd.count == forward_syncs and bwd.count == 0)

    c.close("output", y, local(y_ref))
    c.close("input grad", x_par.grad, local(x_ref.grad))
    c.close("router weight grad", par.gate.weight.grad, ref.gate.weight.grad)
    for name in ("w1", "w2", "w3"):
        summed = getattr(ref, name).grad.clone()
        dist.all_reduce(summed, group=state.ep_group)  # every rank of the expert group sends tokens to the expert
        c.close(f"{name} grad = reference summed over the expert group", getattr(par, name).grad, summed[sl])
    if par.shared_experts is not None:
        for name, p in par.shared_experts.named_parameters():
            expected = ref.shared_experts.get_parameter(name).grad
            if p.tp_split_dim is not None:
                expected = expected.chunk(state.tp_size, dim=p.tp_split_dim)[state.tp_rank]
            c.close(f"shared {name} grad", p.grad, expected)
    if not sp:
        c.close("aux_loss", par.aux_loss, ref.aux_loss)
        c.true("tokens_per_expert", torch.equal(par.stats["tokens_per_expert"], ref.stats["tokens_per_expert"]))
        for key in ("dropped_fraction", "lb_loss", "z_loss"):
            c.close(key, par.stats[key], ref.stats[key])

    _check_metrics_row(c, state, par, ref)

    load = ref.stats["tokens_per_expert"]
    totals = load.clone()
    dist.all_reduce(totals, group=state.dp_group)
    c.true("expert E-1 gets no token at all", totals[E - 1] == 0)
    c.true("expert 0 gets tokens from odd dp ranks only", (load[0] == 0) == (state.dp_rank % 2 == 0))
    c.true("uneven counts", load[: E - 1].unique().numel() > 1)
    if config.capacity_factor is not None:
        dropped = ref.stats["dropped_fraction"].clone()
        dist.all_reduce(dropped, group=state.dp_group)
        c.true("some assignments dropped", dropped > 0)

    if par.expert_bias is not None:
        summed = ref.expert_load.clone()
        dist.all_reduce(summed, group=state.dp_group)
        expected = ref.expert_bias + RATE * torch.sign(summed.mean() - summed)
        par.update_expert_bias()
        c.close("expert bias after update_expert_bias", par.expert_bias, expected, EXACT)
        c.true("loads reset", par.expert_load.abs().sum() == 0)


class _OneLayer:
    """The part of LlamaForCausalLM that MoEStepStats reads: one MoE layer."""

    def __init__(self, moe: MoEMLP):
        self.moe, self.config = moe, moe.config

    def moe_layers(self) -> list[tuple[int, MoEMLP]]:
        """(layer index, MoEMLP) pairs, as LlamaForCausalLM.moe_layers."""
        return [(0, self.moe)]


def _check_metrics_row(c: _Checker, state: ParallelState, par: MoEMLP, ref: MoEMLP) -> None:
    """The step's metrics row of `par` equals the reference's counts summed and losses averaged over dp."""
    stats = MoEStepStats(_OneLayer(par), state)
    stats.add(par.aux_loss)
    row = stats.row()
    tokens = ref.stats["tokens_per_expert"].clone()
    dist.all_reduce(tokens, group=state.dp_group)
    c.true("row tokens_per_expert", row["moe/layer0/tokens_per_expert"] == tokens.tolist())
    keys = ("dropped_fraction", "lb_loss", "z_loss")
    expected = {"aux_loss": float(ref.aux_loss.detach()), **{k: float(ref.stats[k]) for k in keys}}
    means = torch.tensor(list(expected.values()), dtype=torch.float64)
    dist.all_reduce(means, group=state.dp_group)
    means /= state.dp_size
    keys = {"aux_loss": "moe/aux_loss", "dropped_fraction": "moe/layer0/dropped_frac"}
    for name, value in zip(expected, means.tolist(), strict=True):
        got = row[keys.get(name, f"moe/layer0/{name}")]
        c.close(f"row {name}", torch.tensor(got), torch.tensor(value))


def _check_errors(c: _Checker, state: ParallelState) -> None:
    try:
        MoEMLP(_config(num_local_experts=6), state, init_method=nn.init.normal_)
        c.true("indivisible experts raise", False)
    except ParallelConfigError as e:
        named = "model.num_local_experts=6" in str(e) and f"parallel.ep={state.ep_size}" in str(e)
        c.true("error names both keys", named)


# ------------------------------------------------------------------------------------------ the rank


def _all_checks(rank: int, world_size: int) -> dict[str, tuple[float | str, float]]:
    torch.set_num_threads(1)
    results = {}
    for layout in (dict(ep=4), dict(ep=2), dict(tp=2, ep=2, sequence_parallel=True)):
        state = ParallelState.build(**layout)
        c = _Checker(prefix=f"{layout} ")
        if state.sequence_parallel:
            c.run("sp", _check_moe, state, _config(**CONFIGS["sp"]))
        else:
            c.run("dispatch", _check_dispatch, state)
            c.run("mixtral", _check_moe, state, _config(**CONFIGS["mixtral"]))
            c.run("capacity", _check_moe, state, _config(**CONFIGS["capacity"]))
            padded = dataclasses.replace(state, moe_pad_to_capacity=True)
            c.run("padded", _check_moe, padded, _config(**CONFIGS["capacity"]), 0)
            if layout["ep"] == 2:  # the experts as one grouped GEMM (fp32 on the CPU runs them as a loop)
                real, moe_module.grouped_gemm_supported = moe_module.grouped_gemm_supported, lambda *_: True
                try:
                    c.run("grouped", _check_moe, state, _config(**CONFIGS["capacity"]))
                finally:
                    moe_module.grouped_gemm_supported = real
        if layout["ep"] == 4:
            c.run("errors", _check_errors, state)
        results.update(c.results)
    return results


@pytest.fixture(scope="module")
def rank_results():
    return run_distributed(_all_checks, 4, timeout=180)


def _assert_checks(rank_results, section: str, layouts: int) -> None:
    failures, seen = [], set()
    for rank, results in enumerate(rank_results):
        for name, (diff, tol) in results.items():
            if not name.startswith(f"[{section}] "):
                continue
            seen.add(name[: name.index("}") + 1])  # the layout
            if isinstance(diff, str) or not diff <= tol:
                failures.append(f"rank {rank}: {name}: {diff} (tol {tol})")
    assert len(seen) == layouts, f"section {section!r} ran in {sorted(seen)}, expected {layouts} layouts"
    assert not failures, "\n".join(failures)


def test_dispatch_combine_uneven_and_empty(rank_results):
    _assert_checks(rank_results, "dispatch", layouts=2)


def test_mixtral_routing_equals_ep1(rank_results):
    _assert_checks(rank_results, "mixtral", layouts=2)


def test_capacity_sigmoid_bias_shared_equals_ep1(rank_results):
    _assert_checks(rank_results, "capacity", layouts=2)


def test_capacity_padded_dispatch_equals_ep1_without_host_syncs(rank_results):
    _assert_checks(rank_results, "padded", layouts=2)


def test_grouped_gemm_experts_equal_ep1(rank_results):
    _assert_checks(rank_results, "grouped", layouts=1)


def test_tensor_and_sequence_parallel_with_experts_equals_ep1(rank_results):
    _assert_checks(rank_results, "sp", layouts=1)


def test_indivisible_experts_raise(rank_results):
    _assert_checks(rank_results, "errors", layouts=1)
