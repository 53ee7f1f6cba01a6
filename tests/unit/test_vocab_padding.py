"""Padding a vocabulary that tp does not divide: the chunking, and the loss over a padded shard, on one process.

References are plain torch: torch.chunk of a zero-padded tensor, and F.cross_entropy over the real columns only.
The padding rows are given random (not zero) weights here, so a loss that let them into the softmax would differ.
tests/distributed/test_vocab_padding.py checks the model at tp=2 against transformers.
"""

import pytest
import torch
import torch.nn.functional as F

from modeling.config import ModelConfig
from parallel.cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from parallel.layers import padded_size, strip_padding, tp_chunk


@pytest.mark.parametrize(("n", "tp"), [(251, 2), (10, 4), (5, 4), (8, 4), (1, 4)])
def test_tp_chunk_pads_like_torch_chunk_and_strip_restores_the_rows(n, tp):
    full = torch.randn(n, 3)
    padded = torch.cat([full, torch.zeros(padded_size(n, tp) - n, 3)])
    assert padded.shape[0] % tp == 0 and padded.shape[0] - n < tp
    chunks = [tp_chunk(full, 0, r, tp) for r in range(tp)]
    for r in range(tp):
        assert torch.equal(chunks[r], padded.chunk(tp)[r])
    real = [strip_padding(c, 0, r, n) for r, c in enumerate(chunks)]
    assert torch.equal(torch.cat(real), full)
    assert all(torch.equal(a, tp_chunk(full, 0, r, tp, pad=False)) for r, a in enumerate(real))


@pytest.mark.parametrize("fused", [True, False])
def test_loss_over_a_padded_shard_is_the_loss_over_the_real_vocabulary(fused):
    V, pad, H = 13, 3, 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, H, generator=g, requires_grad=True)
    w = torch.randn(V + pad, H, generator=g, requires_grad=True)  # padding rows non-zero on purpose
    target = torch.randint(0, V, (10,), generator=g)
    target[[2, 7]] = -100
    if fused:
        loss = vocab_parallel_linear_cross_entropy(x, w, target, vocab_size=V)
    else:
        loss = vocab_parallel_cross_entropy(x @ w.t(), target, vocab_size=V)
    loss.backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach()[:V].clone().requires_grad_()
    ref = F.cross_entropy(x_ref @ w_ref.t(), target, ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad[:V], w_ref.grad, rtol=1e-5, atol=1e-6)
    assert not w.grad[V:].any(), "the padding rows must get no gradient"


def test_config_accepts_a_vocabulary_tp_does_not_divide():
    config = ModelConfig(vocab_size=32001, hidden_size=64, intermediate_size=128, num_attention_heads=4)
    config.validate_parallel(2)
    config.validate_parallel(4)
    assert config.vocab_size == 32001  # the real size stays the config's: padding is the layers' business
