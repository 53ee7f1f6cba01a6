"""DPO and IPO losses and their gradients against transformers' logits with the published formulas written out.

The reference: transformers' LlamaForCausalLM (the policy, and a perturbed copy as the reference model, so the
margin h is not 0) -> float64 log_softmax -> gather -> masked sums (means for IPO) -> the loss of Rafailov et al.
2023 (with conservative-DPO label smoothing, as TRL) or Azar et al. 2023 eq. 17, written below by hand. Ours: the
native model on the same weights, model(ids, targets=..., per_token=True) -> sequence_logps -> preference_loss.
The per-token mode of the vocab-parallel cross-entropy (reduction="none") is checked against F.cross_entropy.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers

from modeling import context
from modeling.config import ModelConfig
from modeling.llama import LlamaForCausalLM
from parallel import cross_entropy
from parallel.cross_entropy import (
    _VocabParallelCrossEntropy,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)
from training.dpo_loss import LOSSES, PreferenceOutput, dpo_batch_metrics, preference_loss, sequence_logps

CONFIG = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
PAIRS, T = 4, 16
# (prompt length, chosen length, rejected length) per pair; the rest of each row is padding
LENGTHS = [(3, 6, 9), (5, 11, 4), (2, 13, 13), (7, 1, 8)]


def _hf_model(seed: int) -> transformers.LlamaForCausalLM:
    """A transformers Llama with every parameter randomised (norm weights around 1)."""
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**copy.deepcopy(ModelConfig(**CONFIG).to_hf_dict())))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)
    return hf


def _perturbed(hf: transformers.LlamaForCausalLM) -> transformers.LlamaForCausalLM:
    """A copy of `hf` with every weight moved a little: the reference model, so that h != 0."""
    ref = copy.deepcopy(hf)
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.03 * torch.randn(p.shape, generator=gen))
    return ref.requires_grad_(False)


def _ours_from(hf: transformers.LlamaForCausalLM) -> LlamaForCausalLM:
    model = LlamaForCausalLM(ModelConfig.from_hf_dict(hf.config.to_dict()))
    model.load_state_dict(hf.state_dict())
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(2 PAIRS, T) ids, chosen rows first, and their shifted targets: -100 on the prompt and the padding."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.zeros(2 * PAIRS, T, dtype=torch.long)
    targets = torch.full((2 * PAIRS, T), -100)
    for i, (prompt_len, *responses) in enumerate(LENGTHS):
        prompt = torch.randint(0, CONFIG["vocab_size"], (prompt_len,), generator=gen)
        for half, n in enumerate(responses):
            row = half * PAIRS + i
            response = torch.randint(0, CONFIG["vocab_size"], (n,), generator=gen)
            ids[row, : prompt_len + n] = torch.cat([prompt, response])
            # position t predicts token t + 1: the response tokens are predicted from positions prompt_len - 1 ...
            targets[row, prompt_len - 1 : prompt_len + n - 1] = response
    return ids, targets


def _reference_logps(hf: transformers.LlamaForCausalLM, ids: torch.Tensor, targets: torch.Tensor):
    """(sums, means) of the targets' log-probabilities, float64 from transformers' logits."""
    logp = hf(ids).logits.double().log_softmax(-1)  # (2P, T, V)
    valid = targets != -100
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (2P, T)
    sums = (picked * valid).sum(-1)
    return sums, sums / valid.sum(-1)


def _published_loss(pc, pr, rc, rr, beta: float, kind: str, eps: float) -> torch.Tensor:
    """Mean over pairs of DPO (Rafailov et al. 2023 eq. 7, conservative with eps) or IPO (Azar et al. 2023 eq. 17)."""
    h = (pc - pr) - (rc - rr)
    if kind == "ipo":
        return ((h - 1 / (2 * beta)) ** 2).mean()
    sig = 1 / (1 + torch.exp(-beta * h))
    return (-(1 - eps) * torch.log(sig) - eps * torch.log(1 - sig)).mean()


@pytest.mark.parametrize(
    ("kind", "beta", "eps"), [("sigmoid", 0.5, 0.0), ("sigmoid", 0.5, 0.1), ("ipo", 0.5, 0.0)], ids=str
)
def test_loss_and_gradients_equal_transformers_with_the_published_formula(kind, beta, eps):
    hf = _hf_model(seed=0)
    hf_ref = _perturbed(hf)
    ours, ours_ref = _ours_from(hf), _ours_from(hf_ref)
    ids, targets = _batch()
    mean = kind == "ipo"  # IPO is length-normalised (TRL): per-token means

    sums, means = _reference_logps(hf, ids, targets)
    with torch.no_grad():
        ref_sums, ref_means = _reference_logps(hf_ref, ids, targets)
    pol, ref = (means, ref_means) if mean else (sums, ref_sums)
    expected = _published_loss(pol[:PAIRS], pol[PAIRS:], ref[:PAIRS], ref[PAIRS:], beta, kind, eps)
    expected.backward()
    h = (pol[:PAIRS] - pol[PAIRS:]) - (ref[:PAIRS] - ref[PAIRS:])
    assert h.abs().min() > 1e-2, "the reference must differ from the policy, or the test checks only h = 0"

    out = ours(ids, targets=targets, per_token=True)
    assert out.loss is None and out.token_logps.shape == (2 * PAIRS, T) and out.token_logps.dtype == torch.float32
    assert (out.token_logps[targets == -100] == 0).all()
    total, count = sequence_logps(out.token_logps, targets)
    with torch.no_grad():
        ref_total, ref_count = sequence_logps(ours_ref(ids, targets=targets, per_token=True).token_logps, targets)
    if mean:
        total, ref_total = total / count, ref_total / ref_count
    pref = preference_loss(
        total[:PAIRS], total[PAIRS:], ref_total[:PAIRS], ref_total[PAIRS:], beta=beta, loss=kind, label_smoothing=eps
    )
    loss = pref.losses.mean()
    loss.backward()

    torch.testing.assert_close(loss.double(), expected.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(total.detach().double(), pol.detach(), atol=1e-5, rtol=1e-6)
    nll = -(sums.detach().sum() / (targets != -100).sum())
    torch.testing.assert_close(out.ce_loss.double(), nll, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pref.chosen_rewards.double(), beta * (pol - ref)[:PAIRS].detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(pref.rejected_rewards.double(), beta * (pol - ref)[PAIRS:].detach(), atol=1e-5, rtol=0)
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    for name, p in ours.named_parameters():
        g = hf_grads[name]
        assert g is not None and p.grad is not None, name
        assert g.abs().max() > 0, name
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-4 * g.abs().max().item(), msg=name)


def test_per_token_needs_targets_and_no_context_parallelism(monkeypatch):
    model = LlamaForCausalLM(ModelConfig(**CONFIG))
    ids, targets = _batch()
    with pytest.raises(ValueError, match="pass targets"):
        model(ids, per_token=True)
    monkeypatch.setattr(context, "active", lambda state: True)
    with pytest.raises(ValueError, match=r"parallel\.cp=1"):
        model.finish(torch.zeros(2 * PAIRS, T, CONFIG["hidden_size"]), targets, per_token=True)


def test_preference_loss_rejects_unknown_settings():
    x = torch.zeros(3)
    assert LOSSES == ("sigmoid", "ipo")
    with pytest.raises(ValueError, match="hinge"):
        preference_loss(x, x, x, x, beta=0.1, loss="hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(x, x, x, x, beta=0.1, loss="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        preference_loss(x, x, x, x, beta=0.0)


def test_batch_metrics():
    out = PreferenceOutput(
        losses=torch.zeros(4),
        chosen_rewards=torch.tensor([1.0, 0.5, -1.0, 2.0]),
        rejected_rewards=torch.tensor([0.0, 0.5, 0.0, -1.0]),  # a tie is not a correct pair (strictly greater)
    )
    policy_chosen = torch.tensor([-3.0, -4.0, -5.0, -6.0], requires_grad=True)
    m = dpo_batch_metrics(out, policy_chosen, torch.tensor([-7.0, -8.0, -9.0, -10.0]))
    expected = {
        "rewards/chosen": 0.625,
        "rewards/rejected": -0.125,
        "rewards/margin": 0.75,
        "rewards/accuracy": 0.5,
        "logps/chosen": -4.5,
        "logps/rejected": -8.5,
    }
    assert {k: v.item() for k, v in m.items()} == expected
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def test_sequence_logps_masks_ignored_targets():
    token_logps = torch.tensor([[-1.0, -2.0, -4.0], [-8.0, -16.0, -32.0]])
    targets = torch.tensor([[-100, 5, 6], [7, -100, -100]])
    total, count = sequence_logps(token_logps, targets)
    assert total.tolist() == [-6.0, -8.0] and count.tolist() == [2.0, 1.0]
    with pytest.raises(ValueError, match="same"):
        sequence_logps(token_logps, targets[:, :2])


# ---- the per-token mode of the vocab-parallel cross-entropy ----

V, V_PAD, H, N = 13, 16, 6, 24  # a vocabulary of 13 padded to 16 columns


def _ce_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g) * 2
    w = torch.randn(V_PAD, H, generator=g)
    w[V:] = 0.0  # the padding rows, as parallel.layers pads them
    t = torch.randint(0, V, (N,), generator=g)
    t[[0, 5, 6]] = -100
    t[1] = V - 1  # the last real id
    upstream = torch.randn(N, generator=g)
    return x, w, t, upstream


@pytest.mark.parametrize("path", ["logits", "internal", "fused"])
def test_per_token_cross_entropy_equals_f_cross_entropy_with_a_padded_vocabulary(path):
    x, w, t, upstream = _ce_inputs()
    x_ref, w_ref = x.double().requires_grad_(), w.double().requires_grad_()
    expected = F.cross_entropy(x_ref @ w_ref[:V].t(), t, reduction="none")
    (expected * upstream.double()).sum().backward()
    x_in, w_in = x.clone().requires_grad_(), w.clone().requires_grad_()
    if path == "logits":  # group size 1: F.cross_entropy on the real columns
        nll = vocab_parallel_cross_entropy(x_in @ w_in.t(), t, vocab_size=V, reduction="none")
    elif path == "internal":  # the vocab-parallel kernel itself, with the padding masked
        nll = _VocabParallelCrossEntropy.apply(x_in @ w_in.t(), t, None, -100, V, True, "none")
    else:
        nll = vocab_parallel_linear_cross_entropy(x_in, w_in, t, vocab_size=V, reduction="none")
    nll.backward(upstream)
    assert nll.shape == (N,) and nll.dtype == torch.float32
    assert (nll[t == -100] == 0).all()
    torch.testing.assert_close(nll.double(), expected.detach(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(x_in.grad.double(), x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w_in.grad.double(), w_ref.grad, atol=1e-5, rtol=1e-5)
    assert (w_in.grad[V:] == 0).all() and (x_in.grad[t == -100] == 0).all()


@pytest.mark.parametrize("chunk_rows", [None, 5], ids=["one-chunk", "chunks-of-5-rows"])
def test_per_token_fused_cross_entropy_in_bf16(chunk_rows, monkeypatch):
    if chunk_rows is not None:  # the fp32 copy of the bf16 logits in row chunks (24 rows = 4 x 5 + 4)
        monkeypatch.setattr(cross_entropy, "_CHUNK_BYTES", 4 * V_PAD * chunk_rows)
    x, w, t, upstream = _ce_inputs(seed=1)
    x_ref, w_ref = x.double().requires_grad_(), w.double().requires_grad_()
    expected = F.cross_entropy(x_ref @ w_ref[:V].t(), t, reduction="none")
    (expected * upstream.double()).sum().backward()
    x_in, w_in = x.clone().requires_grad_(), w.clone().requires_grad_()
    nll = vocab_parallel_linear_cross_entropy(
        x_in, w_in, t, vocab_size=V, matmul_dtype=torch.bfloat16, reduction="none"
    )
    nll.backward(upstream)
    assert nll.dtype == torch.float32 and x_in.grad.dtype == torch.float32
    # bf16 logits (8 bits of mantissa) of size ~5: errors of a few 1e-2 in the log-probabilities
    torch.testing.assert_close(nll.double(), expected.detach(), atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(x_in.grad.double(), x_ref.grad, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(w_in.grad.double(), w_ref.grad, atol=5e-2, rtol=2e-2)


def test_mean_reduction_still_equals_f_cross_entropy():
    x, w, t, _ = _ce_inputs(seed=2)
    x_in, w_in = x.clone().requires_grad_(), w.clone().requires_grad_()
    x_ref, w_ref = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(x_in, w_in, t, vocab_size=V)
    expected = F.cross_entropy(x_ref @ w_ref[:V].t(), t)
    loss.backward()
    expected.backward()
    assert loss.dim() == 0
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x_in.grad, x_ref.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w_in.grad, w_ref.grad, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        vocab_parallel_cross_entropy(x @ w.t(), t, reduction="sum")
