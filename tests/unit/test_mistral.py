"""Sliding-window attention and Hugging Face Mistral: the native model equals transformers' MistralForCausalLM.

transformers is the independent reference: a tiny MistralForCausalLM (random weights, sliding_window=4, shorter
than the 16-token prompts) saved with save_pretrained loads through modeling.convert with the same logits, the same
training loss and gradients, and the same greedy ids (KV cache, many new tokens); its export loads back into
transformers with the same logits. Document attention with a window is checked against transformers run on each
document alone, and every mask against the rule written out element by element.
"""

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
import transformers

from configs.architecture import resolve_model_config
from configs.schema import load_config
from configs.sections import ConfigError as TrainConfigError
from modeling.config import CheckpointError, ConfigError, ModelConfig
from modeling.convert import load_checkpoint, load_model, save_hf_checkpoint
from modeling.generation import KVCache, generate
from modeling.llama import LlamaForCausalLM, causal_mask, document_causal_mask

WINDOW = 4
BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
PROMPTS = [[1, 5, 9, 100, 37, 8, 8, 64, 3, 77, 12, 90, 41, 6, 2, 55], [1, 17, 33, 4, 99, 120, 7, 19, 28, 60, 11]]
MAX_NEW = 24
TOL = 1e-5


def _rule(i: int, j: int, window: int | None, docs: list[int] | None = None) -> bool:
    """The mask rule, one pair at a time: causal, the same document, and i - j < window."""
    return j <= i and (window is None or i - j < window) and (docs is None or docs[i] == docs[j])


def _hf_mistral(window: int | None = WINDOW, seed: int = 0) -> transformers.MistralForCausalLM:
    """A transformers Mistral with every parameter randomised (norm weights around 1)."""
    cfg = transformers.MistralConfig(**BASE, sliding_window=window, bos_token_id=1, eos_token_id=2)
    hf = transformers.MistralForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)
    return hf.eval()


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> float:
    """max |a - b| relative to max(1, max |b|)."""
    err = (a.detach().double() - b.detach().double()).abs().max().item()
    return err / max(1.0, b.detach().abs().max().item())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mistral")
    hf = _hf_mistral()
    hf.save_pretrained(path)
    return path, hf


def _ids(seed: int = 3, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_mistral_directory_loads_with_its_window_and_equal_logits(hf_dir):
    path, hf = hf_dir
    saved = json.loads((path / "config.json").read_text())
    assert saved["model_type"] == "mistral" and saved["sliding_window"] == WINDOW
    model = load_model(path).eval()
    assert model.config.sliding_window == WINDOW
    ids = _ids()
    with torch.no_grad():
        logits, expected = model(ids).logits, hf(ids).logits
        full = LlamaForCausalLM(dataclasses.replace(model.config, sliding_window=None))
        full.load_state_dict(model.state_dict())
        unwindowed = full.eval()(ids).logits
    assert _close(logits, expected) < TOL
    assert _close(unwindowed, expected) > 1e-2, "the window changes nothing at this length: the test is vacuous"


def test_greedy_generation_equals_transformers_beyond_the_window(hf_dir):
    path, hf = hf_dir
    model = load_model(path)
    expected = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([p])
            out = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0
            )
            expected.append(out[0, len(p) :].tolist())
            steps = hf(out[:, :-1]).logits[0, len(p) - 1 :]  # (new, V): greedy must not hinge on a near-tie
            top2 = steps.topk(2, dim=-1).values
            assert (top2[:, 0] - top2[:, 1]).min() > 1e-3, "reference greedy path has a near-tie; change the seed"
    assert all(len(e) == MAX_NEW for e in expected), "the reference stopped at EOS early: change the seed"
    one_by_one = [generate(model, [p], max_new_tokens=MAX_NEW) for p in PROMPTS]
    assert [g[0] for g in one_by_one] == expected
    assert generate(model, PROMPTS, max_new_tokens=MAX_NEW) == expected  # batched: left padding + window


