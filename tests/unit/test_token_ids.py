"""Token ids outside the vocabulary raise TokenIdError naming the id and the vocabulary size, wherever they enter.

The reference is torch itself: F.cross_entropy refuses such a target and F.embedding such an input id. Before the
check, the fused vocab-parallel loss clamped the target (a finite, wrong loss) and the embedding raised a raw
IndexError. tests/distributed/test_model_tp.py checks the same at tp=2 and tp=4 (every rank raises alike).
"""

import pytest
import torch
import torch.nn.functional as F

from modeling.config import ModelConfig
from modeling.generation import generate
from modeling.llama import LlamaForCausalLM
from parallel.cross_entropy import TokenIdError, vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

V = 64
CONFIG = ModelConfig(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    max_position_embeddings=32,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG)


def _targets(bad: int) -> torch.Tensor:
    t = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(1))
    t[0, 0] = -100  # the ignore index is allowed
    t[1, 3] = bad
    return t


@pytest.mark.parametrize("bad", [500, V, -7])
def test_out_of_range_target_raises_in_training(model, bad):
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(2))
    logits = model(ids).logits
    with pytest.raises((IndexError, RuntimeError)):  # what torch says about the same target
        F.cross_entropy(logits.reshape(-1, V), _targets(bad).reshape(-1), ignore_index=-100)
    with pytest.raises(TokenIdError, match=rf"target id {bad} is outside the vocabulary \[0, {V}\)"):
        model(ids, targets=_targets(bad))


@pytest.mark.parametrize("bad", [500, -7])
def test_out_of_range_target_raises_in_both_loss_functions(bad):
    x, w = torch.randn(16, 8), torch.randn(V, 8)
    with pytest.raises(TokenIdError, match=rf"target id {bad} .*\[0, {V}\)"):
        vocab_parallel_linear_cross_entropy(x, w, _targets(bad))
    with pytest.raises(TokenIdError, match=rf"target id {bad} .*\[0, {V}\)"):
        vocab_parallel_cross_entropy(x @ w.t(), _targets(bad))


def test_in_range_targets_with_ignore_index_give_torchs_loss(model):
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(3))
    targets = _targets(V - 1)
    expected = F.cross_entropy(model(ids).logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(model(ids, targets=targets).loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [V, 1000, -1])
def test_out_of_range_input_id_raises(model, bad):
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(4))
    ids[1, 5] = bad
    with pytest.raises(TokenIdError, match=rf"input id {bad} is outside the vocabulary \[0, {V}\)"):
        model(ids)


def test_out_of_range_prompt_id_raises_in_generation(model):
    with pytest.raises(TokenIdError, match=rf"input id {V + 3} is outside the vocabulary \[0, {V}\)"):
        generate(model, [[1, 2, 3], [4, V + 3]], max_new_tokens=2)
