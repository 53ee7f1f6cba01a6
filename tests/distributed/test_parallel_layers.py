"""Tensor-parallel layers on gloo against a single-process reference built from the same full weights.

Every rank builds the full reference (nn.Linear / nn.Embedding / F.cross_entropy, fp32) and the parallel layer
from the same seed, feeds both the same input and upstream gradient, and compares the output, the input
gradient, and each parameter's local shard and gradient shard against the matching slice of the reference.

Spawning a process group costs seconds, so one spawned function per world size runs every check and returns
`{check name: (max abs diff or error text, tolerance)}`; a module-scoped fixture runs it once per world size and
the tests below only read its results.
"""

import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel import mappings
from parallel.cross_entropy import vocab_parallel_cross_entropy
from parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelHead
from parallel.state import ParallelState
from tests.dist_utils import run_distributed

ATOL = 1e-5
EXACT = 0.0  # shards are slices of the same full tensor: no tolerance

B, T, H, FFN, OUT, V = 2, 8, 8, 16, 12, 24  # T, H, FFN, OUT, V divisible by 2 and 4
SEED = 1234


class _Checker:
    """Collects `name -> (max abs diff, tol)`; a shape mismatch or an exception is recorded as text."""

    def __init__(self, prefix: str):
        self.results: dict[str, tuple[float | str, float]] = {}
        self.prefix = prefix
        self.section = ""

    def _key(self, name: str) -> str:
        return f"[{self.section}] {self.prefix}{name}"

    def close(self, name: str, actual: torch.Tensor | None, expected: torch.Tensor, tol: float = ATOL) -> None:
        name = self._key(name)
        if actual is None:
            self.results[name] = ("got None", tol)
        elif actual.shape != expected.shape:
            self.results[name] = (f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}", tol)
        else:
            diff = (actual.detach().double() - expected.detach().double()).abs()
            self.results[name] = (diff.max().item() if diff.numel() else 0.0, tol)

    def true(self, name: str, ok: bool) -> None:
        self.results[self._key(name)] = (0.0 if ok else "false", EXACT)

    def run(self, section: str, fn, *args) -> None:
        """Run one group of checks; an exception becomes a failed check instead of ending the rank.

        The same code runs on every rank, so an exception (a shape error, say) is raised on all of them alike
        and the collectives that follow stay matched.
        """
        self.section = section
        try:
            fn(self, *args)
        except Exception:
            self.results[self._key("raised")] = (traceback.format_exc(), EXACT)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _chunk(t: torch.Tensor, state: ParallelState, dim: int) -> torch.Tensor:
    return t.chunk(state.tp_size, dim=dim)[state.tp_rank]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _linear_pair(cls, in_f, out_f, state, seed, **kw):
    """(reference nn.Linear, parallel layer), both initialised from `seed`."""
    torch.manual_seed(seed)
    ref = nn.Linear(in_f, out_f, bias=True)
    torch.manual_seed(seed)
    par = cls(in_f, out_f, state=state, bias=True, **kw)
    return ref, par


# ---------------------------------------------------------------------------------------------- layers


def _check_column(c: _Checker, state: ParallelState, gather_output: bool) -> None:
    tag = f"column(gather={gather_output})"
    ref, par = _linear_pair(ColumnParallelLinear, H, OUT, state, SEED, gather_output=gather_output)
    c.close(f"{tag} weight shard", par.weight, _chunk(ref.weight, state, 0), EXACT)
    c.close(f"{tag} bias shard", par.bias, _chunk(ref.bias, state, 0), EXACT)
    c.true(f"{tag} tp_split_dim", par.weight.tp_split_dim == 0 and par.bias.tp_split_dim == 0)

    x, dy = _randn(B, T, H, seed=1), _randn(B, T, OUT, seed=2)
    x_ref, x_par = _leaf(x), _leaf(x)
    y_ref = ref(x_ref)
    y_ref.backward(dy)
    y = par(x_par)
    if gather_output:
        c.close(f"{tag} output", y, y_ref)
        y.backward(dy.clone())
    else:
        c.close(f"{tag} local output", y, _chunk(y_ref, state, -1))
        y.backward(_chunk(dy, state, -1).clone())
    c.close(f"{tag} input grad", x_par.grad, x_ref.grad)
    c.close(f"{tag} weight grad shard", par.weight.grad, _chunk(ref.weight.grad, state, 0))
    c.close(f"{tag} bias grad shard", par.bias.grad, _chunk(ref.bias.grad, state, 0))


