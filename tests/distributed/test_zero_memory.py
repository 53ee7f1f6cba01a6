"""bench/zero_memory.py measures that ZeRO shards over the data-parallel ranks: each rank of 2 holds half.

The reference is the ZeRO paper's per-rank formula (fp32, Adam K=8) for the model's parameter count, which is
counted independently of DeepSpeed (sum of numel over the module before wrapping). Losses alone cannot show this:
an engine that silently sharded over a group of one would train identically and hold twice the memory. It spawns 2
gloo processes with DeepSpeed ZeRO-3 (about 20 s on 2 cores).
"""

import pytest

from bench.zero_memory import measure, paper_formula

RANKS = 2


@pytest.fixture(scope="module")
def zero3():
    return measure(3, RANKS)


def _within(measured: float, expected: float, rel: float) -> None:
    assert abs(measured - expected) <= rel * expected, f"measured {measured:,} bytes, expected {expected:,.0f}"


def test_zero3_partitions_parameters_gradients_and_adam_states(zero3):
    psi = zero3[0]["psi"]
    f = paper_formula(3, RANKS, psi, "fp32")
    for r in zero3:
        m = r["measured"]
        for component in ("params", "grads", "optimizer"):
            _within(m[component], f[component], 0.01)
    # the two ranks hold disjoint halves: their parameter partitions add up to the model (plus alignment padding)
    total = sum(r["measured"]["params"] for r in zero3)
    assert 4 * psi <= total <= 4 * psi * 1.01
