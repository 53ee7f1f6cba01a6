"""The engines on 2 gloo ranks: DDP and the MoE loads, ZeRO-1's optimizer partitions, fp32 buffers under bf16.

One spawn of 2 processes (each spawn costs seconds) runs three sections; each rank returns `{check: ok or text}`.

- ddp: MoEMLP with the auxiliary-loss-free expert bias under TorchEngine (DDP), 3 micro-batches per step with other
  tokens on each rank. Each rank's `expert_load` must be its own counts (DDP's per-forward buffer broadcast would
  replace it by rank 0's), and the bias after `update_expert_bias()` the update from the counts summed over ranks;
  both counted by a plain-torch router from the gate weight and bias.
- zero1: a dense Llama under DeepSpeed ZeRO-1 (fp32). Each rank's fp32 partition of each parameter group is half of
  the group's flat buffer (padding only for alignment) and holds exactly that half of the parameters in the group's
  order, Adam's moments exist only for the partition, and after a step the two partitions make up the model.
- bf16: an MoE Llama at ep=2 under DeepSpeed ZeRO-1 in bf16 with `data_types.buffer_dtype` set, so that DeepSpeed
  casts the buffers: the parameters are bf16, but `inv_freq` and `expert_bias` are fp32 with their exact values.
  Before it, the same engine with DeepSpeed's version made to read 0.18.9 must refuse to start (the expert path
  writes into DeepSpeed internals, so it checks the version first).
- experts: TorchEngine's expert gradients at dp=2 (ep=1: the expert-data-parallel group is both ranks) are the mean
  of the ranks' gradients, reduced in buckets of parallel.engine.BUCKET_ELEMENTS (made 40): torch.cat never makes a
  buffer above it (all expert gradients at once were 173 elements).
"""

import json
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from configs.sections import OptimSection, resolve_path
from modeling.config import ModelConfig
from modeling.llama import LlamaForCausalLM
from modeling.moe import MoEMLP
from modeling.rope import inv_frequencies
from parallel.engine import TorchEngine, build_engine
from parallel.state import ParallelConfigError, ParallelState
from tests.dist_utils import assert_sections, check, run_distributed, run_sections
from training.optim import build_optimizer

RANKS = 2
B, T, H, E, K = 2, 5, 16, 4, 2
RATE = 0.01
BIAS = [0.1234567, -0.0101, 0.0333333, 1e-4]  # not bf16 numbers: a cast would change them
TINY = dict(vocab_size=64, hidden_size=H, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def _ddp_moe_loads(results: dict) -> None:
    state = ParallelState.build()  # dp = 2
    config = ModelConfig(
        **TINY, num_local_experts=E, num_experts_per_tok=K, router_expert_bias=True, router_bias_update_rate=RATE
    )
    torch.manual_seed(0)
    moe = MoEMLP(config, state, init_method=lambda w: nn.init.normal_(w, 0.0, 0.5)).train()
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor(BIAS))
    bias0, gate = moe.expert_bias.clone(), moe.gate.weight.detach().clone()
    opt = torch.optim.SGD(moe.parameters(), lr=0.0)  # lr 0: only the routing counts matter here
    engine = TorchEngine(
        moe, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), state=state, grad_accum=3, grad_clip=0.0
    )
    counts = torch.zeros(E)
    g = torch.Generator().manual_seed(100 + dist.get_rank())
    for _ in range(3):
        x = torch.randn(B, T, H, generator=g) + (2.0 if dist.get_rank() else -2.0) * gate[0]  # ranks favour others
        chosen = torch.topk((x.reshape(-1, H) @ gate.T).softmax(-1) + bias0, K, dim=-1).indices  # (B T, k)
        counts += torch.bincount(chosen.reshape(-1), minlength=E)
        with engine.micro_batch():  # as the trainer runs them: DDP reduces (and broadcasts buffers) once a step
            y = engine.forward(x)
            engine.backward(y.pow(2).mean() + moe.aux_loss)
    engine.step()
    check(
        results,
        "ddp: expert_load holds this rank's own counts",
        torch.equal(moe.expert_load, counts),
        (moe.expert_load.tolist(), counts.tolist()),
    )
    total = counts.clone()
    dist.all_reduce(total)
    check(results, "ddp: every routed assignment counted", total.sum().item() == RANKS * 3 * B * T * K)
    moe.update_expert_bias()
    expected = bias0 + RATE * torch.sign(total.mean() - total)
    check(
        results,
        "ddp: bias update from the counts summed over ranks",
        torch.equal(moe.expert_bias, expected),
        (moe.expert_bias.tolist(), expected.tolist()),
    )