def _check_row(c: _Checker, state: ParallelState) -> None:
    ref, par = _linear_pair(RowParallelLinear, H, OUT, state, SEED + 1)
    c.close("row weight shard", par.weight, _chunk(ref.weight, state, 1), EXACT)
    c.close("row bias (replicated)", par.bias, ref.bias, EXACT)
    c.true("row tp_split_dim", par.weight.tp_split_dim == 1 and par.bias.tp_split_dim is None)

    x, dy = _randn(B, T, H, seed=3), _randn(B, T, OUT, seed=4)
    x_ref = _leaf(x)
    y_ref = ref(x_ref)
    y_ref.backward(dy)
    x_local = _leaf(_chunk(x, state, -1))  # the input arrives already split along features
    y = par(x_local)
    y.backward(dy.clone())
    c.close("row output", y, y_ref)
    c.close("row input grad chunk", x_local.grad, _chunk(x_ref.grad, state, -1))
    c.close("row weight grad shard", par.weight.grad, _chunk(ref.weight.grad, state, 1))
    c.close("row bias grad", par.bias.grad, ref.bias.grad)


def _mlp_pairs(state: ParallelState):
    up_ref, up = _linear_pair(ColumnParallelLinear, H, FFN, state, SEED + 2)
    down_ref, down = _linear_pair(RowParallelLinear, FFN, H, state, SEED + 3)
    return up_ref, up, down_ref, down


def _mlp(up, down, x):
    return down(F.silu(up(x)))  # elementwise between the two: works on column-split features


def _check_mlp(c: _Checker, state: ParallelState) -> None:
    up_ref, up, down_ref, down = _mlp_pairs(state)
    x, dy = _randn(B, T, H, seed=5), _randn(B, T, H, seed=6)
    x_ref, x_par = _leaf(x), _leaf(x)
    _mlp(up_ref, down_ref, x_ref).backward(dy)
    y = _mlp(up, down, x_par)
    y.backward(dy.clone())
    c.close("mlp output", y, _mlp(up_ref, down_ref, x))
    c.close("mlp input grad", x_par.grad, x_ref.grad)
    c.close("mlp up weight grad shard", up.weight.grad, _chunk(up_ref.weight.grad, state, 0))
    c.close("mlp up bias grad shard", up.bias.grad, _chunk(up_ref.bias.grad, state, 0))
    c.close("mlp down weight grad shard", down.weight.grad, _chunk(down_ref.weight.grad, state, 1))
    c.close("mlp down bias grad", down.bias.grad, down_ref.bias.grad)


def _embedding_pair(state: ParallelState):
    torch.manual_seed(SEED + 4)
    ref = nn.Embedding(V, H)
    torch.manual_seed(SEED + 4)
    par = VocabParallelEmbedding(V, H, state=state)
    return ref, par


def _ids(state: ParallelState) -> torch.Tensor:
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(7))
    per_rank = V // state.tp_size
    # the first and last id of every rank's range, and a repeated id whose gradient accumulates
    edges = [r * per_rank for r in range(state.tp_size)] + [(r + 1) * per_rank - 1 for r in range(state.tp_size)]
    flat = ids.view(-1)
    flat[: len(edges)] = torch.tensor(edges)
    flat[-1] = flat[-2] = per_rank  # first id of rank 1
    return ids


def _check_embedding(c: _Checker, state: ParallelState) -> None:
    ref, par = _embedding_pair(state)
    c.close("embedding weight shard", par.weight, _chunk(ref.weight, state, 0), EXACT)
    c.true("embedding tp_split_dim", par.weight.tp_split_dim == 0)
    ids, dy = _ids(state), _randn(B, T, H, seed=8)
    y_ref = ref(ids)
    y_ref.backward(dy)
    y = par(ids)
    y.backward(dy.clone())
    c.close("embedding output", y, y_ref)
    c.close("embedding weight grad shard", par.weight.grad, _chunk(ref.weight.grad, state, 0))


def _targets(state: ParallelState) -> torch.Tensor:
    target = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(9))
    per_rank = V // state.tp_size
    flat = target.view(-1)
    for r in range(state.tp_size):  # at least two targets in every rank's range, at its edges
        flat[2 * r], flat[2 * r + 1] = r * per_rank, (r + 1) * per_rank - 1
    flat[-3:] = -100
    return target


def _check_cross_entropy(c: _Checker, state: ParallelState, scale: float) -> None:
    tag = f"cross-entropy(scale={scale})"
    logits, target = _randn(B, T, V, seed=10) * scale, _targets(state)
    ref_in = _leaf(logits)
    ref = F.cross_entropy(ref_in.view(-1, V), target.view(-1), ignore_index=-100)
    ref.backward()
    shard = _leaf(_chunk(logits, state, -1))  # (B, T, V/tp)
    loss = vocab_parallel_cross_entropy(shard, target, state.tp_group)
    loss.backward()
    c.close(f"{tag} loss", loss, ref)
    c.close(f"{tag} logits grad shard", shard.grad, _chunk(ref_in.grad, state, -1))
    c.true(f"{tag} ignored rows have zero grad", bool((shard.grad.view(-1, shard.shape[-1])[-3:] == 0).all()))


