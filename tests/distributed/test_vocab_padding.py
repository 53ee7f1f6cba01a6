"""A vocabulary that tp does not divide (251 at tp=2), padded Megatron-style, against transformers and tp=1.

The reference is transformers' LlamaForCausalLM with vocab_size 251, written with save_pretrained: at tp=2 on gloo
the model loaded from that directory gives transformers' logits (251 wide: the padding sliced off) and greedy ids;
its loss and gradients equal the tp=1 model's (tied and untied, with sequence parallelism), the padded rows' gradient
is zero; a checkpoint saved at tp=2 holds only the real rows, loads at tp=1 with the same weights, and `--to-hf`
writes vocab_size 251 back, which transformers loads into the reference's weights. A native checkpoint written at
tp=1 loads at tp=2. Training through pretrain_llama.py with model.init_from is tests/integration/test_vocab_padding.py.
"""

import json
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from modeling.config import ModelConfig
from modeling.convert import load_model, native_to_hf
from modeling.generation import generate
from modeling.llama import LlamaForCausalLM
from modeling.native_format import save_native
from parallel.state import ParallelState
from tests.dist_utils import run_distributed

V = 251  # odd: padded to 252 at tp=2
SEED = 4321
B, T = 2, 16
BASE = {
    "vocab_size": V,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
# last id V - 1 lives in the padded shard of the last rank: it must be an input and a target
PROMPTS = [[1, 5, 9, 200, V - 1], [1, 17], [3, 250, 8, 8, 100, 42, 7]]
MAX_NEW = 10


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    ids[0, 3], targets[1, 2], targets[0, 0] = V - 1, V - 1, -100
    return ids, targets


def _rank_rows(t: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """The rows of a full (V, ...) tensor that this rank holds (the last rank's shard ends in padding)."""
    local = -(-V // state.tp_size)
    return t[state.tp_rank * local : (state.tp_rank + 1) * local]


def _close(out: dict, name: str, a: torch.Tensor, e: torch.Tensor, tol: float = 1e-5) -> None:
    if a.shape != e.shape:
        out[name] = f"shape {tuple(a.shape)} != {tuple(e.shape)}"
        return
    err = ((a.double() - e.double()).abs().max() / e.double().abs().max().clamp(min=1.0)).item()
    out[name] = "ok" if err <= tol else f"error {err:.3g} > {tol:g}"


def _train_checks(out: dict, state: ParallelState, tie: bool) -> None:
    """Loss and gradients at tp equal tp=1's; the padded rows get a zero gradient."""
    config = ModelConfig(**BASE, tie_word_embeddings=tie)
    torch.manual_seed(SEED)
    ref = LlamaForCausalLM(config)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config, state)
    ids, targets = _batch()
    ref_loss = ref(ids, targets=targets).loss
    ref_loss.backward()
    loss = model(ids, targets=targets).loss
    loss.backward()
    tag = f"tie={tie} sp={state.sequence_parallel}"
    _close(out, f"{tag} loss", loss.detach(), ref_loss.detach())
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        expected = ref_params[name].grad
        if name in ("model.embed_tokens.weight", "lm_head.weight"):  # the padded vocabulary
            real = _rank_rows(expected, state)
            _close(out, f"{tag} grad {name}", p.grad[: real.shape[0]], real)
            pad = p.grad[real.shape[0] :]
            if pad.numel():
                out[f"{tag} padded grad {name} zero"] = "ok" if not pad.any() else f"{pad}"
        elif p.tp_split_dim is not None:
            _close(out, f"{tag} grad {name}", p.grad, expected.chunk(state.tp_size, p.tp_split_dim)[state.tp_rank])
        else:
            _close(out, f"{tag} grad {name}", p.grad, expected)


def _checks(rank: int, world_size: int, dirs: dict[str, str]) -> dict:
    state = ParallelState.build(tp=world_size)
    out: dict = {}
    try:
        for st, tie in (
            (state, False),
            (state, True),
            (ParallelState.build(tp=world_size, sequence_parallel=True), True),
        ):
            _train_checks(out, st, tie)

        model = load_model(dirs["hf"], state)
        ids, _ = _batch()
        with torch.no_grad():
            out["hf logits"] = model(ids).logits
        out["generated"] = generate(model, PROMPTS, max_new_tokens=MAX_NEW, temperature=0.0)
        sampled = generate(model, PROMPTS, max_new_tokens=MAX_NEW, temperature=5.0, generator=torch.Generator())
        out["sampled max id"] = max(max(s) for s in sampled)

        save_native(model, dirs["tp2_out"])
        dist.barrier()
        native_tp1 = load_model(dirs["tp1_native"], state)  # written at tp=1, its vocab does not divide tp=2
        with torch.no_grad():
            out["tp1 native logits at tp2"] = native_tp1(ids).logits
    except Exception:
        out["raised"] = traceback.format_exc()
    return out


def _hf_reference(hf_dir: Path):
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    cfg = LlamaConfig(**BASE, initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(SEED + 1)
    hf = HFLlama(cfg).eval()
    hf.save_pretrained(hf_dir)
    ids, _ = _batch()
    greedy = []
    with torch.no_grad():
        logits = hf(ids).logits
        for p in PROMPTS:
            x = torch.tensor([p])
            y = hf.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0
            )
            greedy.append(y[0, len(p) :].tolist())
    return hf, logits, greedy


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab_pad")
    hf, logits, greedy = _hf_reference(root / "hf")
    torch.manual_seed(SEED + 2)
    tp1 = LlamaForCausalLM(ModelConfig(**BASE))
    save_native(tp1, root / "tp1_native")
    dirs = {k: str(root / k) for k in ("hf", "tp2_out", "tp1_native")}
    results = run_distributed(_checks, 2, dirs)
    for r in results:
        assert "raised" not in r, r["raised"]
    return root, hf, logits, greedy, tp1, results


def test_loss_and_gradients_equal_tp1(tp2):
    results = tp2[-1]
    bad = [
        f"rank {i} {k}: {v}" for i, r in enumerate(results) for k, v in r.items() if isinstance(v, str) and v != "ok"
    ]
    assert not bad, "\n".join(bad)
    assert sum("padded grad" in k for k in results[-1]) == 4, "the last rank must hold padded rows (1 or 2 tensors)"


def test_hf_checkpoint_logits_and_greedy_ids_equal_transformers(tp2):
    _, _, logits, greedy, _, results = tp2
    for rank, r in enumerate(results):
        assert r["hf logits"].shape == (B, T, V)
        torch.testing.assert_close(r["hf logits"], logits, rtol=1e-5, atol=1e-5, msg=f"rank {rank}")
        assert r["generated"] == greedy, f"rank {rank}: {r['generated']} != transformers {greedy}"
        assert r["sampled max id"] < V


def test_saved_shards_hold_real_rows_and_export_writes_the_real_vocab(tp2):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    root, hf, logits, _, _, _ = tp2
    rows = []
    for rank in range(2):
        with safe_open(str(root / "tp2_out" / f"model-tp{rank:02d}-of-02.safetensors"), framework="pt") as f:
            rows.append(f.get_tensor("model.embed_tokens.weight").shape[0])
    assert rows == [126, 125]
    merged = load_model(root / "tp2_out")  # tp=1
    for name, t in hf.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], t, rtol=0, atol=0, msg=name)
    native_to_hf(root / "tp2_out", root / "hf_out")
    assert json.loads((root / "hf_out" / "config.json").read_text())["vocab_size"] == V
    back = AutoModelForCausalLM.from_pretrained(root / "hf_out").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(_batch()[0]).logits, logits, rtol=1e-5, atol=1e-5)


def test_tp1_native_checkpoint_loads_at_tp2(tp2):
    _, _, _, _, tp1, results = tp2
    with torch.no_grad():
        expected = tp1(_batch()[0]).logits
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["tp1 native logits at tp2"], expected, rtol=1e-5, atol=1e-5, msg=f"rank {rank}")
