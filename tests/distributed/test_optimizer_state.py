"""Layout-free optimizer state (`Engine.optimizer_tensors` / `load_optimizer_tensors`) on 2 gloo ranks.

The independent reference is one plain `torch.optim.AdamW` (training.optim.build_optimizer, the same LambdaLR
schedule, torch's clip_grad_norm_) on the whole tiny Llama in one process, fed each step's whole global batch; the
engines feed each data-parallel rank its rows of the same batch. One spawn runs every section; each rank returns
`{check: True or text}`:

- dp2: after 3 steps at dp=2 under the torch engine (DDP) and ZeRO-1, 2 and 3, the exported moments, step and master
  (or parameters) equal the reference's.
- tp2: at tp=2 (dp=1), under the torch engine and ZeRO-2, they are the tp shards of the reference's
  (modeling.native_format.split_for_rank).
- resume: exported at step 3 from ZeRO-2 and loaded into a fresh torch engine and a fresh ZeRO-3, and from the torch
  engine into a fresh ZeRO-1 (before their first step), the schedule with training.optim.schedule_state, 2 more
  steps: the parameters equal the reference's after 5 steps.
- moe: an MoE Llama at ep=2 under ZeRO-2: each ep rank's expert moments are its experts' share of the reference's.
- bf16: ZeRO-1 (DeepSpeed's BF16_Optimizer), ZeRO-2 and ZeRO-3 in bf16: "master" is fp32, not the bf16 module
  weight, which is its rounding; loaded into fresh engines (before a step) it exports again bit for bit and sets
  the module weights; loaded into an fp32 torch engine it replaces the rounded weights by the masters.
- offload: ZeRO-Offload (configs/deepspeed/zero3_offload.json and zero2.json with the optimizer offloaded) steps with
  DeepSpeed's CPU Adam (training.optim.build_optimizer(offload=...)): after 3 steps the parameters equal the
  reference's to 1e-6 (absolute) and the export (an int step, fp32 moments) equals its state; ZeRO-2's export
  resumes in a fresh ZeRO-3 as the reference after 5 steps; torch's AdamW (the fallback) is accepted offloaded too.
  Skipped where the CPU Adam op is not built yet (it compiles for minutes on first use).
"""

import functools
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from configs.sections import OptimSection, resolve_path
from modeling.config import ModelConfig
from modeling.llama import LlamaForCausalLM
from modeling.native_format import split_for_rank
from parallel.engine import build_engine
from parallel.state import ParallelState
from tests.dist_utils import assert_sections, run_distributed, run_sections
from training.optim import build_optimizer, load_schedule_state, lr_lambda, schedule_state

RANKS = 2
REPORTS = ("worst",)  # "<section>: worst relative error" keys: a figure for the report, not a check
ROWS, T = 4, 8  # global batch: ROWS sequences of T tokens (+1 for the targets)
SEED = 0
TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
MOE = dict(TINY, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.0)  # per-rank aux loss != global
OPT = OptimSection(lr=1e-2, min_lr=1e-3, warmup_steps=2, decay="cosine", grad_clip=1.0)
MAX_STEPS = 6
# fp32, |a - b| / max |b| per tensor: the worst over all tensors and sections reached 1.6e-6 (reduction order)
RTOL = 5e-6


def _batch(step: int) -> torch.Tensor:
    """(ROWS, T + 1) token ids of global step `step`, the same for every layout."""
    return torch.randint(TINY["vocab_size"], (ROWS, T + 1), generator=torch.Generator().manual_seed(1000 + step))


def _reference(config: ModelConfig, steps: int, snapshots: tuple[int, ...]) -> tuple[dict, dict]:
    """The initial parameters and, after each step in `snapshots`, {key: {name: tensor}} of plain AdamW."""
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config, dtype=torch.float32)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, sched = build_optimizer(model, OPT, MAX_STEPS)
    out = {}
    for step in range(steps):
        ids = _batch(step)
        model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), OPT.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step + 1 in snapshots:
            snap = {"master": {n: p.detach().clone() for n, p in model.named_parameters()}}
            for key in ("exp_avg", "exp_avg_sq"):
                snap[key] = {n: opt.state[p][key].clone() for n, p in model.named_parameters()}
            snap["step"] = {n: opt.state[p]["step"].clone() for n, p in model.named_parameters()}
            out[step + 1] = snap
    return init, out