def _check_head_cross_entropy(c: _Checker, state: ParallelState) -> None:
    """VocabParallelHead(x, targets): the head's matmul fused with the loss, against F.linear + F.cross_entropy."""
    tag = f"fused head{' (sp)' if state.sequence_parallel else ''}"
    x, weight, target = _randn(B, T, H, seed=11) * 3, _randn(V, H, seed=12), _targets(state)
    x_ref, w_ref = _leaf(x), _leaf(weight)
    ref = F.cross_entropy(F.linear(x_ref, w_ref).view(-1, V), target.view(-1), ignore_index=-100)
    ref.backward()
    head = VocabParallelHead(H, V, state=state)
    with torch.no_grad():
        head.weight.copy_(_chunk(weight, state, 0))
    # under sequence parallelism each rank holds its T/tp positions (and predicts their targets)
    x_ours = _leaf(_chunk(x, state, 1) if state.sequence_parallel else x)
    loss = head(x_ours, target)
    loss.backward()
    c.close(f"{tag} loss", loss, ref)
    c.close(f"{tag} input grad", x_ours.grad, _chunk(x_ref.grad, state, 1) if state.sequence_parallel else x_ref.grad)
    c.close(f"{tag} weight grad shard", head.weight.grad, _chunk(w_ref.grad, state, 0))


# -------------------------------------------------------------------------------------- sequence parallel


def _check_sp_mlp(c: _Checker, sp: ParallelState) -> None:
    up_ref, up, down_ref, down = _mlp_pairs(sp)
    x, dy = _randn(B, T, H, seed=11), _randn(B, T, H, seed=12)
    x_ref = _leaf(x)
    y_ref = _mlp(up_ref, down_ref, x_ref)
    y_ref.backward(dy)
    x_sp = _leaf(_chunk(x, sp, 1))  # (B, T/tp, H)
    y = _mlp(up, down, x_sp)
    y.backward(_chunk(dy, sp, 1).clone())
    c.close("sp mlp output chunk", y, _chunk(y_ref, sp, 1))
    c.close("sp mlp input grad chunk", x_sp.grad, _chunk(x_ref.grad, sp, 1))
    c.close("sp mlp up weight grad shard", up.weight.grad, _chunk(up_ref.weight.grad, sp, 0))
    c.close("sp mlp up bias grad shard", up.bias.grad, _chunk(up_ref.bias.grad, sp, 0))
    c.close("sp mlp down weight grad shard", down.weight.grad, _chunk(down_ref.weight.grad, sp, 1))
    c.close("sp mlp down bias grad", down.bias.grad, down_ref.bias.grad)


def _check_sp_matches_non_sp(c: _Checker, sp: ParallelState, state: ParallelState) -> None:
    """The SP MLP on a sequence chunk equals the chunk of the non-SP parallel MLP, input grads too."""
    x, dy = _randn(B, T, H, seed=13), _randn(B, T, H, seed=14)
    _, up, _, down = _mlp_pairs(state)
    x_full = _leaf(x)
    y_full = _mlp(up, down, x_full)
    y_full.backward(dy.clone())
    _, up_sp, _, down_sp = _mlp_pairs(sp)
    x_sp = _leaf(_chunk(x, sp, 1))
    y_sp = _mlp(up_sp, down_sp, x_sp)
    y_sp.backward(_chunk(dy, sp, 1).clone())
    c.close("sp vs non-sp output", y_sp, _chunk(y_full, sp, 1))
    c.close("sp vs non-sp input grad", x_sp.grad, _chunk(x_full.grad, sp, 1))
    c.close("sp vs non-sp down bias grad", down_sp.bias.grad, down.bias.grad)


def _check_sp_row(c: _Checker, sp: ParallelState) -> None:
    """Under SP a row linear takes (B, T, in/tp) and returns the summed (B, T/tp, out) with the bias added once."""
    ref, par = _linear_pair(RowParallelLinear, H, OUT, sp, SEED + 5)
    x, dy = _randn(B, T, H, seed=15), _randn(B, T, OUT, seed=16)
    x_ref = _leaf(x)
    y_ref = ref(x_ref)
    y_ref.backward(dy)
    x_local = _leaf(_chunk(x, sp, -1))
    y = par(x_local)
    y.backward(_chunk(dy, sp, 1).clone())
    c.close("sp row output chunk", y, _chunk(y_ref, sp, 1))
    c.close("sp row input grad chunk", x_local.grad, _chunk(x_ref.grad, sp, -1))
    c.close("sp row weight grad shard", par.weight.grad, _chunk(ref.weight.grad, sp, 1))
    c.close("sp row bias grad (all-reduced)", par.bias.grad, ref.bias.grad)