def _zero_config(**extra) -> dict:
    return {**json.loads(resolve_path("configs/deepspeed/zero1.json").read_text()), **extra}


def _zero1_partitions(results: dict) -> None:
    state = ParallelState.build()
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**TINY), state, dtype=torch.float32)
    optimizer, scheduler = build_optimizer(model, OptimSection(), max_steps=10)
    groups = [g["params"] for g in optimizer.param_groups]
    flats = [torch.cat([p.detach().reshape(-1) for p in ps]) for ps in groups]  # (numel of the group,) each
    engine = build_engine(
        model,
        optimizer,
        scheduler,
        state=state,
        grad_accum=1,
        grad_clip=1.0,
        ds_config=_zero_config(),
        micro_batch_size=1,
    )
    zero = engine.ds.optimizer
    parts = zero.single_partition_of_fp32_groups
    check(results, "zero1: one fp32 partition per parameter group", len(parts) == len(groups), len(parts))
    for i, (flat, part) in enumerate(zip(flats, parts, strict=True)):
        n = part.numel()
        padded = torch.cat([flat, flat.new_zeros(max(0, RANKS * n - flat.numel()))])
        check(
            results,
            f"zero1: group {i} partition is 1/{RANKS} of the group plus alignment",
            0 <= RANKS * n - flat.numel() < 2 * RANKS,
            (n, flat.numel()),
        )
        check(
            results,
            f"zero1: group {i} partition holds this rank's slice",
            torch.equal(part.detach(), padded[rank * n : (rank + 1) * n]),
        )
    g = torch.Generator().manual_seed(10 + rank)
    ids = torch.randint(TINY["vocab_size"], (1, 9), generator=g)
    engine.backward(engine.forward(ids[:, :-1], targets=ids[:, 1:]).loss)
    engine.step()
    for i, (ps, part) in enumerate(zip(groups, parts, strict=True)):
        moments = zero.optimizer.state[part]
        sizes = [moments[key].numel() for key in ("exp_avg", "exp_avg_sq")]
        check(results, f"zero1: group {i} Adam moments only for the partition", sizes == [part.numel()] * 2, sizes)
        gathered = [torch.empty_like(part) for _ in range(RANKS)]
        dist.all_gather(gathered, part.detach())
        model_flat = torch.cat([p.detach().reshape(-1) for p in ps])
        check(
            results,
            f"zero1: group {i} partitions make up the stepped model",
            torch.equal(torch.cat(gathered)[: model_flat.numel()], model_flat),
        )


