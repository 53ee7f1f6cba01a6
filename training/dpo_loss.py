"""Preference losses (DPO, IPO) from sequence log-probabilities: pure tensor math, no process groups.

A batch holds B prompts, each with a chosen (preferred) and a rejected response. With the policy's and the frozen
reference's log-probabilities of each response, pc = log pi(y_c | x), pr = log pi(y_r | x), rc and rr the
reference's, the implicit reward margin is

    h = (pc - pr) - (rc - rr)

and the losses, per pair, are

    sigmoid (DPO: Rafailov et al. 2023, "Direct Preference Optimization", eq. 7; with label smoothing eps the
    conservative DPO of Mitchell 2023, "A note on DPO with noisy preferences", as TRL's DPOTrainer wrote it up
    to 0.x; TRL 1.x's "sigmoid" dropped the smoothing):
        loss = -(1 - eps) * log sigmoid(beta h) - eps * log sigmoid(-beta h)
    ipo (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences", eq. 17):
        loss = (h - 1 / (2 beta))^2

DPO takes the sums of the response tokens' log-probabilities; for IPO TRL (and this project) take their means
over the response tokens (length-normalised), which the caller passes in. The rewards logged beside the loss are
beta * (pc - rc) for the chosen and beta * (pr - rr) for the rejected responses, detached from the graph.

The per-token log-probabilities come from LlamaForCausalLM(ids, targets=..., per_token=True).token_logps: under
tensor parallelism from the vocab-parallel logits, never gathered (parallel.cross_entropy, reduction="none").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from configs.sections import DPO_LOSSES
from parallel.cross_entropy import IGNORE_INDEX

LOSSES = DPO_LOSSES  # configs.sections checks dpo.loss against the same names


@dataclass
class PreferenceOutput:
    """Per-pair losses and implicit rewards of a batch of B preference pairs, each (B,)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def sequence_logps(token_logps: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) per-token log-probabilities and their (B, T) targets -> (sum (B,), count (B,)) over targets != -100.

    The mean log-probability (IPO's length normalisation) is sum / count.clamp(min=1); the count is fp32.
    """
    if token_logps.shape != targets.shape:
        raise ValueError(
            f"token_logps {tuple(token_logps.shape)} and targets {tuple(targets.shape)} must have the same (B, T) "
            f"shape: pass the targets the log-probabilities were computed for"
        )
    valid = targets != IGNORE_INDEX  # (B, T)
    total = torch.where(valid, token_logps, 0.0).sum(dim=-1)  # (B,)
    return total, valid.sum(dim=-1).to(token_logps.dtype)


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    """Per-pair DPO ("sigmoid") or IPO ("ipo") losses from (B,) sequence log-probabilities (module docstring).

    Inputs are what the caller chose as a sequence's log-probability: sums for DPO, per-token means for IPO.
    `label_smoothing` (eps in [0, 0.5)) applies to the sigmoid loss only. The reference's log-probabilities carry
    no gradient in practice (they come from a frozen model or a file); the policy's do.
    """
    if loss not in LOSSES:
        raise ValueError(f"dpo.loss={loss!r} is not a preference loss this project knows: choose one of {LOSSES}")
    if beta <= 0:
        raise ValueError(f"dpo.beta={beta} must be positive (TRL's default is 0.1)")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo.label_smoothing={label_smoothing} must be in [0, 0.5) (0: plain DPO)")
    if label_smoothing and loss != "sigmoid":
        raise ValueError(f"dpo.label_smoothing applies to dpo.loss=sigmoid only (got loss={loss!r}): set it to 0")
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)  # (B,)
    if loss == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return PreferenceOutput(losses, chosen_rewards, rejected_rewards)


def dpo_batch_metrics(
    out: PreferenceOutput, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Scalar metric tensors of a batch, left on their device (no host sync): the names TRL logs.

    rewards/chosen, rewards/rejected (means of the implicit rewards), rewards/margin (mean of their difference),
    rewards/accuracy (fraction of pairs whose chosen reward is strictly above the rejected one), logps/chosen and
    logps/rejected (means of the policy's sequence log-probabilities, detached).
    """
    chosen, rejected = out.chosen_rewards, out.rejected_rewards
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margin": (chosen - rejected).mean(),
        "rewards/accuracy": (chosen > rejected).float().mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }
