"""Count the collectives of one training step (forward + backward) of the whole model at tp=2, and of one MoE layer
at ep=2 (at the end of this file).

Inside each rank, `torch.distributed.{all_reduce, all_gather_single / all_gather_into_tensor, reduce_scatter_single
/ reduce_scatter_tensor, broadcast, all_to_all_single, ...}` are wrapped by recorders that log (phase, op, numel of
the full tensor, dtype, group size) and then call the original: `parallel.mappings` and `parallel.cross_entropy`
look the collectives up as `dist.<name>` at call time.

The expected lists are derived analytically, as in Megatron-LM (Shoeybi et al. 2019, sec. 3; Korthikanti et al.
2022, sec. 4.2.2), for L layers, activations of S = B*T*H elements and N = B*T tokens:

    without sequence parallelism
        forward   embedding all-reduce S; per layer 2 all-reduces S (o_proj, down_proj);
                  cross-entropy all-reduce MAX of N and SUM of 2N
        backward  lm_head input all-reduce S; per layer 2 all-reduces S (copy_to_region at the qkv input and at
                  the gate/up input): 4 all-reduces of S per layer per step
    with sequence parallelism, every all-reduce of S becomes a reduce-scatter + all-gather pair of S:
        forward   per layer 2 all-gathers + 2 reduce-scatters; embedding reduce-scatter, lm_head all-gather
        backward  per layer 2 reduce-scatters + 2 all-gathers; embedding all-gather, lm_head reduce-scatter
        plus backward all-reduces of H for the norm weights' gradients: 2 per layer + the final norm
    Under the ring model (all-reduce = reduce-scatter + all-gather) an all-reduce of S sends 2(n-1)/n S per rank
    and an all-gather or reduce-scatter (n-1)/n S, so sequence parallelism moves the same bytes.

    under bf16 autocast over fp32 weights (the trainer's path) the same collectives, the activations' in bf16 (the
    norms' and row-parallel outputs and their gradients) except the embedding's (it starts the fp32 residual
    stream); the cross-entropy statistics and the norm-weight gradients stay fp32
"""

from collections import Counter

import pytest
import torch
import torch.distributed as dist

from modeling.config import ModelConfig
from modeling.llama import LlamaForCausalLM
from modeling.moe import MoEMLP
from parallel.state import ParallelState
from tests.dist_utils import run_distributed

