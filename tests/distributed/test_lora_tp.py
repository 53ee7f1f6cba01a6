"""LoRA at tp=2 and tp=4 on gloo against the tp=1 LoRA model built from the same full weights.

Every rank builds the tp=1 reference (`LlamaForCausalLM(config)` + `apply_lora`) and the tensor-parallel model after
the same seeds: adapters are drawn full and sliced, so each adapter shard must be *exactly* the matching slice of the
reference's (`tp_split_dim` None = replicated). B is then set to the same random values in both (B = 0 would leave
A's gradient zero). Loss, logits and every adapter gradient must agree (fp32, 1e-5 relative to each tensor's largest
entry), base parameters must get no gradient. Variants: GQA, sequence parallelism, dropout in training mode (masks
are drawn for the full input, so with the same seed tp=N drops what tp=1 drops), activation checkpointing.

Files: an adapter saved at tp=N reads back as the reference's full adapter, bit for bit; one saved at tp=1 loads
into the tp=N model with the reference's logits. Communication (tp=2, no sequence parallelism, collectives recorded
by wrapping `torch.distributed`): LoRA adds no forward collective, and in backward one all-reduce of r*H per adapter
(the replicated factor's gradient).

One spawn per world size runs every check and returns `{check: (error or text, tolerance)}`.
"""

import traceback
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from modeling.config import ModelConfig
from modeling.llama import LlamaForCausalLM
from modeling.lora_files import load_adapter, load_adapter_full, save_adapter
from parallel.lora import apply_lora, lora_split_dims, lora_state_dict
from parallel.state import ParallelState
from tests.dist_utils import run_distributed

TOL = 1e-5
EXACT = 0.0
SEED = 1234
B, T = 2, 16
R, ALPHA = 8, 16
BASE = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
}
H, L = BASE["hidden_size"], BASE["num_hidden_layers"]


@dataclass(frozen=True)
class Case:
    """One LoRA model variant compared against the tp=1 reference."""

    tp: int
    kv_heads: int
    sp: bool = False
    dropout: float = 0.0
    act_ckpt: bool = False

    @property
    def name(self) -> str:
        flags = [f for f, on in (("sp", self.sp), (f"drop{self.dropout}", self.dropout), ("ckpt", self.act_ckpt)) if on]
        return f"tp{self.tp}-kv{self.kv_heads}" + "".join(f"-{f}" for f in flags)


CASES = [
    Case(2, 2),  # GQA: k/v adapters' B split over 2 ranks, one kv head each
    Case(2, 2, sp=True, dropout=0.1),
    Case(2, 4, dropout=0.1, act_ckpt=True),  # recomputation must redraw the same dropout masks
    Case(4, 4),
    Case(4, 4, sp=True, dropout=0.1),
]


class _Checker:
    """Collects `name -> (error, tol)`; error = max |a - e| / max |e| (absolute when e is zero)."""

    def __init__(self) -> None:
        self.results: dict[str, tuple[float | str, float]] = {}
        self.section = ""

    def close(self, name: str, actual: torch.Tensor | None, expected: torch.Tensor, tol: float = TOL) -> None:
        key = f"[{self.section}] {name}"
        if actual is None:
            self.results[key] = ("got None", tol)
        elif actual.shape != expected.shape:
            self.results[key] = (f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}", tol)
        else:
            a, e = actual.detach().double(), expected.detach().double()
            scale = e.abs().max().item() or 1.0
            self.results[key] = ((a - e).abs().max().item() / scale, tol)

    def true(self, name: str, ok: bool, detail: str = "false") -> None:
        self.results[f"[{self.section}] {name}"] = (0.0 if ok else detail, EXACT)

    def run(self, section: str, fn, *args) -> None:
        """Run one group of checks; an exception (raised alike on every rank) becomes a failed check."""
        self.section = section
        try:
            fn(self, *args)
        except Exception:
            self.results[f"[{section}] raised"] = (traceback.format_exc(), EXACT)


def _shard(t: torch.Tensor, dim: int | None, state: ParallelState) -> torch.Tensor:
    return t if dim is None else t.chunk(state.tp_size, dim=dim)[state.tp_rank]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    ids = torch.randint(0, BASE["vocab_size"], (B, T), generator=g)
    targets = torch.randint(0, BASE["vocab_size"], (B, T), generator=g)
    targets[1, 3:7] = -100
    return ids, targets


def _lora_model(config: ModelConfig, state: ParallelState, dropout: float = 0.0) -> LlamaForCausalLM:
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config, state)
    torch.manual_seed(SEED + 1)
    return apply_lora(model, r=R, alpha=ALPHA, dropout=dropout)


def _set_b(ref: LlamaForCausalLM, model: LlamaForCausalLM | None) -> None:
    """The same random B in the reference (full) and the tp model (its slices)."""
    g = torch.Generator().manual_seed(SEED + 2)
    ref_sd = lora_state_dict(ref)
    sd, dims = (lora_state_dict(model), lora_split_dims(model)) if model is not None else ({}, {})
    with torch.no_grad():
        for name, full in ref_sd.items():
            if name.endswith("lora_B.weight"):
                full.copy_(0.1 * torch.randn(full.shape, generator=g))
                if model is not None:
                    sd[name].copy_(_shard(full, dims[name], model.state))


