"""One optimizer step with 4 micro-batches: one gradient reduction, one decision on losses and ids, one device read.

One spawn of 2 gloo processes runs every section; each rank returns `{check: True or text}`.

- engine: a small MLP under TorchEngine (DDP) with a comm hook that counts DDP's bucket all-reduces. With each
  micro-batch's forward and backward inside `engine.micro_batch()`, the first three micro-batches reduce nothing and
  the last reduces every bucket (before the fix, the no_sync around the backward alone let every micro-batch
  all-reduce: [1, 1, 1, 1]); the reduced gradients equal one process's gradient of the mean of all 8 micro-batch
  losses, without accumulation.
- trainer: training.loop.Trainer on the synthetic tiny model (global batch 8: grad_accum 4 per rank). Per step the
  loop calls `torch.distributed.all_reduce` twice (the non-finite flag over the world, loss and tokens over dp) and
  reads the device once (one `tolist`), whatever grad_accum is (before: an `item` and an all-reduce per micro-batch);
  DDP reduces once. Elsewhere the step reads the device for the gradient norm only: the token ids' checks (before,
  2 reads a micro-batch) are read with the loop's values. A NaN loss in micro-batch 2 of one rank skips the step on
  both ranks (weights unchanged, gradients dropped) and the next step trains.
- ids: an input id outside the vocabulary in micro-batch 3 of rank 1 raises TokenIdError after the step's last
  micro-batch on both ranks, rank 1's naming the id, before the optimizer step (weights unchanged).
- moe: the same trainer with 4 experts. A step reads and reduces none of the experts' statistics (before, one read
  and one all-reduce every step); the loop's `moe_stats.row()` of a logged step then counts that step's assignments
  alone, tokens x top-k in every layer.
- padded: the MoE trainer at ep=2 under a capacity. Each layer reads its all-to-all's split sizes once a micro-batch;
  with parallel.moe_pad_to_capacity, never.
- pp: at pp=2 a target id outside the vocabulary in micro-batch 3 raises on both stages before the update: the last
  stage's loss names it, the first stage, whose checks were of the inputs, says another rank's ids were bad.
"""

import contextlib
import copy
import math
import os
import tempfile
import traceback
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from parallel.engine import TorchEngine
from parallel.state import ParallelState
from parallel.token_ids import TokenIdError
from tests.dist_utils import assert_sections, check, run_distributed, run_sections
from tests.host_syncs import HostSyncs
from tests.integration.train_utils import MOE, SYNTHETIC

RANKS, ACCUM, ROWS = 2, 4, 3
LOOP_FILES = ("training/loop.py", "training/distributed.py")  # the step and the reductions behind its decisions


def _counting_hook(counts: list[int]):
    """A DDP comm hook that counts the buckets it reduces in counts[-1], then all-reduces them as DDP does."""

    def hook(group: dist.ProcessGroup, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        counts[-1] += 1
        return default_hooks.allreduce_hook(group, bucket)

    return hook


def _engine_reduces_once(results: dict) -> None:
    state, rank = ParallelState.build(), dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    engine = TorchEngine(model, opt, sched, state=state, grad_accum=ACCUM, grad_clip=0.0)
    counts: list[int] = []
    engine._ddp.register_comm_hook(state.dp_cp_group, _counting_hook(counts))
    xs = torch.randn(RANKS, ACCUM, ROWS, 8, generator=torch.Generator().manual_seed(1))  # every rank's batches
    for i in range(ACCUM):
        counts.append(0)
        with engine.micro_batch():
            engine.backward(engine.forward(xs[rank, i]).pow(2).mean())
    last_only = counts[:-1] == [0] * (ACCUM - 1) and counts[-1] > 0
    check(results, "engine: DDP reduces in the last micro-batch only", last_only, counts)
    # one process, no accumulation: the gradient of the mean loss over every rank's micro-batches
    torch.stack([ref(x).pow(2).mean() for x in xs.reshape(RANKS * ACCUM, ROWS, 8)]).mean().backward()
    diffs = [(p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), ref.parameters(), strict=True)]
    check(results, "engine: reduced gradients equal the no-accumulation reference", max(diffs) < 1e-6, diffs)
    engine.step()
    check(results, "engine: the step leaves no gradients", all(p.grad is None for p in model.parameters()))


@contextlib.contextmanager
def _all_reduce_callers() -> Iterator[list[str]]:
    """While active, the file of each `torch.distributed.all_reduce` call's caller is appended to the list."""
    reduces: list[str] = []
    all_reduce = dist.all_reduce

    def counted(*args, **kwargs):
        reduces.append(traceback.extract_stack(limit=2)[0].filename)
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counted
    try:
        yield reduces
    finally:
        dist.all_reduce = all_reduce