def _local(full: dict[str, torch.Tensor], config: ModelConfig, state: ParallelState) -> dict[str, torch.Tensor]:
    """This rank's shard of whole tensors (the tensor split, the experts of its ep rank)."""
    return split_for_rank(full, config, state.tp_rank, state.tp_size, ep_rank=state.ep_rank, ep_size=state.ep_size)


def _engine(config, state, params: dict[str, torch.Tensor], stage, bf16: bool = False, offload: str | None = None):
    """A model holding `params` (this rank's shards) under the torch engine (stage None) or ZeRO `stage`.

    `stage` may also be a whole DeepSpeed config; `offload` is passed to build_optimizer (DeepSpeed's CPU Adam).
    """
    model = LlamaForCausalLM(config, state, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    opt, sched = build_optimizer(model, OPT, MAX_STEPS, offload=offload)
    ds_config = stage
    if isinstance(stage, int):
        path = resolve_path(f"configs/deepspeed/zero{stage}.json")
        ds_config = json.loads(path.read_text())
    rows = ROWS // state.dp_size
    engine = build_engine(
        model,
        opt,
        sched,
        state=state,
        grad_accum=1,
        grad_clip=OPT.grad_clip,
        ds_config=ds_config,
        micro_batch_size=rows,
        bf16=bf16,
    )
    return model, engine


def _train(engine, state: ParallelState, steps: range) -> None:
    rows = ROWS // state.dp_size
    for step in steps:
        ids = _batch(step)[state.dp_rank * rows : (state.dp_rank + 1) * rows]
        engine.backward(engine.forward(ids[:, :-1], targets=ids[:, 1:]).loss)
        engine.step()


def _params(engine) -> dict[str, torch.Tensor]:
    with engine.full_parameters():
        return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


class _Checker:
    def __init__(self, results: dict, section: str) -> None:
        self.results, self.section, self.worst = results, section, 0.0

    def true(self, name: str, ok: bool, detail: object = "") -> None:
        self.results[f"{self.section}: {name}"] = True if ok else f"failed: {detail}"

    def close(self, name: str, got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> None:
        if got.shape != want.shape:
            self.true(name, False, f"shape {tuple(got.shape)} != {tuple(want.shape)}")
            return
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()
        self.worst = max(self.worst, err)
        self.true(name, err <= rtol, f"relative error {err:.3g} > {rtol}")

    def state(self, label: str, engine, ref: dict, config, state, keys=("exp_avg", "exp_avg_sq", "master")) -> dict:
        """engine.optimizer_tensors() against the reference snapshot cut to this rank; returns the export."""
        got = engine.optimizer_tensors()
        names = [n for n, _ in engine.module.named_parameters()]
        self.true(f"{label} every parameter exported", sorted(got) == sorted(names), sorted(set(names) ^ set(got)))
        for key in keys:
            want = _local(ref[key], config, state)
            for name in names:
                if name in got:
                    self.close(f"{label} {name}.{key}", got[name][key], want[name])
        steps = {float(t["step"]) for t in got.values()}
        want_steps = {float(s) for s in ref["step"].values()}
        self.true(f"{label} step", steps == want_steps, (steps, want_steps))
        cpu_fp32 = all(t.dtype == torch.float32 and t.device.type == "cpu" for d in got.values() for t in d.values())
        self.true(f"{label} CPU fp32", cpu_fp32)
        return got


def _dp2_and_resume(results: dict) -> None:
    c = _Checker(results, "dp2")
    config = ModelConfig(**TINY)
    init, ref = _reference(config, 5, (3, 5))
    state = ParallelState.build()  # dp = 2
    exports = {}
    for stage in (None, 1, 2, 3):
        _, engine = _engine(config, state, init, stage)
        _train(engine, state, range(3))
        label = f"zero{stage}" if stage else "torch"
        keys = ("exp_avg", "exp_avg_sq") + (("master",) if stage else ())
        got = c.state(label, engine, ref[3], config, state, keys)
        params = _params(engine)
        for name, p in params.items():
            c.close(f"{label} parameter {name}", p, ref[3]["master"][name])
        if label == "torch":
            c.true("torch: no master", not any("master" in t for t in got.values()))
        exports[label] = (got, params, schedule_state(engine.scheduler))
    results["dp2: worst relative error"] = c.worst

    r = _Checker(results, "resume")
    for source, target in (("zero2", None), ("zero2", 3), ("torch", 1)):
        got, params, sched = exports[source]
        _, engine = _engine(config, state, params, target)  # the model's weights as the checkpoint holds them
        engine.load_optimizer_tensors(got.get)
        load_schedule_state(engine.scheduler, sched)
        label = f"{source} -> {f'zero{target}' if target else 'torch'}"
        lr = OPT.lr * lr_lambda(OPT, MAX_STEPS)(3)  # the lr of the 4th step
        r.true(f"{label} lr after loading", abs(engine.lr - lr) < 1e-12, (engine.lr, lr))
        _train(engine, state, range(3, 5))
        for name, p in _params(engine).items():
            r.close(f"{label} parameter {name} after 5 steps", p, ref[5]["master"][name])
    results["resume: worst relative error"] = r.worst


def _tp2(results: dict) -> None:
    c = _Checker(results, "tp2")
    config = ModelConfig(**TINY)
    init, ref = _reference(config, 3, (3,))
    state = ParallelState.build(tp=2)  # dp = 1
    for stage in (None, 2):
        _, engine = _engine(config, state, _local(init, config, state), stage)
        _train(engine, state, range(3))
        keys = ("exp_avg", "exp_avg_sq") + (("master",) if stage else ())
        c.state(f"zero{stage}" if stage else "torch", engine, ref[3], config, state, keys)
    results["tp2: worst relative error"] = c.worst


def _moe(results: dict) -> None:
    c = _Checker(results, "moe")
    config = ModelConfig(**MOE)
    init, ref = _reference(config, 3, (3,))
    state = ParallelState.build(ep=2)  # dp = 2, the experts split over 2 ep ranks
    _, engine = _engine(config, state, _local(init, config, state), 2)
    _train(engine, state, range(3))
    got = c.state("zero2", engine, ref[3], config, state)
    experts = [n for n, p in engine.module.named_parameters() if getattr(p, "expert_parallel", False)]
    c.true("expert parameters exported", bool(experts) and all(n in got for n in experts), experts)
    results["moe: worst relative error"] = c.worst


def _bf16(results: dict) -> None:
    c = _Checker(results, "bf16")
    config = ModelConfig(**TINY)
    init, _ = _reference(config, 0, ())
    state = ParallelState.build()
    for stage in (1, 2, 3):
        _, engine = _engine(config, state, init, stage, bf16=True)
        _train(engine, state, range(2))
        got = engine.optimizer_tensors()
        weights = _weights(engine)
        label = f"zero{stage}"
        c.true(f"{label} masters fp32", all(t["master"].dtype == torch.float32 for t in got.values()))
        c.true(
            f"{label} module weights are the masters' bf16 rounding",
            all(torch.equal(weights[n], t["master"].bfloat16()) for n, t in got.items()),
        )
        c.true(
            f"{label} masters are not the bf16 weights",
            all(not torch.equal(weights[n].float(), t["master"]) for n, t in got.items()),
        )
        _, fresh = _engine(config, state, init, stage, bf16=True)  # other weights: the load must set them
        fresh.load_optimizer_tensors(got.get)
        again = fresh.optimizer_tensors()
        c.true(
            f"{label} reloads bit for bit",
            sorted(again) == sorted(got) and all(torch.equal(again[n][k], got[n][k]) for n in got for k in got[n]),
        )
        reloaded = _weights(fresh)
        c.true(f"{label} reload sets the module weights", all(torch.equal(weights[n], w) for n, w in reloaded.items()))
        if stage == 2:  # resumed on the torch engine in fp32: the master's value, not the bf16 weights' rounding
            rounded = {n: w.float() for n, w in weights.items()}  # what the checkpoint's bf16 model shards hold
            _, torch_engine = _engine(config, state, rounded, None)
            torch_engine.load_optimizer_tensors(got.get)
            c.true(
                "torch engine takes the fp32 masters",
                all(torch.equal(w, got[n]["master"]) for n, w in _weights(torch_engine).items()),
            )


def _offload(results: dict) -> None:
    import cpuinfo
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from deepspeed.ops.op_builder import CPUAdamBuilder
    from torch.utils.cpp_extension import _get_build_directory

    builder = CPUAdamBuilder()  # loads without compiling: prebuilt (DS_BUILD_CPU_ADAM=1) or JIT-compiled before
    built = Path(_get_build_directory(builder.name, verbose=False)) / f"{builder.name}.so"
    if not built.exists() and importlib.util.find_spec(builder.absolute_name()) is None:
        results["offload: skipped"] = f"DeepSpeed's CPU Adam op is not built ({built}): it compiles for minutes"
        return
    # py-cpuinfo answers each call from a fresh Python subprocess (about 2 s here), and DeepSpeed asks 3 times for
    # the first CPU Adam and once for each later one: this process asks once
    cpuinfo.get_cpu_info = functools.cache(cpuinfo.get_cpu_info)
    c = _Checker(results, "offload")
    config = ModelConfig(**TINY)
    init, ref = _reference(config, 5, (3, 5))
    state = ParallelState.build()  # dp = 2
    zero2 = json.loads(resolve_path("configs/deepspeed/zero2.json").read_text())
    zero2["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    zero3 = json.loads(resolve_path("configs/deepspeed/zero3_offload.json").read_text())
    exports = {}
    # DeepSpeed's CPU Adam under both configs, and torch's AdamW (build_optimizer's fallback) under ZeRO-2's
    for label, ds_config, offload in (("zero2", zero2, "zero2"), ("zero3", zero3, "zero3"), ("torch", zero2, None)):
        _, engine = _engine(config, state, init, ds_config, offload=offload)
        opt = engine.ds.optimizer.optimizer  # what ZeRO steps
        c.true(f"{label} optimizer", isinstance(opt, DeepSpeedCPUAdam) == bool(offload), type(opt))
        _train(engine, state, range(3))
        _close_to_plain_adamw(c, f"{label} after 3 steps", _params(engine), ref[3]["master"])
        if offload:
            exports[label] = (c.state(label, engine, ref[3], config, state), _params(engine))
            steps = [st["step"] for st in opt.state.values()]
            c.true(f"{label} CPU Adam's int step", bool(steps) and all(type(s) is int for s in steps), steps)
    # ZeRO-2's export resumes in a fresh ZeRO-3 (CPU Adam's state created at load, before its first step)
    got, params = exports["zero2"]
    _, engine = _engine(config, state, params, zero3, offload="zero3")
    engine.load_optimizer_tensors(got.get)
    load_schedule_state(engine.scheduler, {"step": 3})
    _train(engine, state, range(3, 5))
    _close_to_plain_adamw(c, "zero2 -> zero3 after 5 steps", _params(engine), ref[5]["master"])
    results["offload: worst relative error"] = c.worst


def _close_to_plain_adamw(c: _Checker, label: str, params: dict, want: dict) -> None:
    """Absolute 1e-6: the kernels' fp32 rounding and the reduction order, amplified by Adam where gradients are tiny
    (the worst difference seen was 1.8e-7)."""
    for name, p in params.items():
        err = (p - want[name]).abs().max().item()
        c.true(f"{label} parameter {name} against plain AdamW", err <= 1e-6, f"max |difference| {err:.3g}")


def _weights(engine) -> dict[str, torch.Tensor]:
    """The module's parameters, whole over the data-parallel ranks, in their own dtype, on the CPU."""
    with engine.full_parameters():
        return {n: p.detach().cpu().clone() for n, p in engine.module.named_parameters()}


def _all_checks(rank: int, world_size: int) -> dict:
    os.environ["DS_ACCELERATOR"] = "cpu"  # before this process first imports DeepSpeed
    return run_sections(
        [("dp2", _dp2_and_resume), ("tp2", _tp2), ("moe", _moe), ("bf16", _bf16), ("offload", _offload)]
    )


@pytest.fixture(scope="module")
def rank_results():
    return run_distributed(_all_checks, RANKS, timeout=300)


def test_dp2_export_equals_plain_adamw_under_every_engine(rank_results):
    assert_sections(rank_results, "dp2", reports=REPORTS)


def test_export_at_tp2_is_the_tensor_shards_of_plain_adamw(rank_results):
    assert_sections(rank_results, "tp2", reports=REPORTS)


def test_resume_across_engines_continues_as_the_uninterrupted_run(rank_results):
    assert_sections(rank_results, "resume", reports=REPORTS)


def test_moe_expert_state_at_ep2_is_each_ranks_experts(rank_results):
    assert_sections(rank_results, "moe", reports=REPORTS)


def test_bf16_master_weights_are_exported_and_reload_exactly(rank_results):
    assert_sections(rank_results, "bf16", reports=REPORTS)


def test_offload_steps_with_deepspeed_cpu_adam_as_torch_adamw(rank_results):
    if "offload: skipped" in rank_results[0]:
        pytest.skip(rank_results[0]["offload: skipped"])
    assert_sections(rank_results, "offload", reports=REPORTS)


def test_schedule_state_loads_into_other_param_groups():
    """A schedule saved with 2 parameter groups loads into one with 1 (another layout) and runs on by step."""
    opt_a, sched_a = build_optimizer(nn.Linear(4, 4), OPT, MAX_STEPS)
    opt_b, sched_b = build_optimizer(nn.Linear(4, 4, bias=False), OPT, MAX_STEPS)
    assert len(opt_a.param_groups) == 2 and len(opt_b.param_groups) == 1  # decay and no-decay vs decay only
    for _ in range(4):
        opt_a.step()
        sched_a.step()
    load_schedule_state(sched_b, schedule_state(sched_a))
    f = lr_lambda(OPT, MAX_STEPS)
    assert [g["lr"] for g in opt_b.param_groups] == [OPT.lr * f(4)] and sched_b.get_last_lr() == [OPT.lr * f(4)]
    opt_b.step()
    sched_b.step()
    assert opt_b.param_groups[0]["lr"] == OPT.lr * f(5)
    with pytest.raises(ValueError, match="no 'step'"):
        load_schedule_state(sched_b, {"last_epoch": 4})


def test_torch_engine_refuses_a_moment_of_another_shape_and_none_means_no_state():
    model = nn.Linear(4, 3)
    opt, sched = build_optimizer(model, OPT, MAX_STEPS)
    engine = build_engine(model, opt, sched, state=ParallelState(), grad_accum=1, grad_clip=0.0)
    engine.backward(model(torch.randn(2, 4)).pow(2).mean())
    engine.step()
    got = engine.optimizer_tensors()
    assert sorted(got) == ["bias", "weight"] and float(got["weight"]["step"]) == 1.0
    engine.load_optimizer_tensors(lambda name: None if name == "bias" else got[name])
    assert set(engine.optimizer_tensors()) == {"weight"}
    wrong = {**got["weight"], "exp_avg": torch.zeros(3, 2)}  # a tensor shard of another tp size
    with pytest.raises(ValueError, match=r"weight\.exp_avg has shape \(3, 2\), but this rank's parameter is \(3, 4\)"):
        engine.load_optimizer_tensors(lambda name: wrong if name == "weight" else None)
