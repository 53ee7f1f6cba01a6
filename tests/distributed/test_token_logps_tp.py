"""Per-token log-probabilities at tp=2 on gloo equal tp=1's, from the vocab-parallel logits (never gathered).

The vocabulary (97) is one tp=2 does not divide (padded to 98). Model level: LlamaForCausalLM(ids, targets=...,
per_token=True) at tp=2, with and without sequence parallelism (tied and untied head), against the tp=1 model built
from the same seed (the same full weights): token_logps, ce_loss and every parameter's gradient shard under a
random upstream gradient on the log-probabilities. Head level: VocabParallelHead(x, targets, reduction="none") on
each of its branches (fused matmul + loss, with sequence parallelism; a bias, the unfused loss; gather_output)
against float64 F.linear + F.cross_entropy(reduction="none") on the full weight: per-token losses, input and
weight (and bias) gradients.
"""

import traceback

import pytest
import torch
import torch.nn.functional as F

from modeling.config import ModelConfig
from modeling.llama import LlamaForCausalLM
from parallel.layers import VocabParallelHead, tp_chunk
from parallel.state import ParallelState
from tests.dist_utils import run_distributed

V = 97  # odd: padded to 98 at tp=2, the last rank's shard ends in a padding row
B, T, H = 2, 8, 32
SEED = 2024
CONFIG = {
    "vocab_size": V,
    "hidden_size": H,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
}


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T) ids, targets (prompt and padding -100, the last real id among them), upstream gradient."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :3], targets[1, :2], targets[1, -1] = -100, -100, -100
    targets[0, 4], ids[1, 3] = V - 1, V - 1
    return ids, targets, torch.randn(B, T, generator=g)


def _close(out: dict, name: str, a: torch.Tensor | None, e: torch.Tensor, tol: float = 1e-5) -> None:
    if a is None or a.shape != e.shape:
        out[name] = f"got {None if a is None else tuple(a.shape)}, expected shape {tuple(e.shape)}"
        return
    err = ((a.double() - e.double()).abs().max() / e.double().abs().max().clamp(min=1.0)).item()
    out[name] = "ok" if err <= tol else f"error {err:.3g} > {tol:g}"


def _shard(full: torch.Tensor, p: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """The slice of a full (unpadded) tensor that parameter `p` holds on this rank, padding rows included."""
    if p.tp_split_dim is None:
        return full
    return tp_chunk(full, p.tp_split_dim, state.tp_rank, state.tp_size)


def _model_checks(out: dict, state: ParallelState, tie: bool) -> None:
    """token_logps, ce_loss and gradient shards at tp equal the tp=1 model's on the same full weights."""
    config = ModelConfig(**CONFIG, tie_word_embeddings=tie)
    torch.manual_seed(SEED)
    ref = LlamaForCausalLM(config)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config, state)
    ids, targets, upstream = _batch()
    tag = f"model tie={tie} sp={state.sequence_parallel}"
    expected = ref(ids, targets=targets, per_token=True)
    (expected.token_logps * upstream).sum().backward()
    got = model(ids, targets=targets, per_token=True)
    (got.token_logps * upstream).sum().backward()
    _close(out, f"{tag} token_logps", got.token_logps.detach(), expected.token_logps.detach())
    _close(out, f"{tag} ce_loss", got.ce_loss.detach(), expected.ce_loss.detach())
    out[f"{tag} ignored targets 0"] = "ok" if not got.token_logps[targets == -100].any() else "non-zero"
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        _close(out, f"{tag} grad {name}", p.grad, _shard(ref_params[name].grad, p, state))


def _head_checks(out: dict, state: ParallelState, branch: str) -> None:
    """VocabParallelHead(x, targets, reduction="none") against float64 F.linear + F.cross_entropy on the full weight."""
    g = torch.Generator().manual_seed(11)
    x, weight, bias = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g), torch.randn(V, generator=g)
    _, targets, upstream = _batch()
    x_ref, w_ref, b_ref = (t.double().requires_grad_() for t in (x, weight, bias))
    logits = F.linear(x_ref, w_ref, b_ref if branch == "bias" else None)  # (B, T, V)
    expected = F.cross_entropy(logits.view(-1, V), targets.view(-1), reduction="none")  # (B*T,)
    (expected * upstream.view(-1).double()).sum().backward()

    head = VocabParallelHead(H, V, state=state, bias=branch == "bias", gather_output=branch == "gather")
    with torch.no_grad():
        head.weight.copy_(_shard(weight, head.weight, state))
        if head.bias is not None:
            head.bias.copy_(_shard(bias, head.bias, state))
    sp = state.sequence_parallel
    x_in = (x.chunk(state.tp_size, 1)[state.tp_rank] if sp else x).clone().requires_grad_()  # (B, T/tp, H) under sp
    nll = head(x_in, targets, reduction="none")
    nll.backward(upstream.view(-1))
    tag = f"head {branch} sp={sp}"
    _close(out, f"{tag} per-token loss", nll.detach(), expected.detach())
    x_grad = x_ref.grad.chunk(state.tp_size, 1)[state.tp_rank] if sp else x_ref.grad
    _close(out, f"{tag} input grad", x_in.grad, x_grad)
    _close(out, f"{tag} weight grad shard", head.weight.grad, _shard(w_ref.grad, head.weight, state))
    if head.bias is not None:
        _close(out, f"{tag} bias grad shard", head.bias.grad, _shard(b_ref.grad, head.bias, state))


def _checks(rank: int, world_size: int) -> dict:
    state = ParallelState.build(tp=world_size)
    sp = ParallelState.build(tp=world_size, sequence_parallel=True)
    out: dict = {}
    try:
        _model_checks(out, state, tie=False)
        _model_checks(out, sp, tie=True)
        _head_checks(out, state, "fused")
        _head_checks(out, sp, "fused")
        _head_checks(out, state, "bias")
        _head_checks(out, state, "gather")
    except Exception:
        out["raised"] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_checks, 2)


def test_per_token_logps_and_gradients_at_tp2_equal_tp1(results):
    for r in results:
        assert "raised" not in r, r["raised"]
    bad = [f"rank {i} {k}: {v}" for i, r in enumerate(results) for k, v in r.items() if v != "ok"]
    assert not bad, "\n".join(bad)
    names = results[-1]
    assert sum(k.startswith("model") for k in names) > 20 and sum(k.startswith("head") for k in names) == 13