@contextlib.contextmanager
def _trainer(*overrides: str):
    """A training.loop.Trainer on the synthetic tiny model with `overrides`, its checkpoint directory temporary."""
    from configs.schema import load_config
    from training.loop import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [*SYNTHETIC, f"checkpoint.dir={out}", "checkpoint.every=0", *overrides])
        yield Trainer(cfg, resume=False)


def _trainer_step_syncs(results: dict) -> None:
    with _trainer("train.global_batch_size=8") as trainer:
        check(results, "trainer: 4 micro-batches a step", trainer.grad_accum == ACCUM, trainer.grad_accum)
        trainer.train_step()  # DDP's first step rebuilds its buckets: count from the second on
        buckets: list[int] = []
        trainer.engine._ddp.register_comm_hook(trainer.state.dp_cp_group, _counting_hook(buckets))
        with _all_reduce_callers() as reduces:
            for step in range(2):
                buckets.append(0)
                reduces.clear()
                with HostSyncs() as syncs:
                    m = trainer.train_step()
                # on the CPU the batches' .to(device) are counted too: the device is the host here
                reads = [c for c in syncs.calls if any(f in c for f in LOOP_FILES) and not c.startswith("to ")]
                # the synthetic loader's int() of its CPU draws reads no device
                others = [c for c in syncs.calls if c not in reads and not c.startswith("to ") and "data.py" not in c]
                loop_reduces = [f for f in reduces if f.endswith(LOOP_FILES)]
                check(results, f"trainer: step {step} finite", not m["nonfinite"] and math.isfinite(m["loss"]), m)
                check(results, f"trainer: step {step} reads the device once in the loop", len(reads) == 1, reads)
                norm_only = len(others) == 1 and "parallel/engine.py" in others[0]  # the ids' checks read none
                check(results, f"trainer: step {step} reads elsewhere for the grad norm only", norm_only, others)
                check(results, f"trainer: step {step} all-reduces twice in the loop", len(loop_reduces) == 2, reduces)
                # the tiny model's ~0.4 MB of gradients fill one DDP bucket
                check(results, f"trainer: step {step} DDP reduces once", buckets[-1] == 1, buckets)
                check(results, f"trainer: step {step} tokens over dp", m["tokens"] == 8 * 32, m["tokens"])
        _nonfinite_on_one_rank(results, trainer)
        _bad_id_on_one_rank(results, trainer)


def _nonfinite_on_one_rank(results: dict, trainer) -> None:
    forward, calls = trainer._forward, []

    def nan_in_micro_batch_2_of_rank_1(batch):
        out = forward(batch)
        calls.append(None)
        if dist.get_rank() == 1 and len(calls) == 2:
            out.loss = out.loss * float("nan")
        return out

    trainer._forward = nan_in_micro_batch_2_of_rank_1
    before = [p.detach().clone() for p in trainer.model.parameters()]
    m = trainer.train_step()
    check(results, "nonfinite: the step is skipped on every rank", m["nonfinite"] and math.isnan(m["loss"]), m)
    same = all(torch.equal(p, b) for p, b in zip(trainer.model.parameters(), before, strict=True))
    check(results, "nonfinite: weights unchanged", same)
    check(results, "nonfinite: gradients dropped", all(p.grad is None for p in trainer.model.parameters()))
    check(results, "nonfinite: all 4 micro-batches consumed", len(calls) == ACCUM, len(calls))
    trainer._forward = forward
    m = trainer.train_step()
    moved = not all(torch.equal(p, b) for p, b in zip(trainer.model.parameters(), before, strict=True))
    check(results, "nonfinite: the next step trains", not m["nonfinite"] and moved, m)


def _bad_id_on_one_rank(results: dict, trainer) -> None:
    forward, calls = trainer._forward, []

    def bad_input_in_micro_batch_3_of_rank_1(batch):
        calls.append(None)
        if dist.get_rank() == 1 and len(calls) == 3:
            batch = {**batch, "input_ids": batch["input_ids"].clone()}
            batch["input_ids"][0, 5] = 999  # the vocabulary is [0, 256)
        return forward(batch)

    trainer._forward = bad_input_in_micro_batch_3_of_rank_1
    raised, same = _step_error(trainer)
    want = "input id 999 is outside the vocabulary [0, 256)" if dist.get_rank() == 1 else "another rank read a token id"
    check(results, "ids: every rank raises, the bad one naming the id", raised.startswith(want), raised)
    check(results, "ids: all 4 micro-batches ran", len(calls) == ACCUM, len(calls))
    check(results, "ids: weights unchanged", same)


