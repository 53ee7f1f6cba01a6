"""The torch engine at world size 1: accumulation, clipping and the non-finite skip, against plain torch; the
DeepSpeed version check of the expert-parallel path."""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from parallel.deepspeed_engine import TESTED_DEEPSPEED, check_deepspeed_version, fill_auto
from parallel.engine import build_engine
from parallel.state import ParallelConfigError, ParallelState


def _setup(grad_clip: float):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    engine = build_engine(model, opt, sched, state=ParallelState(), grad_accum=2, grad_clip=grad_clip)
    return model, engine


def test_accumulated_clipped_step_equals_plain_torch():
    model, engine = _setup(grad_clip=0.1)
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    xs = torch.randn(2, 5, 8)
    for x in xs:
        engine.backward(model(x).pow(2).mean())
        (ref(x).pow(2).mean() / 2).backward()
    norm = engine.step()
    ref_norm = nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    ref_opt.step()
    assert abs(norm - ref_norm.item()) < 1e-6 and norm > 0.1  # the pre-clip norm, and clipping was active
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


def test_nonfinite_gradient_skips_the_update_and_advances_the_schedule():
    model, engine = _setup(grad_clip=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    lr0 = engine.lr
    for _ in range(2):
        engine.backward(model(torch.randn(3, 8)).sum())
    next(model.parameters()).grad[0, 0] = float("inf")
    assert engine.step() == float("inf")
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b) and p.grad is None
    assert engine.lr == lr0 / 2  # the data was consumed: the schedule moved on
    assert not engine.optimizer.state  # AdamW never stepped: no moments were made from the bad gradient
    # and the next finite step trains as usual
    for _ in range(2):
        engine.backward(model(torch.randn(3, 8)).pow(2).mean())
    assert 0 < engine.step() < float("inf")
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("version", ["0.18.9", "0.20.0", "0.15.4", "not-a-version"])
def test_deepspeed_outside_the_tested_range_is_refused_with_what_to_install(version):
    with pytest.raises(ParallelConfigError) as e:
        check_deepspeed_version(version, "expert parallelism under DeepSpeed ZeRO (parallel.ep=2)")
    text = str(e.value)
    assert f"DeepSpeed {version} is installed" in text and "parallel.ep=2" in text
    assert "pip install 'deepspeed>=0.19,<0.20'" in text


@pytest.mark.parametrize("version", ["0.19.0", "0.19.8", "0.19.8+cpu", "0.19.10"])
def test_deepspeed_in_the_tested_range_passes(version):
    check_deepspeed_version(version, "expert parallelism")


def test_requirements_state_the_tested_deepspeed_range():
    lines = (Path(__file__).parents[2] / "requirements.txt").read_text().splitlines()
    (lo, hi) = TESTED_DEEPSPEED
    assert f"deepspeed>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}" in lines


def test_deepspeeds_throughput_timer_is_off_unless_the_config_sets_it():
    from deepspeed.utils.config import get_timers_config

    filled = fill_auto({"zero_optimization": {"stage": 1}}, micro_batch=2, grad_accum=3, grad_clip=1.0, bf16=True, dp=2)
    # on, it synchronises the device twice a micro-batch (deepspeed.utils.timer.ThroughputTimer.start / stop)
    assert get_timers_config({}).enabled and not get_timers_config(filled).enabled
    own = {"timers": {"throughput": {"enabled": True, "synchronized": False}}}
    assert get_timers_config(fill_auto(own, 2, 3, 1.0, True, 2)).enabled
