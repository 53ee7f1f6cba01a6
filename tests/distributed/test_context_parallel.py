"""Context-parallel attention on gloo: Ulysses and ring against plain SDPA on the whole sequence.

One spawn of 4 gloo processes (each spawn costs seconds) runs every case: cp=4 on the world group and cp=2 on the
two groups {0, 1} and {2, 3} (so the ring's peers are looked up through a group that is not the world). Every rank
builds the same full q, k, v and output gradient, computes the reference (torch SDPA over the full sequence with the
mask rule, written out here independently of parallel.context), takes its load-balanced part, runs
`context_attention` and its backward, and compares output, dq, dk and dv with its part of the reference's. The rank
returns `{check: (diff or error, tol)}` and the tests below read it.

The load-balancing case (T=32, cp=4, ring) also counts the blocks each rank computes (by wrapping
`parallel.context._block_forward`): the balanced layout gives every rank the same count, a contiguous layout
(rank r holding tokens [r T/cp, (r+1) T/cp)) gives the same numbers but very unequal counts.

A model with dynamic NTK RoPE at cp=4 gives one process's loss: every rank scales its frequencies by the whole
sequence's length, not by its own chunk's largest position (which differs between ranks).
"""

import traceback
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import parallel.context as context
from modeling.config import ModelConfig
from modeling.llama import LlamaForCausalLM
from parallel.context import context_attention, gather_sequence, sequence_index, shard_sequence
from parallel.state import ParallelConfigError, ParallelState
from tests.dist_utils import run_distributed

ATOL = 1e-5
BF16_TOL = 3e-2

# name -> (kinds, cps, shape (B, Hq, Hkv, T, hd), documents, window, dtype)
CASES = {
    "causal": (("ulysses", "ring"), (2, 4), (2, 4, 4, 16, 8), False, None, torch.float32),
    "documents": (("ulysses", "ring"), (2, 4), (2, 4, 4, 16, 8), True, None, torch.float32),
    "window": (("ulysses", "ring"), (2, 4), (1, 4, 4, 16, 8), False, 5, torch.float32),
    "documents+window": (("ulysses", "ring"), (2,), (2, 4, 2, 16, 8), True, 3, torch.float32),
    "gqa": (("ulysses", "ring"), (2, 4), (1, 4, 2, 16, 8), False, None, torch.float32),
    "mqa": (("ulysses", "ring"), (2,), (1, 4, 1, 16, 8), True, None, torch.float32),
    "balance": (("ring",), (4,), (1, 2, 1, 32, 8), False, None, torch.float32),
    "bf16": (("ulysses", "ring"), (2,), (1, 4, 2, 16, 8), True, 6, torch.bfloat16),
}


def _inputs(name: str):
    """The full-sequence q, k, v, output gradient and document ids of a case, the same on every rank."""
    _, _, (B, Hq, Hkv, T, hd), docs, _, dtype = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    q, dy = torch.randn(B, Hq, T, hd, generator=g), torch.randn(B, Hq, T, hd, generator=g)
    k, v = torch.randn(B, Hkv, T, hd, generator=g), torch.randn(B, Hkv, T, hd, generator=g)
    documents = None
    if docs:  # uneven documents, different per sequence: a boundary inside a chunk and one on a chunk edge
        cuts = torch.tensor([[3, 8, 11], [5, 6, 14]])[:B]  # (B, 3) first token of documents 1, 2, 3
        documents = (torch.arange(T)[None, :, None] >= cuts[:, None, :]).sum(-1)  # (B, T)
    q, k, v, dy = (t.to(dtype) for t in (q, k, v, dy))
    return q, k, v, dy, documents


def _reference(q, k, v, dy, documents, window):
    """Plain SDPA over the full sequence in fp32 with the mask rule; returns out, dq, dk, dv."""
    T = q.shape[2]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    mask = (j <= i)[None, None]  # (1, 1, T, T)
    if window is not None:
        mask = mask & (i - j < window)
    if documents is not None:
        mask = mask & (documents[:, None, :, None] == documents[:, None, None, :])  # (B, 1, T, T)
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    out.backward(dy.float())
    return out.detach(), q.grad, k.grad, v.grad


