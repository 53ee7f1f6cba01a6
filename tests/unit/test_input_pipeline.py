"""The input pipeline: `data_wait_frac` under a fake clock (the trainer's rows and training.metrics.StepTimer), the
default number of workers, and the loader's prefetch setting."""

import pytest

from training.data import default_num_workers
from training.metrics import StepTimer


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _loader(clock: FakeClock, waits: list[float]):
    """Batches whose next() takes waits[i] seconds of `clock` each, as a slow loader's own work would."""
    for i, wait in enumerate(waits):
        clock.now += wait
        yield i


def _steps(timer: StepTimer, clock: FakeClock, waits: list[float], compute: float) -> float:
    """One step per entry of `waits` (next() takes that long, the rest of the step `compute`); the window's frac."""
    batches = timer.batches(_loader(clock, waits))
    for _ in waits:
        timer.start()
        next(batches)
        clock.now += compute
        timer.stop()
    return timer.data_wait_frac()


def test_step_timer_counts_the_time_in_next_over_the_step_time():
    clock = FakeClock()
    timer = StepTimer(clock)
    assert _steps(timer, clock, [0.5, 0.5, 0.5], compute=1.5) == 0.25  # 3 x 0.5 over 3 x 2.0
    assert timer.data_wait_frac() == 0.0  # a new window, no step yet


def test_slow_data_is_near_one_and_fast_data_near_zero():
    clock = FakeClock()
    assert _steps(StepTimer(clock), clock, [9.9, 9.9], compute=0.1) == pytest.approx(0.99)
    assert _steps(StepTimer(clock), clock, [0.0, 0.0], compute=1.0) == 0.0


def test_trainer_logs_data_wait_frac_per_row(tmp_path, monkeypatch):
    # The trainer on the synthetic tiny model, 2 steps of 4 micro-batches, with a fake clock: step 1's loader takes
    # 1 s per batch and its step 1 s more (row 1: 4 / 5), step 2's loader no time (row 2: 0 / 1).
    from configs.schema import load_config
    from tests.integration.train_utils import SYNTHETIC, metrics
    from training import loop
    from training.metrics import MetricsLogger

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(loop, "peak_flops", lambda device, dtype: 1e12)  # no timed matmul
    monkeypatch.setattr(MetricsLogger, "plot", lambda self, out: None)
    cfg = load_config(None, [*SYNTHETIC, f"checkpoint.dir={tmp_path}", "train.max_steps=2", "checkpoint.every=0"])
    trainer = loop.Trainer(cfg, resume=False)
    clock = FakeClock()
    trainer.timer = StepTimer(clock)
    delays = [1.0] * trainer.grad_accum  # step 1's batches; step 2's come at once
    real_loader = trainer.loader

    class SlowLoader:
        def __iter__(self):
            for batch in real_loader:
                clock.now += delays.pop() if delays else 0.0
                yield batch

        def __getattr__(self, name):
            return getattr(real_loader, name)

    trainer.loader = SlowLoader()
    engine_step = trainer.engine.step

    def step_taking_one_second():
        clock.now += 1.0
        return engine_step()

    trainer.engine.step = step_taking_one_second
    trainer.run()
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["data_wait_frac"] for r in rows] == [pytest.approx(0.8), 0.0]
    assert [r["step_time_s"] for r in rows] == [pytest.approx(5.0), pytest.approx(1.0)]


@pytest.mark.parametrize(
    ("cuda", "cpus", "local_ranks", "workers"),
    [
        (False, 64, 1, 0),  # the CPU trains on every core: no workers
        (True, 16, 1, 4),  # one GPU, 16 cores: capped at 4
        (True, 16, 8, 1),  # 2 cores per rank: one worker, one core for the main process
        (True, 8, 8, 1),  # 1 core per rank: still one worker (the main process mostly waits on the GPU)
        (True, 32, 8, 3),  # 4 cores per rank: 3 workers
    ],
)
def test_default_num_workers(cuda, cpus, local_ranks, workers):
    assert default_num_workers(cuda, cpus, local_ranks) == workers


def test_auto_workers_read_the_affinity_and_local_world_size(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(12)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_num_workers(True) == 2  # 12 cores / 4 ranks - 1