TP = 2
L = 2
B, T, H, V = 2, 32, 64, 256
S, N = B * T * H, B * T
DTYPE = torch.float32
ELEM = 4  # bytes of fp32
BYTES = {"float32": 4, "bfloat16": 2, "int64": 8}
CONFIG = {
    "vocab_size": V,
    "hidden_size": H,
    "intermediate_size": 128,
    "num_hidden_layers": L,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
# Every collective a layer could call; the gather/scatter pairs under both their torch>=2.13 names and the older
# ones. Patching `torch.distributed.<name>` intercepts calls from our code only: torch's own internals call each
# other through `distributed_c10d`, so nothing is counted twice.
GATHER = ("all_gather_single", "all_gather_into_tensor")
SCATTER = ("reduce_scatter_single", "reduce_scatter_tensor")
OTHERS = ("all_reduce", "broadcast", "all_to_all_single", "all_gather", "reduce_scatter", "all_to_all")
PATCHED = tuple(name for name in (*GATHER, *SCATTER, *OTHERS) if hasattr(dist, name))

# ---- recording, inside the ranks ----


class _Recorder:
    def __init__(self) -> None:
        self.phase = "idle"
        self.log: list[tuple[str, str, int, str, int]] = []  # (phase, op, full numel, dtype, group size)

    def wrap(self, name: str, original):
        def recorded(*args, **kwargs):
            n = dist.get_world_size(kwargs.get("group"))
            if name == "all_reduce":
                t = args[0]
                op = kwargs.get("op", args[1] if len(args) > 1 else dist.ReduceOp.SUM)
                label, full = ("all_reduce_max" if op == dist.ReduceOp.MAX else "all_reduce_sum"), t.numel()
            elif name in GATHER:
                t, label, full = args[0], "all_gather", args[0].numel()  # output: the gathered full tensor
            elif name in SCATTER:
                t, label, full = args[1], "reduce_scatter", args[1].numel()  # input: the full tensor
            else:  # not expected at all: record what there is
                t = args[0] if args else next(iter(kwargs.values()))
                t = t[0] if isinstance(t, list | tuple) else t
                label, full = name, t.numel()
            self.log.append((self.phase, label, full, str(t.dtype).removeprefix("torch."), n))
            return original(*args, **kwargs)

        return recorded


def _step(model: LlamaForCausalLM, rec: _Recorder, autocast: bool = False) -> list:
    """One forward (under bf16 autocast if asked, as the trainer's fp32-master path) and backward; its collectives."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :4] = -100
    rec.log.clear()
    rec.phase = "fwd"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, targets=targets).loss
    rec.phase = "bwd"
    loss.backward()
    rec.phase = "idle"
    return list(rec.log)


def _count(rank: int, world_size: int) -> dict[str, list]:
    rec = _Recorder()
    originals = {name: getattr(dist, name) for name in PATCHED}
    config = ModelConfig(**CONFIG)
    out = {}
    try:
        for name in PATCHED:
            setattr(dist, name, rec.wrap(name, originals[name]))
        for sp in (False, True):
            state = ParallelState.build(tp=world_size, sequence_parallel=sp)
            torch.manual_seed(0)
            model = LlamaForCausalLM(config, state)
            out["sp" if sp else "no_sp"] = _step(model, rec)
            out["sp_bf16" if sp else "no_sp_bf16"] = _step(model, rec, autocast=True)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return out


# ---- analytic expectations, in the parent ----

F32 = "float32"
BF16 = "bfloat16"


def _ar(numel: int, phase: str, op: str = "sum", dtype: str = F32) -> tuple:
    return (phase, f"all_reduce_{op}", numel, dtype, TP)


def _ag(phase: str, dtype: str = F32) -> tuple:
    return (phase, "all_gather", S, dtype, TP)


def _rs(phase: str, dtype: str = F32) -> tuple:
    return (phase, "reduce_scatter", S, dtype, TP)


def expected_no_sp(act: str = F32) -> list[tuple]:
    """Megatron-LM's step without sequence parallelism, in call order; `act`: the layers' activation dtype."""
    fwd = [_ar(S, "fwd")] + [_ar(S, "fwd", dtype=act)] * (2 * L) + [_ar(N, "fwd", "max"), _ar(2 * N, "fwd")]
    bwd = [_ar(S, "bwd", dtype=act)] + [_ar(S, "bwd", dtype=act)] * (2 * L)  # lm_head input, then the layers
    return fwd + bwd


def expected_sp(act: str = F32) -> Counter:
    """Megatron-LM's step with sequence parallelism, as a multiset (the backward order is the engine's)."""
    return Counter(
        [_rs("fwd")] + [_rs("fwd", act)] * (2 * L)  # embedding, then o_proj, down_proj
        + [_ag("fwd", act)] * (2 * L + 1)  # qkv input, gate/up input, lm_head input (the norms' outputs)
        + [_ar(N, "fwd", "max"), _ar(2 * N, "fwd")]
        + [_rs("bwd", act)] * (2 * L + 1)  # conjugates of the forward all-gathers
        + [_ag("bwd")] + [_ag("bwd", act)] * (2 * L)  # conjugates of the forward reduce-scatters
        + [_ar(H, "bwd")] * (2 * L + 1)  # norm weights' gradients
    )  # fmt: skip


def ring_bytes(entry: tuple) -> float:
    """Bytes one rank sends for a collective under the ring model."""
    _, op, numel, dtype, n = entry
    factor = 2 * (n - 1) / n if op.startswith("all_reduce") else (n - 1) / n
    return factor * numel * BYTES[dtype]


def full_bytes(entries) -> int:
    return sum(e[2] * BYTES[e[3]] for e in entries)


def _table(title: str, entries, expected) -> str:
    """Recorded collectives grouped, beside the analytic (Megatron-LM) count."""
    got, exp = Counter(entries), Counter(expected)
    head = f"  {'phase':5} {'op':24} {'numel':>7} {'dtype':8} {'n':>2} {'count':>5} {'megatron':>8} {'ring bytes':>10}"
    lines = [title, head]
    for e in sorted(set(got) | set(exp)):
        k = got[e]
        lines.append(f"  {e[0]:5} {e[1]:24} {e[2]:7d} {e[3]:8} {e[4]:2d} {k:5d} {exp[e]:8d} {k * ring_bytes(e):10.0f}")
    total, exp_total = sum(map(ring_bytes, entries)), sum(map(ring_bytes, expected))
    lines.append(f"  total: {len(entries)} collectives (megatron {len(expected)}), {total:.0f} ring bytes per rank")
    lines.append(f"         megatron: {exp_total:.0f} ring bytes per rank")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def logs():
    results = run_distributed(_count, TP)
    assert results[0] == results[1], "both tensor ranks must issue the same collectives"
    log = results[0]
    print()
    print(_table(f"tp={TP}, L={L}, B*T*H={S}: without sequence parallelism", log["no_sp"], expected_no_sp()))
    print(_table(f"tp={TP}, L={L}, B*T*H={S}: with sequence parallelism", log["sp"], list(expected_sp().elements())))
    sp_bf16 = list(expected_sp(BF16).elements())
    print(_table(f"tp={TP}, L={L}, B*T*H={S}: bf16 autocast, no sp", log["no_sp_bf16"], expected_no_sp(BF16)))
    print(_table(f"tp={TP}, L={L}, B*T*H={S}: bf16 autocast, sequence parallel", log["sp_bf16"], sp_bf16))
    return log


def _phase(entries, phase: str) -> list:
    return [e for e in entries if e[0] == phase]


def _activation(entries) -> list:
    """Collectives of whole activations (the norm-gradient and cross-entropy all-reduces left out)."""
    return [e for e in entries if e[2] == S]


def test_no_sp_forward_is_megatron(logs):
    assert _phase(logs["no_sp"], "fwd") == _phase(expected_no_sp(), "fwd")


def test_no_sp_backward_is_megatron(logs):
    assert _phase(logs["no_sp"], "bwd") == _phase(expected_no_sp(), "bwd")


def test_no_sp_step_list_and_bytes_are_megatron(logs):
    exp = expected_no_sp()
    assert logs["no_sp"] == exp
    assert full_bytes(logs["no_sp"]) == full_bytes(exp) == (4 * L + 2) * S * ELEM + 3 * N * ELEM
    # embedding (fwd) and lm_head input (bwd) aside: 4 all-reduces of B*T*H per layer per step
    assert len(_activation(logs["no_sp"])) == 4 * L + 2


def test_sp_has_no_activation_all_reduce(logs):
    assert not [e for e in logs["sp"] if e[1].startswith("all_reduce") and e[2] == S]


def test_sp_forward_reduce_scatters_and_backward_all_gathers(logs):
    got = Counter(logs["sp"])
    exp = expected_sp()
    for key in (_rs("fwd"), _ag("bwd")):
        assert got[key] == exp[key] == 2 * L + 1, key


def test_sp_forward_all_gathers_and_backward_reduce_scatters(logs):
    got = Counter(logs["sp"])
    for key in (_ag("fwd"), _rs("bwd")):
        assert got[key] == 2 * L + 1, f"{key}: {got[key]}"


def test_sp_step_is_megatron(logs):
    assert Counter(logs["sp"]) == expected_sp()


def test_sp_norm_gradient_all_reduces(logs):
    norm = [e for e in _phase(logs["sp"], "bwd") if e[1].startswith("all_reduce")]
    assert norm == [_ar(H, "bwd")] * (2 * L + 1)


def test_sp_cross_entropy_unchanged(logs):
    ce = [e for e in _phase(logs["sp"], "fwd") if e[1].startswith("all_reduce")]
    assert ce == [_ar(N, "fwd", "max"), _ar(2 * N, "fwd")]


def test_sp_moves_the_same_ring_bytes_as_all_reduce(logs):
    """reduce-scatter + all-gather = all-reduce: (n-1)/n S + (n-1)/n S = 2(n-1)/n S, pair for pair."""
    sp, no_sp = _activation(logs["sp"]), _activation(logs["no_sp"])
    assert sum(map(ring_bytes, sp)) == sum(map(ring_bytes, no_sp))
    assert len(sp) == 2 * len(no_sp)
    # the analytic (Megatron) counts agree too: (4L + 2) all-reduces vs (8L + 4) all-gathers / reduce-scatters
    exp_sp = [e for e in expected_sp().elements() if e[2] == S]
    exp_no_sp = [e for e in expected_no_sp() if e[2] == S]
    assert sum(map(ring_bytes, exp_sp)) == sum(map(ring_bytes, exp_no_sp)) == (4 * L + 2) * S * ELEM * 2 * (TP - 1) / TP


def test_nothing_else_is_communicated(logs):
    for key in ("sp", "no_sp"):
        assert {e[1] for e in logs[key]} <= {
            "all_reduce_sum",
            "all_reduce_max",
            "all_gather",
            "reduce_scatter",
        }
        assert {(e[3], e[4]) for e in logs[key]} == {(F32, TP)}
        assert {e[0] for e in logs[key]} == {"fwd", "bwd"}


def test_bf16_autocast_step_is_megatron_in_bf16_at_half_the_layers_bytes(logs):
    """Every activation collective but the embedding's moves bf16: half the bytes of the fp32 step's."""
    assert logs["no_sp_bf16"] == expected_no_sp(BF16)
    assert Counter(logs["sp_bf16"]) == expected_sp(BF16)
    ring = 2 * (TP - 1) / TP  # an all-reduce of S sends ring S elements per rank; a gather or scatter ring / 2
    embedding = ring * S  # no sp: its forward all-reduce; sp: its forward reduce-scatter and backward all-gather
    for key in ("no_sp", "sp"):
        fp32 = sum(map(ring_bytes, _activation(logs[key])))
        bf16 = sum(map(ring_bytes, _activation(logs[f"{key}_bf16"])))
        assert fp32 == (4 * L + 2) * ring * S * 4
        assert bf16 == embedding * 4 + ((4 * L + 2) * ring * S - embedding) * 2, key
    for key in ("no_sp_bf16", "sp_bf16"):  # the rest of the step is the fp32 step's
        rest = [e for e in logs[key] if e[2] != S]
        assert rest == [e for e in logs[key.removesuffix("_bf16")] if e[2] != S]


# ---- one MoE layer at ep=2 ----
#
# Each rank routes its own N tokens to k of E experts; ep rank j of an expert group (blocks of ep consecutive ranks
# at tp=1) holds experts [j E/ep, (j+1) E/ep). Per rank r, with a_r = its N k assignments, local_r = those to its own
# experts and recv_r = the assignments of its whole expert group to its experts (local_r included):
#
#     forward   all_to_all_single of the (E,) counts            in E, out E, E - E/ep elements to the other ranks
#               dispatch  all_to_all_single of token rows       in a_r H, out recv_r H, (a_r - local_r) H to others
#               combine   all_to_all_single back                in recv_r H, out a_r H, (recv_r - local_r) H to others
#     backward  the conjugates: combine's (as dispatch), then dispatch's (as combine)
#
# so each routed assignment's hidden vector crosses once each way per pass, except those to local experts, and no
# buffer holds more than the group's assignments to one rank: an all-gather of the tokens (ep N H per call) or an
# exchange over the whole world instead of the expert group would show.

MOE_E, MOE_K, MOE_EP = 4, 2, 2
MOE_N = B * T  # tokens per rank
MOE_CONFIG = {**CONFIG, "num_local_experts": MOE_E, "num_experts_per_tok": MOE_K}


class _MoERecorder:
    """Wraps the collectives; logs (phase, op, input numel, output numel, numel sent to other ranks, dtype, n)."""

    def __init__(self) -> None:
        self.phase = "idle"
        self.log: list[tuple] = []

    def wrap(self, name: str, original):
        def recorded(*args, **kwargs):
            group = kwargs.get("group")
            n = dist.get_world_size(group)
            if name == "all_to_all_single":
                out, x = args[0], args[1]
                splits = kwargs.get("input_split_sizes") or [x.shape[0] // n] * n
                row = x[0].numel() if x.dim() > 1 else 1
                sent = sum(s for r, s in enumerate(splits) if r != dist.get_rank(group)) * row
                self.log.append(
                    (self.phase, name, x.numel(), out.numel(), sent, str(x.dtype).removeprefix("torch."), n)
                )
            else:  # not expected: record what there is
                t = args[0] if args else next(iter(kwargs.values()))
                t = t[0] if isinstance(t, list | tuple) else t
                dtype = str(t.dtype).removeprefix("torch.")
                self.log.append((self.phase, name, t.numel(), t.numel(), t.numel(), dtype, n))
            return original(*args, **kwargs)

        return recorded


def _moe_count(rank: int, world_size: int, ep: int) -> dict:
    rec = _MoERecorder()
    originals = {name: getattr(dist, name) for name in PATCHED}
    state = ParallelState.build(ep=ep)
    torch.manual_seed(0)
    moe = MoEMLP(ModelConfig(**MOE_CONFIG), state, init_method=lambda w: torch.nn.init.normal_(w, 0.0, 0.02))
    g = torch.Generator().manual_seed(100 + rank)  # every rank its own tokens, so the routing differs
    x = torch.randn(B, T, H, generator=g).requires_grad_()
    dy = torch.randn(B, T, H, generator=g)
    logs = {}
    try:
        for name in PATCHED:
            setattr(dist, name, rec.wrap(name, originals[name]))
        for autocast in (False, True):  # fp32, then the trainer's bf16 autocast over fp32 weights and tokens
            rec.log = []
            rec.phase = "fwd"
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = moe(x)
            rec.phase = "bwd"
            y.backward(dy)
            rec.phase = "idle"
            logs[BF16 if autocast else F32] = rec.log
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    # the routing, recomputed in plain torch from the (replicated) router weight: top-k of softmax(x G^T)
    with torch.no_grad():
        scores = (x.reshape(-1, H) @ moe.gate.weight.T).softmax(-1)  # (N, E)
        chosen = torch.topk(scores, MOE_K, dim=-1).indices  # (N, k)
    return {"log": logs[F32], "log_bf16": logs[BF16], "chosen": chosen.tolist()}


def expected_moe(chosen: list[list[list[int]]], ep: int, dtype: str = F32) -> list[list[tuple]]:
    """Per rank, the collectives of one MoE forward + backward, from every rank's chosen experts (N, k).

    The token rows travel in `dtype`: the experts' compute dtype (bf16 under autocast), both ways and in backward.
    """
    per_expert = MOE_E // ep
    out = []
    for rank, mine in enumerate(chosen):
        block = range(rank - rank % ep, rank - rank % ep + ep)  # the expert group: ep consecutive ranks
        experts = range((rank % ep) * per_expert, (rank % ep + 1) * per_expert)  # this rank's experts
        assigned = MOE_N * MOE_K
        local = sum(e in experts for token in mine for e in token)
        recv = sum(e in experts for src in block for token in chosen[src] for e in token)
        dispatch = (assigned * H, recv * H, (assigned - local) * H, dtype, ep)
        combine = (recv * H, assigned * H, (recv - local) * H, dtype, ep)
        counts = ("fwd", "all_to_all_single", MOE_E, MOE_E, MOE_E - per_expert, "int64", ep)
        fwd, bwd = ("fwd", "all_to_all_single"), ("bwd", "all_to_all_single")
        out.append([counts, (*fwd, *dispatch), (*fwd, *combine), (*bwd, *dispatch), (*bwd, *combine)])
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def moe_logs(request):
    world = request.param
    results = run_distributed(_moe_count, world, MOE_EP)
    chosen = [r["chosen"] for r in results]
    logs = [r["log"] for r in results], [r["log_bf16"] for r in results]
    return logs[0], expected_moe(chosen, MOE_EP), chosen, logs[1]


def test_moe_ep2_collectives_are_all_to_all_of_the_analytic_volume(moe_logs):
    logs, expected, _, _ = moe_logs
    for rank, (got, exp) in enumerate(zip(logs, expected, strict=True)):
        assert got == exp, f"rank {rank}:\ngot      {got}\nexpected {exp}"
    # the routing splits the assignments between local and remote experts, so both terms are exercised
    to_others = [e[4] for log in logs for e in log if e[0] == "fwd" and e[5] == F32]
    assert all(0 < sent < MOE_N * MOE_K * H for sent in to_others), to_others


def test_moe_ep2_each_assignment_crosses_once_each_way(moe_logs):
    logs, _, chosen, _ = moe_logs
    per_expert = MOE_E // MOE_EP
    # over all ranks: the assignments whose expert lives on another rank of the group
    remote = sum(e // per_expert != rank % MOE_EP for rank, mine in enumerate(chosen) for tok in mine for e in tok)
    for phase in ("fwd", "bwd"):
        sent = sum(e[4] for log in logs for e in log if e[0] == phase and e[5] == F32)
        assert sent == 2 * remote * H, phase  # there (dispatch) and back (combine)


def test_moe_no_collective_grows_with_the_world(moe_logs):
    logs, _, _, _ = moe_logs
    for log in logs:
        assert {e[6] for e in log} == {MOE_EP}, "a collective outside the expert group"
        for _, op, n_in, n_out, _, dtype, _ in log:
            assert op == "all_to_all_single"
            if dtype == "int64":
                assert n_in == n_out == MOE_E  # the count exchange: E entries, whatever the world
            else:  # a rank sends its own assignments and receives at most what its group routes to it
                assert max(n_in, n_out) <= MOE_EP * MOE_N * MOE_K * H
                assert MOE_N * MOE_K * H in (n_in, n_out)  # this rank's own assignments, sent or returned


def test_moe_ep2_under_bf16_autocast_moves_bf16_rows(moe_logs):
    """The same exchanges as fp32 (same routing: the router runs in fp32), the token rows in bf16: half the bytes."""
    logs, _, chosen, logs_bf16 = moe_logs
    for rank, (got, exp) in enumerate(zip(logs_bf16, expected_moe(chosen, MOE_EP, BF16), strict=True)):
        assert got == exp, f"rank {rank}:\ngot      {got}\nexpected {exp}"
    for fp32, bf16 in zip(logs, logs_bf16, strict=True):
        rows = [(e, b) for e, b in zip(fp32, bf16, strict=True) if e[5] == F32]
        assert len(rows) == 4 and all(b[4] * BYTES[BF16] * 2 == e[4] * BYTES[F32] for e, b in rows)