class _Checker:
    """Collects `name -> (relative max abs diff, tol)`; a shape mismatch or an exception is recorded as text."""

    def __init__(self):
        self.results: dict[str, tuple[float | str, float]] = {}

    def close(self, name: str, actual, expected: torch.Tensor, tol: float) -> None:
        if actual is None or actual.shape != expected.shape:
            got = None if actual is None else tuple(actual.shape)
            self.results[name] = (f"got {got}, expected {tuple(expected.shape)}", tol)
            return
        e = expected.detach().double()
        diff = (actual.detach().double() - e).abs().max() / e.abs().max().clamp(min=1.0)
        self.results[name] = (float(diff), tol)

    def true(self, name: str, ok: bool, detail: str = "false") -> None:
        self.results[name] = (0.0 if ok else detail, 0.0)

    def run(self, name: str, fn, *args) -> None:
        """One group of checks; an exception (raised alike on every rank of the group) becomes a failed check."""
        try:
            fn(self, name, *args)
        except Exception:
            self.results[f"{name} raised"] = (traceback.format_exc(), 0.0)


def _contiguous_index(T: int, rank: int, cp: int) -> torch.Tensor:
    return torch.arange(rank * T // cp, (rank + 1) * T // cp)


def _check_case(c: _Checker, key: str, case: str, kind: str, group, layout: str = "balanced") -> int:
    _, _, _, docs, window, dtype = CASES[case]
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    q, k, v, dy, documents = _inputs(case)
    ref_out, ref_dq, ref_dk, ref_dv = _reference(q, k, v, dy, documents, window)
    T = q.shape[2]
    if layout == "balanced":
        index = sequence_index(T, rank, cp)
        part = lambda t: shard_sequence(t, rank, cp, dim=2)  # noqa: E731
    else:
        index = _contiguous_index(T, rank, cp)
        part = lambda t: t.index_select(2, index)  # noqa: E731
    local_docs = None if documents is None else documents.index_select(1, index)
    ql, kl, vl = (part(t).detach().clone().requires_grad_() for t in (q, k, v))
    calls = []
    block_forward = context._block_forward

    def counting(*args):
        calls.append(1)
        return block_forward(*args)

    context._block_forward = counting
    try:
        out = context_attention(ql, kl, vl, kind=kind, group=group, index=index, document_ids=local_docs, window=window)
    finally:
        context._block_forward = block_forward
    out.backward(part(dy))
    tol = ATOL if dtype == torch.float32 else BF16_TOL
    c.true(f"{key} output dtype", out.dtype == dtype, f"got {out.dtype}")
    c.close(f"{key} output", out, part(ref_out), tol)
    c.close(f"{key} dq", ql.grad, part(ref_dq), tol)
    c.close(f"{key} dk", kl.grad, part(ref_dk), tol)
    c.close(f"{key} dv", vl.grad, part(ref_dv), tol)
    if layout == "balanced":
        c.close(f"{key} gather_sequence", gather_sequence(out.detach(), group, dim=2), ref_out, tol)
    return len(calls)


def _check_balance(c: _Checker, key: str, group) -> None:
    """Balanced: every rank computes the same number of blocks; contiguous: right too, but unequal counts."""
    counts = {}
    for layout in ("balanced", "contiguous"):
        n = _check_case(c, f"{key} {layout}", "balance", "ring", group, layout)
        every = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, n, group=group)
        counts[layout] = every
    cp = dist.get_world_size(group)
    c.true(f"{key} balanced: 3 + 2 (cp-1) blocks per rank", counts["balanced"] == [3 + 2 * (cp - 1)] * cp,
           f"block counts per rank {counts['balanced']}")  # fmt: skip
    c.true(f"{key} contiguous: unequal", len(set(counts["contiguous"])) > 1, f"counts {counts['contiguous']}")


