"""Token ids outside the vocabulary raise TokenIdError naming the id and the vocabulary size, wherever they enter.

The reference is torch itself: F.cross_entropy refuses such a target and F.embedding such an input id. Before the
check, the fused vocab-parallel loss clamped the target (a finite, wrong loss) and the embedding raised a raw
IndexError. tests/distributed/test_model_tp.py checks the same at tp=2 and tp=4 (every rank raises alike).

Inside DeferredTokenIdChecks (a training step) the same checks read nothing until the step's read: the forward runs
on with the bad ids replaced (torch would refuse them), and the recorded ranges raise the same error afterwards.
tests/distributed/test_step_syncs.py checks it in the trainer at dp=2.
"""

import pytest
import torch
import torch.nn.functional as F

from modeling.config import ModelConfig
from modeling.generation import generate
from modeling.llama import LlamaForCausalLM
from parallel.cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from parallel.token_ids import DeferredTokenIdChecks, TokenIdError, check_token_ids
from tests.host_syncs import HostSyncs

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


def _read(ids: DeferredTokenIdChecks) -> tuple[float, list[float]]:
    flag, ranges = ids.values(torch.device("cpu"))
    return flag.item(), ranges.tolist()


def test_deferred_checks_read_nothing_in_the_forward_and_raise_at_the_step_read(model):
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(5))
    ids[1, 2] = V + 9
    with pytest.raises(IndexError):  # torch's own embedding refuses the id the deferred forward runs with
        F.embedding(ids, model.model.embed_tokens.weight)
    with HostSyncs() as syncs, DeferredTokenIdChecks() as checks:
        loss = model(ids, targets=_targets(-7)).loss
    assert not [c for c in syncs.calls if "token_ids.py" in c], syncs.calls
    assert torch.isfinite(loss), loss  # the bad ids were replaced, not read
    flag, ranges = _read(checks)
    assert flag == 1.0
    with pytest.raises(TokenIdError, match=rf"input id {V + 9} is outside the vocabulary \[0, {V}\)"):  # the first
        checks.raise_if_bad(ranges, anywhere=True)
    with pytest.raises(TokenIdError, match=rf"target id -7 is outside the vocabulary \[0, {V}\) and is not the ignore"):
        checks.raise_if_bad([0, V - 1, *ranges[2:]], anywhere=True)  # with the input's range made good


def test_deferred_checks_replace_bad_ids_and_pass_good_ones():
    good, bad = torch.tensor([0, 5, V - 1, -100]), torch.tensor([-1, 5, V, -100, 10 * V])
    with DeferredTokenIdChecks() as checks:
        assert torch.equal(check_token_ids(good, V, "target", ignore_index=-100), good)
        assert check_token_ids(bad, V, "target", ignore_index=-100).tolist() == [-100, 5, -100, -100, -100]
        assert check_token_ids(bad, V, "input").tolist() == [0, 5, V - 1, 0, V - 1]
    flag, ranges = _read(checks)
    assert flag == 1.0 and ranges == [0, V - 1, -1, 10 * V, -100, 10 * V]
    with pytest.raises(TokenIdError, match=r"target id -1 "):
        checks.raise_if_bad(ranges, anywhere=True)


def test_deferred_checks_without_a_bad_id_raise_only_for_another_rank():
    with DeferredTokenIdChecks() as checks:
        check_token_ids(torch.tensor([3, V - 1]), V, "input")
    flag, ranges = _read(checks)
    assert flag == 0.0
    checks.raise_if_bad(ranges, anywhere=False)
    with pytest.raises(TokenIdError, match="another rank read a token id outside the vocabulary"):
        checks.raise_if_bad(ranges, anywhere=True)
    with DeferredTokenIdChecks() as empty:  # no check at all (a middle pipeline stage): a zero flag, no ranges
        pass
    assert _read(empty) == (0.0, [])


def test_checks_read_at_once_again_after_a_deferral_ends_in_an_error():
    with pytest.raises(RuntimeError), DeferredTokenIdChecks():
        raise RuntimeError("a failed micro-batch")
    with pytest.raises(TokenIdError, match=rf"input id {V} "):
        check_token_ids(torch.tensor([V]), V, "input")