def test_export_loads_in_transformers_as_mistral_with_equal_logits(hf_dir, tmp_path):
    path, hf = hf_dir
    config, state_dict = load_checkpoint(path)
    save_hf_checkpoint(config, state_dict, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["MistralForCausalLM"] and saved["sliding_window"] == WINDOW
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(back, transformers.MistralForCausalLM) and back.config.sliding_window == WINDOW
    ids = _ids(seed=5)
    with torch.no_grad():
        assert _close(back(ids).logits, hf(ids).logits) < TOL
    assert ModelConfig.load(tmp_path / "config.json") == config  # the native config.json round trip too


def test_training_loss_and_grads_equal_transformers(hf_dir):
    path, hf = hf_dir
    hf = copy.deepcopy(hf).train()
    model = load_model(path).train()
    ids, targets = _ids(seed=7), _ids(seed=8)
    targets[0, :3] = -100
    loss = model(ids, targets=targets).loss
    loss.backward()
    logits = hf(ids).logits  # (B, T, V)
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    ref.backward()
    assert abs(loss.item() - ref.item()) < TOL
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        assert _close(p.grad, hf_params[name].grad) < TOL, name


def test_document_attention_with_window_equals_each_document_alone(hf_dir):
    """Packed documents under the window equal transformers' Mistral on each document alone: logits, loss, grads."""
    path, hf = hf_dir
    hf = copy.deepcopy(hf).train()
    model = load_model(path).train()
    lengths = [[7, 3, 14], [16, 8]]  # documents longer and shorter than the window
    T = 24
    ids, targets = _ids(seed=9, seq=T), _ids(seed=10, seq=T)
    docs = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in lengths])  # (B, T)
    loss = model(ids, targets=targets, document_ids=docs).loss
    loss.backward()
    with torch.no_grad():
        packed = model(ids, document_ids=docs).logits  # (B, T, V)
    ce_sum = 0.0
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            alone = hf(ids[b : b + 1, start : start + n]).logits[0]  # (n, V), positions from 0
            assert _close(packed[b, start : start + n], alone) < TOL
            ce_sum = ce_sum + F.cross_entropy(alone, targets[b, start : start + n], reduction="sum")
            start += n
    ref = ce_sum / targets.numel()
    ref.backward()
    assert abs(loss.item() - ref.item()) < TOL
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        assert _close(p.grad, hf_params[name].grad) < TOL, name


@pytest.mark.parametrize("window", [None, 1, 3, 40])
def test_masks_follow_the_rule_element_by_element(window):
    T = 11
    docs = [0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    idx = torch.arange(T)
    expected = torch.tensor([[_rule(i, j, window) for j in range(T)] for i in range(T)])
    assert torch.equal(causal_mask(idx, idx, window), expected)
    expected_docs = torch.tensor([[_rule(i, j, window, docs) for j in range(T)] for i in range(T)])
    assert torch.equal(document_causal_mask(torch.tensor([docs]), window)[0, 0], expected_docs)

    # the KV cache: 6 cached slots (the first 2 padding), 3 new queries at slots 6..8
    model = LlamaForCausalLM(ModelConfig(**BASE, sliding_window=window))
    cache = KVCache(model, batch_size=1, max_len=12)
    cache.valid[0, 2:9] = True
    cache.length = 6
    mask = cache.attention_mask(3)[0, 0]  # (3, 9)
    want = torch.tensor([[_rule(i, j, window) and j >= 2 for j in range(9)] for i in range(6, 9)])
    assert torch.equal(mask, want)


def test_attention_inputs_keep_the_fast_path_without_window_or_documents():
    model = LlamaForCausalLM(ModelConfig(**BASE))
    _, mask = model.attention_inputs((2, 16), torch.device("cpu"), None, None, None)
    assert mask is None
    windowed = LlamaForCausalLM(ModelConfig(**BASE, sliding_window=WINDOW))
    _, mask = windowed.attention_inputs((2, 16), torch.device("cpu"), None, None, None)
    idx = torch.arange(16)
    assert mask.shape == (1, 1, 16, 16) and torch.equal(mask[0, 0], causal_mask(idx, idx, WINDOW))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4"])
def test_error_bad_sliding_window_names_the_key(bad):
    with pytest.raises(ConfigError, match=r"model\.sliding_window="):
        ModelConfig(**BASE, sliding_window=bad)


def test_sliding_window_in_training_config_overrides():
    base = ["model.preset=tiny", "data.train=shards/*.jsonl.zst", "data.tokenizer=tok"]
    assert resolve_model_config(load_config(None, [*base, "model.sliding_window=64"]), None).sliding_window == 64
    assert resolve_model_config(load_config(None, base), None).sliding_window is None
    with pytest.raises(TrainConfigError, match=r"model\.sliding_window=0"):
        resolve_model_config(load_config(None, [*base, "model.sliding_window=0"]), None)


def test_config_json_round_trip_and_architecture_choice(tmp_path):
    windowed = ModelConfig(**BASE, sliding_window=WINDOW)
    windowed.save(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mistral"
    assert ModelConfig.load(tmp_path / "config.json") == windowed
    plain = ModelConfig(**BASE).to_hf_dict()
    assert plain["model_type"] == "llama" and "sliding_window" not in plain
    # a Mistral config.json without the key gets MistralConfig's default; with null it is a Llama
    mistral = {**windowed.to_hf_dict()}
    del mistral["sliding_window"]
    assert ModelConfig.from_hf_dict(mistral).sliding_window == transformers.MistralConfig().sliding_window
    assert ModelConfig.from_hf_dict({**mistral, "sliding_window": None}).to_hf_dict()["model_type"] == "llama"
    with pytest.raises(ConfigError, match=r"sliding_window=8 with model_type 'llama'"):
        ModelConfig.from_hf_dict({**plain, "sliding_window": 8})


def test_error_export_with_window_and_biases_names_the_key(tmp_path):
    config = ModelConfig(**BASE, sliding_window=WINDOW, attention_bias=True)
    model = LlamaForCausalLM(config)
    with pytest.raises(CheckpointError, match=r"model\.sliding_window=4.*Mistral.*model\.attention_bias"):
        save_hf_checkpoint(config, dict(model.state_dict()), tmp_path)