def _step_error(trainer) -> tuple[str, bool]:
    """(the TokenIdError's message of one train_step, or "no error"; whether the weights stayed as they were)."""
    before = [p.detach().clone() for p in trainer.model.parameters()]
    try:
        trainer.train_step()
        raised = "no error"
    except TokenIdError as e:
        raised = str(e)
    return raised, all(torch.equal(p, b) for p, b in zip(trainer.model.parameters(), before, strict=True))


def _moe_stats_on_logged_steps_only(results: dict) -> None:
    with _trainer(*MOE, "train.global_batch_size=8") as trainer:
        trainer.train_step()
        with _all_reduce_callers() as reduces, HostSyncs() as syncs:
            trainer.train_step()
        reads = [c for c in syncs.calls if "moe_metrics.py" in c]
        check(results, "moe: a step reads no expert statistics", not reads, reads)
        stats_reduces = [f for f in reduces if f.endswith("moe_metrics.py")]
        check(results, "moe: a step reduces no expert statistics", not stats_reduces, stats_reduces)
        row = trainer.moe_stats.row()  # what the loop logs: the last step's alone (reset at each step's start)
        assignments = 8 * 32 * trainer.model_cfg.num_experts_per_tok  # both ranks' sequences, k experts each
        sums = {k: sum(v) for k, v in row.items() if k.endswith("tokens_per_expert")}
        layers = trainer.model_cfg.num_hidden_layers
        one_step = len(sums) == layers and all(v == assignments for v in sums.values())
        check(results, "moe: the row counts the last step's assignments", one_step, (sums, assignments))


def _experts_padded_to_capacity(results: dict) -> None:
    capacity = [*MOE, "model.capacity_factor=1.0", "parallel.ep=2", "train.global_batch_size=8"]
    for pad in ("false", "true"):
        with _trainer(*capacity, f"parallel.moe_pad_to_capacity={pad}") as trainer:
            trainer.train_step()
            with HostSyncs() as syncs:
                m = trainer.train_step()
            reads = [c for c in syncs.calls if "parallel/experts.py" in c or "modeling/moe.py" in c]
            # unpadded: each layer reads its split sizes once a micro-batch
            want = 0 if pad == "true" else len(trainer.model.moe_layers()) * ACCUM
            check(results, f"padded: {pad}: the experts' reads of a step", len(reads) == want, reads)
            check(results, f"padded: {pad}: the step trains", not m["nonfinite"] and math.isfinite(m["loss"]), m)


def _bad_target_at_pp2(results: dict) -> None:
    with _trainer("parallel.pp=2") as trainer:
        trainer.train_step()
        batches = trainer._batches

        def bad_target_in_micro_batch_3():
            for i, batch in enumerate(batches):
                if i == 2:
                    batch = {**batch, "targets": batch["targets"].clone()}
                    batch["targets"][0, 5] = 999  # every stage reads it; the last stage's loss checks it
                yield batch

        trainer._batches = bad_target_in_micro_batch_3()
        raised, same = _step_error(trainer)
    # the first stage checked the inputs (fine), the last the targets: other checks, one flag of the same size
    last = "target id 999 is outside the vocabulary [0, 256) and is not the ignore index -100"
    want = last if dist.get_rank() == 1 else "another rank read a token id"
    check(results, "pp: both stages raise, the last naming the target", raised.startswith(want), raised)
    check(results, "pp: weights unchanged", same)


def _all_checks(rank: int, world_size: int) -> dict:
    os.environ.pop("LOCAL_WORLD_SIZE", None)
    sections = [
        ("engine", _engine_reduces_once),
        ("trainer", _trainer_step_syncs),
        ("moe", _moe_stats_on_logged_steps_only),
        ("padded", _experts_padded_to_capacity),
        ("pp", _bad_target_at_pp2),
    ]
    return run_sections(sections)


@pytest.fixture(scope="module")
def rank_results():
    return run_distributed(_all_checks, RANKS, timeout=120)


def test_ddp_reduces_once_per_step_and_equals_the_reference(rank_results):
    assert_sections(rank_results, "engine")


def test_trainer_decides_on_nonfinite_losses_once_per_step(rank_results):
    assert_sections(rank_results, "trainer")


def test_a_nan_on_one_rank_skips_the_step_everywhere(rank_results):
    assert_sections(rank_results, "nonfinite")


def test_a_bad_token_id_on_one_rank_stops_every_rank_before_the_update(rank_results):
    assert_sections(rank_results, "ids")


def test_moe_statistics_are_read_and_reduced_on_logged_steps_only(rank_results):
    assert_sections(rank_results, "moe")


def test_experts_padded_to_capacity_read_no_counts(rank_results):
    assert_sections(rank_results, "padded")


def test_a_bad_target_at_pp2_stops_both_stages_before_the_update(rank_results):
    assert_sections(rank_results, "pp")
