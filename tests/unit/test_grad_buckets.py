"""parallel.engine.reduce_in_buckets: every gradient reduced once, in buckets no larger than BUCKET_ELEMENTS.

The reduction is a stand-in for the collectives (x 3 in place), so the expected gradients are known exactly; the
flat buffers are seen by recording torch.cat's outputs. The collectives themselves are tested on 2 ranks in
tests/distributed/test_engines.py (the expert gradients' mean).
"""

import torch

import parallel.engine
from parallel.engine import reduce_in_buckets

BUCKET = 40


def _recording_cat(monkeypatch) -> list[int]:
    sizes, cat = [], torch.cat

    def recording(tensors, *args, **kwargs):
        out = cat(tensors, *args, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "cat", recording)
    return sizes


def test_buckets_are_bounded_and_every_gradient_is_reduced_once(monkeypatch):
    monkeypatch.setattr(parallel.engine, "BUCKET_ELEMENTS", BUCKET)
    torch.manual_seed(0)
    shapes = [(7,), (5, 6), (50,), (3, 4), (2, 2, 3), (41,), (39,), (1,)]  # (50,) and (41,) exceed the bucket
    grads = [torch.randn(s) for s in shapes]
    grads.append(torch.randn(6, 5).t())  # a non-contiguous gradient: packed, then written back through its strides
    grads.append(torch.randn(8, dtype=torch.float64))  # another dtype starts its own bucket
    want = [g * 3 for g in grads]
    seen = []

    def reduce(flat: torch.Tensor) -> None:
        seen.append(flat)
        flat.mul_(3)

    sizes = _recording_cat(monkeypatch)
    reduce_in_buckets(grads, reduce)
    for g, w in zip(grads, want, strict=True):
        assert torch.equal(g, w)
    assert sizes and max(sizes) <= BUCKET, sizes  # no flat copy of all the float32 ones (222 elements)
    # buckets in order: 7+30 | 50 alone, in place | 12+12 | 41 alone | 39+1 | the transposed 30 | float64 8
    assert [f.numel() for f in seen] == [37, 50, 24, 41, 40, 30, 8]
    assert seen[1] is grads[2] and seen[3] is grads[5]  # reduced in their own storage
    assert seen[-1].dtype == torch.float64 and all(f.dtype == torch.float32 for f in seen[:-1])


def test_no_gradients_no_reduction():
    seen = []
    reduce_in_buckets([], seen.append)
    assert seen == []