def _check_host_reads(c: _Checker, key: str, group) -> None:
    """The ring reads the device once in its forward (which tile pairs have a visible key), with its first hop already
    started, and never in its backward."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    q, k, v, dy, documents = _inputs("documents+window")
    index = sequence_index(q.shape[2], rank, cp)
    ql, kl, vl = (shard_sequence(t, rank, cp, dim=2).detach().clone().requires_grad_() for t in (q, k, v))
    reads, real = [], {name: getattr(torch.Tensor, name) for name in ("__bool__", "tolist", "item")}
    for name, fn in real.items():  # on a GPU each of these waits for the device
        setattr(torch.Tensor, name, lambda t, *a, _name=name, _fn=fn: reads.append(_name) or _fn(t, *a))
    exchange = context._start_exchange
    context._start_exchange = lambda *a: reads.append("hop") or exchange(*a)
    try:
        out = context_attention(
            ql, kl, vl, kind="ring", group=group, index=index, document_ids=documents.index_select(1, index), window=3
        )
        forward = list(reads)
        out.backward(shard_sequence(dy, rank, cp, dim=2))
    finally:
        for name, fn in real.items():
            setattr(torch.Tensor, name, fn)
        context._start_exchange = exchange
    # the first hop is in flight while the host waits for the plan
    c.true(f"{key} forward: one read, after the first hop starts", forward == ["hop", "tolist"], f"forward {forward}")
    backward = [r for r in reads[len(forward) :] if r != "hop"]
    c.true(f"{key} backward: none", not backward, f"backward read {backward}")


def _check_errors(c: _Checker, key: str, group) -> None:
    q, k = torch.zeros(1, 3, 4, 8), torch.zeros(1, 1, 4, 8)  # 3 query heads cannot be split over cp = 2
    try:
        context_attention(q, k, k, kind="ulysses", group=group, index=torch.arange(4))
        c.true(f"{key} ulysses with heads not divisible by cp raises", False)
    except ParallelConfigError as e:
        c.true(f"{key} the error names heads and cp", "3 query heads" in str(e) and "cp=2" in str(e), str(e))


def _check_dynamic_rope(c: _Checker, key: str) -> None:
    """A model with dynamic NTK RoPE at cp=4: each rank scales by the whole sequence's length, as one process does."""
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=8,  # shorter than T = 16: scaled
        rope_scaling={"rope_type": "dynamic", "factor": 4.0},
        rope_theta=100.0,  # with large weights, so that the positions move the loss (0.2 against 7e-6 at the defaults)
        initializer_range=0.3,
    )
    g = torch.Generator().manual_seed(7)
    ids, targets = torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(cfg)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg, ParallelState.build(cp=4, cp_attention="ring"))
    want = reference(ids, targets=targets).ce_loss
    c.close(f"{key} loss", model(ids, targets=targets).ce_loss, want, ATOL)
    unscaled = LlamaForCausalLM(replace(cfg, rope_scaling=None))
    unscaled.load_state_dict(reference.state_dict())
    moved = float((unscaled(ids, targets=targets).ce_loss - want).abs())
    c.true(f"{key} the scaling changes the loss", moved > 0.01, f"{moved}")