def _check_case(c: _Checker, case: Case, state: ParallelState) -> None:
    config = ModelConfig(**BASE, num_key_value_heads=case.kv_heads)
    ref = _lora_model(config, ParallelState(), case.dropout)
    model = _lora_model(config, state, case.dropout)
    ref.activation_checkpointing = model.activation_checkpointing = case.act_ckpt

    ref_sd, sd, dims = lora_state_dict(ref), lora_state_dict(model), lora_split_dims(model)
    c.true("adapter names", sorted(ref_sd) == sorted(sd) and len(sd) == 7 * 2 * L, f"{sorted(sd)}")
    for name, t in sd.items():
        c.close(f"init shard {name}", t, _shard(ref_sd[name], dims[name], state), EXACT)
    _set_b(ref, model)

    ids, targets = _batch()
    ref.train(), model.train()
    torch.manual_seed(SEED + 3)  # same dropout masks
    ref_loss = ref(ids, targets=targets).loss
    ref_loss.backward()
    torch.manual_seed(SEED + 3)
    loss = model(ids, targets=targets).loss
    loss.backward()
    c.close("loss", loss, ref_loss)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if name in sd:
            c.true(f"grad nonzero {name}", p.grad is not None and bool(p.grad.abs().max() > 0))
            c.close(f"grad {name}", p.grad, _shard(ref_params[name].grad, dims[name], state))
        else:
            c.true(f"frozen, no grad {name}", not p.requires_grad and p.grad is None)

    ref.eval(), model.eval()
    with torch.no_grad():
        c.close("full logits (eval)", model(ids).logits, ref(ids).logits)


def _check_files(c: _Checker, state: ParallelState, dirs: dict[str, str]) -> None:
    config = ModelConfig(**BASE, num_key_value_heads=state.tp_size)
    ref, model = _lora_model(config, ParallelState()), _lora_model(config, state)
    _set_b(ref, model)
    if dist.get_rank() == 0:
        save_adapter(ref, dirs["tp1"])  # every rank holds a tp=1 reference: one writes it
    save_adapter(model, dirs["tpN"])
    dist.barrier()

    lora_config, full = load_adapter_full(dirs["tpN"])
    ref_sd = lora_state_dict(ref)
    c.true("config", lora_config == ref.lora_config, f"{lora_config} != {ref.lora_config}")
    c.true("names", sorted(full) == sorted(ref_sd))
    for name, t in ref_sd.items():
        c.close(f"saved at tp={state.tp_size}, merged {name}", full[name], t, EXACT)

    torch.manual_seed(SEED)
    fresh = load_adapter(LlamaForCausalLM(config, state), dirs["tp1"])
    dims = lora_split_dims(fresh)
    for name, t in lora_state_dict(fresh).items():
        c.close(f"tp=1 file, loaded shard {name}", t, _shard(ref_sd[name], dims[name], state), EXACT)
    ids, _ = _batch()
    with torch.no_grad():
        c.close("tp=1 file, logits at tp", fresh.eval()(ids).logits, ref.eval()(ids).logits)


# ---- communication ----


def _record_step(model: LlamaForCausalLM) -> list[tuple[str, str, int]]:
    """(phase, collective, numel) of one forward + backward; `parallel.mappings` calls `dist.<name>` at call time."""
    log, phase = [], ["fwd"]
    names = [n for n in ("all_reduce", "all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
                         "reduce_scatter_tensor") if hasattr(dist, n)]  # fmt: skip
    originals = {n: getattr(dist, n) for n in names}

    def wrap(name, fn):
        def recorded(*args, **kwargs):
            log.append((phase[0], name, args[0].numel()))
            return fn(*args, **kwargs)

        return recorded

    ids, targets = _batch()
    try:
        for n in names:
            setattr(dist, n, wrap(n, originals[n]))
        loss = model(ids, targets=targets).loss
        phase[0] = "bwd"
        loss.backward()
    finally:
        for n, fn in originals.items():
            setattr(dist, n, fn)
    return log


def _check_collectives(c: _Checker, state: ParallelState) -> None:
    """LoRA adds no forward collective; in backward one all-reduce of r*H per adapter (its replicated factor).

    The frozen embedding needs no input gradient, so layer 0's q/k/v input all-reduce of B*T*H disappears.
    """
    config = ModelConfig(**BASE, num_key_value_heads=state.tp_size)
    torch.manual_seed(SEED)
    base = _record_step(LlamaForCausalLM(config, state))
    lora = _record_step(_lora_model(config, state))
    fwd = [e for e in lora if e[0] == "fwd"]
    c.true("forward collectives unchanged", fwd == [e for e in base if e[0] == "fwd"], f"{fwd}")
    bwd = Counter(e for e in lora if e[0] == "bwd")
    expected = Counter(e for e in base if e[0] == "bwd")
    expected -= Counter([("bwd", "all_reduce", B * T * H)])
    expected += Counter({("bwd", "all_reduce", R * H): 7 * L})
    c.true("backward collectives", bwd == expected, f"{sorted(bwd.items())} != {sorted(expected.items())}")


def _all_checks(rank: int, world_size: int, dirs: dict[str, str]) -> dict:
    state = ParallelState.build(tp=world_size)
    sp_state = ParallelState.build(tp=world_size, sequence_parallel=True)
    c = _Checker()
    for case in CASES:
        if case.tp == world_size:
            c.run(case.name, _check_case, case, sp_state if case.sp else state)
    c.run("files", _check_files, state, dirs)
    if world_size == 2:
        c.run("collectives", _check_collectives, state)
    return c.results


# ---- parent side ----


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def results(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"lora_tp{request.param}")
    dirs = {"tp1": str(root / "tp1"), "tpN": str(root / "tpN")}
    return run_distributed(_all_checks, request.param, dirs)


def test_lora_at_tp_equals_tp1(results):
    failures = []
    for rank, checks in enumerate(results):
        for name, (err, tol) in checks.items():
            if isinstance(err, str) or err > tol:
                failures.append(f"rank {rank} {name}: {err} (tol {tol})")
    assert not failures, "\n".join(failures[:20])
    assert len(results[0]) > 100  # the checks ran
