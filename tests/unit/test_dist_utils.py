import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import assert_sections, check, run_distributed, run_sections


def _all_reduce_sum(rank, world_size, offset):
    assert dist.get_rank() == rank and dist.get_world_size() == world_size
    assert os.environ["RANK"] == str(rank) and os.environ["WORLD_SIZE"] == str(world_size)
    t = torch.tensor([float(rank + offset)])
    dist.all_reduce(t)
    return t.item()


def _boom_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("boom")
    return rank


def _hang_on_rank_1(rank, world_size):
    if rank == 1:
        time.sleep(600)
    return rank


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_reduce_sum_on_every_rank(world_size):
    offset = 10
    expected = sum(range(world_size)) + offset * world_size
    assert run_distributed(_all_reduce_sum, world_size, offset) == [expected] * world_size


def test_exception_in_a_rank_is_reported_with_its_traceback():
    with pytest.raises(AssertionError) as excinfo:
        run_distributed(_boom_on_rank_1, 2)
    message = str(excinfo.value)
    assert "rank 1 of 2 raised" in message
    assert "ValueError: boom" in message
    assert "_boom_on_rank_1" in message  # the full traceback, not only the exception line
    assert "rank 0" not in message


def test_hanging_rank_is_killed_and_reported():
    start = time.monotonic()
    with pytest.raises(AssertionError, match="rank 1 of 2 timed out"):
        run_distributed(_hang_on_rank_1, 2, timeout=5)
    assert time.monotonic() - start < 30


def test_sections_record_checks_and_raise_on_a_failure_a_raise_or_nothing_run():
    def good(results):
        check(results, "a: one", True)
        results["a: worst error"] = 0.5  # a figure, not a check

    def bad(results):
        check(results, "b: one", False, "detail")

    def raises(results):
        raise ValueError("boom")

    results = run_sections([("a", good), ("b", bad), ("c", raises)])
    assert results["b: one"] == "failed: detail" and "boom" in results["c: raised"]
    assert_sections([results, results], "a", reports=("worst",))
    for section, message in (("b", "rank 1: b: one: failed: detail"), ("c", "ValueError: boom"), ("d", "no check")):
        with pytest.raises(AssertionError, match=message):
            assert_sections([results, results], section)
    with pytest.raises(AssertionError, match="worst error"):
        assert_sections([results], "a")  # without reports, the figure counts as a failed check


def _any_rank_flags(rank, world_size, raised_on):
    from training.distributed import any_rank

    return any_rank(rank in raised_on, torch.device("cpu"))


@pytest.mark.parametrize("raised_on", [(), (1,), (0, 1)])
def test_any_rank_is_true_on_every_rank_when_one_raised_it(raised_on):
    assert run_distributed(_any_rank_flags, 2, raised_on) == [bool(raised_on)] * 2


def test_any_rank_alone_reads_nothing_from_the_device():
    from training.distributed import any_rank

    meta = torch.device("meta")  # a device with no values: any read of it raises
    assert any_rank(True, meta) and not any_rank(False, meta)