def _all_checks(rank: int, world_size: int) -> dict[str, tuple[float | str, float]]:
    torch.set_num_threads(1)
    world = dist.new_group(list(range(world_size)))
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in the same order
    groups = {4: world, 2: pairs[rank // 2]}
    c = _Checker()
    for case, (kinds, cps, *_) in CASES.items():
        for kind in kinds:
            for cp in cps:
                if case != "balance":
                    c.run(f"[{case}] {kind} cp={cp}", _check_case, case, kind, groups[cp])
    c.run("[balance] ring cp=4", _check_balance, world)
    tiles = context.BLOCK_TOKENS
    context.BLOCK_TOKENS = 3  # chunks of 4 (cp=2) or 2 (cp=4) tokens cut in tiles of 3 and 1, or kept
    try:
        c.run("[tiles] ring cp=2", _check_case, "documents+window", "ring", groups[2])
        c.run("[tiles] ring cp=4", _check_case, "causal", "ring", groups[4])
        c.run("[host reads] ring cp=2", _check_host_reads, groups[2])  # 4 tiles a rank: 16 tile pairs a hop
    finally:
        context.BLOCK_TOKENS = tiles
    c.run("[errors] cp=2", _check_errors, groups[2])
    c.run("[dynamic rope] cp=4", _check_dynamic_rope)
    return c.results


@pytest.fixture(scope="module")
def rank_results():
    return run_distributed(_all_checks, 4, timeout=180)


def _assert_checks(rank_results, prefix: str) -> None:
    failures, seen = [], 0
    for rank, results in enumerate(rank_results):
        for name, (diff, tol) in results.items():
            if not name.startswith(prefix):
                continue
            seen += 1
            if isinstance(diff, str) or not diff <= tol:
                failures.append(f"rank {rank}: {name}: {diff} (tol {tol})")
    assert seen, f"no check starts with {prefix!r}"
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case", [name for name in CASES if name not in ("balance", "bf16")])
@pytest.mark.parametrize("kind", ["ulysses", "ring"])
def test_context_attention_equals_full_sdpa(rank_results, case, kind):
    if kind not in CASES[case][0]:
        pytest.skip(f"{case} runs only {CASES[case][0]}")
    _assert_checks(rank_results, f"[{case}] {kind} ")


def test_ring_load_balanced_blocks_and_gradients(rank_results):
    _assert_checks(rank_results, "[balance] ")


def test_ring_in_tiles_smaller_than_its_chunks(rank_results):
    # long sequences: the ring's blocks are tiles of BLOCK_TOKENS, not whole chunk pairs (bounded working memory)
    _assert_checks(rank_results, "[tiles]")


def test_ring_reads_the_device_once_a_forward(rank_results):
    _assert_checks(rank_results, "[host reads]")


def test_bf16_inputs_close_to_fp32_reference(rank_results):
    _assert_checks(rank_results, "[bf16] ")


def test_ulysses_indivisible_heads_raise(rank_results):
    _assert_checks(rank_results, "[errors] ")


def test_dynamic_rope_scales_by_the_whole_sequence_on_every_rank(rank_results):
    _assert_checks(rank_results, "[dynamic rope] ")


# ------------------------------------------------------------------------------------------- one process


def test_sharding_round_trip_and_errors():
    T, cp = 16, 4
    idx = [sequence_index(T, r, cp) for r in range(cp)]
    assert idx[0].tolist() == [0, 1, 14, 15] and idx[3].tolist() == [6, 7, 8, 9]
    assert sorted(torch.cat(idx).tolist()) == list(range(T))
    x = torch.arange(2 * T).view(2, T)
    assert all(torch.equal(shard_sequence(x, r, cp), x[:, idx[r]]) for r in range(cp))
    with pytest.raises(ValueError, match=r"seq_len=12 .*cp=4"):
        sequence_index(12, 0, 4)
    with pytest.raises(ValueError, match="seq_len=12"):
        shard_sequence(torch.zeros(1, 12), 0, 4)


@pytest.mark.parametrize("kind", ["ulysses", "ring"])
def test_group_of_one_is_sdpa_with_the_mask_rule(kind):
    q, k, v, dy, documents = _inputs("documents+window")
    ref_out, ref_dq, _, _ = _reference(q, k, v, dy, documents, 3)
    q = q.clone().requires_grad_()
    out = context_attention(
        q, k, v, kind=kind, group=None, index=torch.arange(q.shape[2]), document_ids=documents, window=3
    )
    out.backward(dy)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(q.grad, ref_dq, atol=ATOL, rtol=0)