def _bf16_buffers(results: dict) -> None:
    state = ParallelState.build(ep=2)
    config = ModelConfig(**TINY, num_local_experts=E, num_experts_per_tok=K, router_expert_bias=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config, state, dtype=torch.float32)
    for _, moe in model.moe_layers():
        moe.expert_bias.copy_(torch.tensor(BIAS))
    optimizer, scheduler = build_optimizer(model, OptimSection(), max_steps=10)
    ds_config = _zero_config(data_types={"buffer_dtype": "bf16"})  # DeepSpeed casts the buffers too
    import deepspeed  # here: DS_ACCELERATOR is set by now

    installed, deepspeed.__version__ = deepspeed.__version__, "0.18.9"  # the expert path checks before any work
    try:
        build_engine(model, optimizer, scheduler, state=state, grad_accum=1, grad_clip=1.0, ds_config=ds_config)
        check(results, "bf16: an untested DeepSpeed is refused at ep=2", False, "no error")
    except ParallelConfigError as e:
        check(results, "bf16: an untested DeepSpeed is refused at ep=2", "DeepSpeed 0.18.9 is installed" in str(e), e)
    finally:
        deepspeed.__version__ = installed
    engine = build_engine(
        model,
        optimizer,
        scheduler,
        state=state,
        grad_accum=1,
        grad_clip=1.0,
        ds_config=ds_config,
        micro_batch_size=1,
        bf16=True,
    )
    dtypes = {p.dtype for p in model.parameters()}
    check(results, "bf16: DeepSpeed cast the parameters", dtypes == {torch.bfloat16}, dtypes)
    check(
        results,
        "bf16: inv_freq fp32, exact",
        torch.equal(model.model.rotary_emb.inv_freq, inv_frequencies(config)),
        model.model.rotary_emb.inv_freq.dtype,
    )
    for i, moe in model.moe_layers():
        check(
            results,
            f"bf16: layer {i} expert_bias fp32, exact",
            torch.equal(moe.expert_bias, torch.tensor(BIAS)),
            moe.expert_bias.dtype,
        )
        check(results, f"bf16: layer {i} expert_load fp32", moe.expert_load.dtype == torch.float32)
    ids = torch.randint(TINY["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(20 + dist.get_rank()))
    engine.backward(engine.forward(ids[:, :-1], targets=ids[:, 1:]).loss)
    engine.step()
    model.update_expert_bias()
    dtypes = {moe.expert_bias.dtype for _, moe in model.moe_layers()}
    check(results, "bf16: expert_bias fp32 after a step and an update", dtypes == {torch.float32}, dtypes)


EXPERT_SHAPES = [(3, 7, 5), (4, 5), (3, 6), (30,)]  # buckets of 40: 105 alone (in place), 20 + 18, 30


def _expert_buckets(results: dict) -> None:
    import parallel.engine

    state = ParallelState.build()  # dp = 2, ep = 1: expert gradients are summed over both ranks
    torch.manual_seed(0)
    model = nn.Module()
    model.dense = nn.Linear(4, 4)  # DDP wraps the dense part; the experts are left to the engine
    model.experts = nn.ParameterList([nn.Parameter(torch.randn(s)) for s in EXPERT_SHAPES])
    for p in model.experts:
        p.expert_parallel = True
    before = [p.detach().clone() for p in model.experts]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # p - mean gradient: the reduced gradient, exactly
    engine = TorchEngine(
        model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), state=state, grad_accum=1, grad_clip=0.0
    )

    def grads(rank: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(100 + rank)
        return [torch.randn(s, generator=g) for s in EXPERT_SHAPES]

    for p, g in zip(model.experts, grads(dist.get_rank()), strict=True):
        p.grad = g
    sizes, cat, bucket = [], torch.cat, parallel.engine.BUCKET_ELEMENTS

    def recording_cat(tensors, *args, **kwargs):
        out = cat(tensors, *args, **kwargs)
        sizes.append(out.numel())
        return out

    torch.cat, parallel.engine.BUCKET_ELEMENTS = recording_cat, 40
    try:
        engine.step()
    finally:
        torch.cat, parallel.engine.BUCKET_ELEMENTS = cat, bucket
    want = [b - (g0 + g1) / RANKS for b, g0, g1 in zip(before, grads(0), grads(1), strict=True)]
    got = [p.detach() for p in model.experts]
    check(results, "experts: the mean of the ranks' gradients", all(map(torch.equal, got, want)))
    check(results, "experts: buffers within the bucket", sizes == [38], sizes)  # 105 and 30 alone, in place


def _all_checks(rank: int, world_size: int) -> dict:
    os.environ["DS_ACCELERATOR"] = "cpu"  # before this process first imports DeepSpeed
    sections = [("ddp", _ddp_moe_loads), ("zero1", _zero1_partitions), ("bf16", _bf16_buffers)]
    return run_sections([*sections, ("experts", _expert_buckets)])


@pytest.fixture(scope="module")
def rank_results():
    return run_distributed(_all_checks, RANKS, timeout=120)


def test_ddp_keeps_each_ranks_expert_loads_for_the_bias_update(rank_results):
    assert_sections(rank_results, "ddp")


def test_zero1_partitions_the_optimizer_state(rank_results):
    assert_sections(rank_results, "zero1")


def test_deepspeed_bf16_keeps_fp32_buffers(rank_results):
    assert_sections(rank_results, "bf16")


def test_expert_gradients_are_reduced_in_bounded_buckets(rank_results):
    assert_sections(rank_results, "experts")