def _check_sp_embedding(c: _Checker, sp: ParallelState) -> None:
    ref, par = _embedding_pair(sp)
    ids, dy = _ids(sp), _randn(B, T, H, seed=17)
    y_ref = ref(ids)
    y_ref.backward(dy)
    y = par(ids)
    y.backward(_chunk(dy, sp, 1).clone())
    c.close("sp embedding output chunk", y, _chunk(y_ref, sp, 1))
    c.close("sp embedding weight grad shard", par.weight.grad, _chunk(ref.weight.grad, sp, 0))


# -------------------------------------------------------------------------------------------- mappings


def _per_rank(shape, seed, n):
    """One tensor per rank, the same list on every rank: rank r uses element r."""
    return [_randn(*shape, seed=seed + k) for k in range(n)]


def _check_mappings(c: _Checker, state: ParallelState) -> None:
    group, n, r = state.tp_group, state.tp_size, state.tp_rank
    full = (B, T, H)
    xs, gs = _per_rank(full, 100, n), _per_rank(full, 200, n)
    total_x, total_g = sum(xs), sum(gs)

    x = _leaf(xs[r])
    y = mappings.copy_to_region(x, group)
    y.backward(gs[r].clone())
    c.close("copy fwd identity", y, xs[r], EXACT)
    c.close("copy bwd all-reduce", x.grad, total_g)

    x = _leaf(xs[r])
    y = mappings.reduce_from_region(x, group)
    y.backward(gs[r].clone())
    c.close("reduce fwd all-reduce", y, total_x)
    c.close("reduce bwd identity", x.grad, gs[r], EXACT)
    c.close("reduce leaves its input alone", x, xs[r], EXACT)

    for dim in (-1, 1):
        x = _leaf(xs[0])  # replicated input
        y = mappings.split_to_region(x, group, dim)
        local_g = [g.chunk(n, dim)[0] for g in gs]  # a different chunk-shaped upstream grad on every rank
        y.backward(local_g[r].clone())
        c.close(f"split(dim={dim}) fwd", y, xs[0].chunk(n, dim)[r], EXACT)
        c.close(f"split(dim={dim}) bwd all-gather", x.grad, torch.cat(local_g, dim), EXACT)

        chunks = [t.chunk(n, dim)[0] for t in xs]  # rank k holds chunks[k]
        x = _leaf(chunks[r])
        y = mappings.gather_from_region(x, group, dim)
        y.backward(gs[r].clone())
        c.close(f"gather(dim={dim}) fwd", y, torch.cat(chunks, dim), EXACT)
        c.close(f"gather(dim={dim}) bwd split", x.grad, gs[r].chunk(n, dim)[r], EXACT)

        x = _leaf(xs[r])
        y = mappings.reduce_scatter_to_region(x, group, dim)
        y.backward(local_g[r].clone())
        c.close(f"reduce_scatter(dim={dim}) fwd", y, total_x.chunk(n, dim)[r])
        c.close(f"reduce_scatter(dim={dim}) bwd all-gather", x.grad, torch.cat(local_g, dim), EXACT)

        x = _leaf(chunks[r])
        y = mappings.all_gather_from_region(x, group, dim)
        y.backward(gs[r].clone())
        c.close(f"all_gather(dim={dim}) fwd", y, torch.cat(chunks, dim), EXACT)
        c.close(f"all_gather(dim={dim}) bwd reduce-scatter", x.grad, total_g.chunk(n, dim)[r])

    # the sequence-parallel round trip: reduce-scatter then all-gather is an all-reduce, both ways
    x = _leaf(xs[r])
    y = mappings.all_gather_from_region(mappings.reduce_scatter_to_region(x, group), group)
    y.backward(gs[r].clone())
    c.close("reduce_scatter->all_gather fwd = all-reduce", y, total_x)
    c.close("reduce_scatter->all_gather bwd = all-reduce", x.grad, total_g)

    # split then gather is the identity; its backward too
    x = _leaf(xs[0])
    y = mappings.gather_from_region(mappings.split_to_region(x, group, -1), group, -1)
    y.backward(gs[0].clone())
    c.close("split->gather fwd identity", y, xs[0], EXACT)
    c.close("split->gather bwd identity", x.grad, gs[0], EXACT)

    c.true("group_size", mappings.group_size(group) == n)
    c.true("group_rank", mappings.group_rank(group) == r)


def _check_copy_keeps_upstream_grad(c: _Checker, state: ParallelState) -> None:
    x = _leaf(_randn(B, T, H, seed=300))
    g = _randn(B, T, H, seed=301 + state.tp_rank)
    g_before = g.clone()
    mappings.copy_to_region(x, state.tp_group).backward(g)
    c.close("copy bwd leaves the caller's gradient tensor alone", g, g_before, EXACT)


def _check_errors(c: _Checker, state: ParallelState) -> None:
    for make in (
        lambda: ColumnParallelLinear(H, state.tp_size + 1, state=state),
        lambda: RowParallelLinear(state.tp_size + 1, H, state=state),
    ):  # an indivisible vocabulary is padded instead (tests/distributed/test_vocab_padding.py)
        try:
            make()
            c.true("indivisible size raises", False)
        except ValueError as e:
            c.true("indivisible size names parallel.tp", f"parallel.tp={state.tp_size}" in str(e))


# ------------------------------------------------------------------------------------------ the rank


def _all_checks(rank: int, world_size: int) -> dict[str, tuple[float | str, float]]:
    torch.set_num_threads(1)
    results = {}
    tps = [world_size] if world_size == 2 else [world_size, 2]
    for tp in tps:
        state = ParallelState.build(tp=tp)
        sp = ParallelState.build(tp=tp, sequence_parallel=True)
        c = _Checker(prefix=f"tp={tp} ")
        c.section = "state"
        c.true("state", state.tp_size == tp and not state.sequence_parallel and sp.sequence_parallel)
        c.true("tp_rank", state.tp_rank == rank % tp == dist.get_rank(state.tp_group))
        c.run("column", _check_column, state, True)
        c.run("column", _check_column, state, False)
        c.run("row", _check_row, state)
        c.run("mlp", _check_mlp, state)
        c.run("embedding", _check_embedding, state)
        c.run("cross-entropy", _check_cross_entropy, state, 3.0)
        c.run("cross-entropy", _check_cross_entropy, state, 20.0)  # large logits: the max must be global
        c.run("cross-entropy", _check_head_cross_entropy, state)
        c.run("cross-entropy", _check_head_cross_entropy, sp)
        c.run("sp", _check_sp_mlp, sp)
        c.run("sp", _check_sp_matches_non_sp, sp, state)
        c.run("sp", _check_sp_row, sp)
        c.run("sp", _check_sp_embedding, sp)
        c.run("mappings", _check_mappings, state)
        c.run("state", _check_errors, state)
        if tp == world_size:
            c.run("copy-upstream", _check_copy_keeps_upstream_grad, state)
        results.update(c.results)
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=lambda ws: f"ws{ws}")
def rank_results(request):
    return run_distributed(_all_checks, request.param, timeout=120)


def _assert_checks(rank_results, section: str) -> None:
    failures, seen = [], 0
    for rank, results in enumerate(rank_results):
        for name, (diff, tol) in results.items():
            if not name.startswith(f"[{section}] "):
                continue
            seen += 1
            if isinstance(diff, str) or not diff <= tol:
                failures.append(f"rank {rank}: {name}: {diff} (tol {tol})")
    assert seen, f"no checks in section {section!r}"
    assert not failures, "\n".join(failures)


def test_all_checks_belong_to_a_test(rank_results):
    sections = {"column", "row", "mlp", "embedding", "cross-entropy", "sp", "mappings", "state", "copy-upstream"}
    for results in rank_results:
        assert {name[1 : name.index("]")] for name in results} == sections


def test_column_parallel_linear(rank_results):
    _assert_checks(rank_results, "column")


def test_row_parallel_linear(rank_results):
    _assert_checks(rank_results, "row")


def test_column_then_row_mlp(rank_results):
    _assert_checks(rank_results, "mlp")


def test_vocab_parallel_embedding(rank_results):
    _assert_checks(rank_results, "embedding")


def test_vocab_parallel_cross_entropy(rank_results):
    _assert_checks(rank_results, "cross-entropy")


def test_sequence_parallel(rank_results):
    _assert_checks(rank_results, "sp")


def test_mappings(rank_results):
    _assert_checks(rank_results, "mappings")


def test_state_and_size_errors(rank_results):
    _assert_checks(rank_results, "state")


def test_copy_to_region_backward_leaves_callers_gradient_alone(rank_results):
    _assert_checks(rank_results, "copy-upstream")
