"""The native Llama equals transformers' LlamaForCausalLM: same weights -> same logits, loss and gradients.

transformers is the independent reference (ARCHITECTURE.md, Tests). Every case builds the HF model from
`ModelConfig(...).to_hf_dict()` and our model from `ModelConfig.from_hf_dict(hf.config.to_dict())`, so the config
round trip through transformers is exercised too. All weights, norms and biases included, are randomised in the HF
model before they are copied, so a swapped or ignored tensor shows up in the logits.
"""

import copy

import pytest
import torch
import transformers

from modeling.config import ModelConfig
from modeling.llama import LlamaForCausalLM, positions_from_documents

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
LLAMA3 = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
)

# name -> (ModelConfig overrides, sequence length)
CASES = {
    "mha": ({}, 32),
    "gqa": ({"num_key_value_heads": 2}, 32),
    "mqa": ({"num_key_value_heads": 1}, 32),
    "tied": ({"tie_word_embeddings": True}, 32),
    # with original_max_position_embeddings=16 and head_dim 16, the frequencies fall in all three llama3 bands
    "llama3": ({"rope_scaling": LLAMA3}, 48),
    "linear": ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, 48),
    # the sequence (40) is longer than max_position_embeddings (16): the NTK base is rescaled
    "dynamic": ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 16}, 40),
    "head_dim": ({"head_dim": 32, "num_key_value_heads": 2}, 32),
    "bias": ({"attention_bias": True, "mlp_bias": True}, 32),
    "theta_eps": ({"rope_theta": 500000.0, "rms_norm_eps": 1e-5}, 48),
}
ROPE_CASES = ("llama3", "linear", "dynamic")


def _hf_model(config: ModelConfig, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A transformers Llama with every parameter randomised (norm weights around 1, biases non-zero)."""
    # deepcopy: transformers edits the rope dict it is given in place (see test_to_hf_dict_is_not_aliased)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**copy.deepcopy(config.to_hf_dict())))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return hf.eval()


def _ours_from(hf: transformers.LlamaForCausalLM) -> LlamaForCausalLM:
    config = ModelConfig.from_hf_dict(hf.config.to_dict())
    model = LlamaForCausalLM(config)
    state = hf.state_dict()
    if config.tie_word_embeddings:
        assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == []
    assert missing == (["lm_head.weight"] if config.tie_word_embeddings else [])
    return model.eval()


def _ids(batch: int, seq: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_loss_and_grads_match_transformers(case):
    overrides, seq = CASES[case]
    config = ModelConfig(**{**BASE, **overrides})
    hf = _hf_model(config)
    ours = _ours_from(hf)
    assert ModelConfig.from_hf_dict(hf.config.to_dict()) == config
    if config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight

    ids = _ids(2, seq, config.vocab_size)
    with torch.no_grad():
        ref_logits = hf(ids).logits
        our_logits = ours(ids).logits
    assert our_logits.shape == ref_logits.shape == (2, seq, config.vocab_size)
    torch.testing.assert_close(our_logits, ref_logits, atol=1e-4, rtol=0)

    # HF shifts labels itself (logits[t] predicts labels[t+1]); ours takes targets already shifted.
    labels = ids.clone()
    labels[0, 5:9] = -100
    labels[1, -3:] = -100
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)  # (B, T): last position predicts nothing
    ref_loss = hf(ids, labels=labels).loss
    our_loss = ours(ids, targets=targets).loss
    torch.testing.assert_close(our_loss, ref_loss, atol=1e-5, rtol=0)
    ref_loss.backward()
    our_loss.backward()

    ref_grads = {n: p.grad for n, p in hf.named_parameters()}
    our_grads = {n: p.grad for n, p in ours.named_parameters()}
    assert sorted(our_grads) == sorted(ref_grads)
    for name, g in ref_grads.items():
        assert g is not None and our_grads[name] is not None, name
        torch.testing.assert_close(our_grads[name], g, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope_scaling_cases_are_not_vacuous(case):
    """The scaled-RoPE cases above would pass trivially if both sides ignored the scaling: they must not."""
    overrides, seq = CASES[case]
    scaled = ModelConfig(**{**BASE, **overrides})
    plain = ModelConfig(**{**BASE, **{k: v for k, v in overrides.items() if k != "rope_scaling"}})
    ids = _ids(1, seq, BASE["vocab_size"])
    with torch.no_grad():
        diff = (_hf_model(scaled)(ids).logits - _hf_model(plain)(ids).logits).abs().max().item()
    assert diff > 1e-2, f"{case}: rope scaling changes the reference logits by only {diff}"


DOC_CASES = {
    "mha": {},
    "gqa": {"num_key_value_heads": 2},
    # every document fits in max_position_embeddings (16) but the packed row (24) does not: only positions that
    # restart per document keep dynamic NTK unscaled, as for each document alone (plain RoPE cannot tell, it is
    # translation invariant)
    "dynamic": {"max_position_embeddings": 16, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}},
}


@pytest.mark.parametrize("case", list(DOC_CASES))
def test_document_ids_equal_each_document_alone(case):
    config = ModelConfig(**{**BASE, **DOC_CASES[case]})
    hf = _hf_model(config)
    ours = _ours_from(hf)
    ids = _ids(2, 24, config.vocab_size, seed=3)
    # row 0: two documents (10 + 14 tokens); row 1: three documents (5 + 7 + 12)
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [4] * 5 + [7] * 7 + [9] * 12])
    with torch.no_grad():
        packed = ours(ids, document_ids=doc_ids).logits  # (2, 24, V)
        unmasked = ours(ids).logits
        for b in range(2):
            for doc in doc_ids[b].unique():
                sel = doc_ids[b] == doc
                alone = hf(ids[b, sel].unsqueeze(0)).logits[0]  # positions restart at 0
                torch.testing.assert_close(packed[b, sel], alone, atol=1e-4, rtol=0, msg=f"row {b} doc {doc}")
    # sanity: without document_ids the later documents see their predecessors, so the test above is not vacuous
    assert (unmasked[0, 10:] - packed[0, 10:]).abs().max() > 1e-2


def test_positions_restart_per_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5], [1, 2, 2, 3, 3, 3]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [0, 0, 1, 0, 1, 2]])
    assert torch.equal(positions_from_documents(doc_ids), expected)


# ---- config.json round trip ----

V4_V5 = {
    "linear": ({"type": "linear", "factor": 4.0}, {"rope_type": "linear", "factor": 4.0}),
    "dynamic": ({"type": "dynamic", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0}),
    "llama3": (
        {"type": "llama3", **{k: v for k, v in LLAMA3.items() if k != "rope_type"}},
        LLAMA3,
    ),
    "default": (None, {"rope_type": "default"}),
}


def _hf_dict_common() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": True,
    }


@pytest.mark.parametrize("rope", list(V4_V5))
def test_from_hf_dict_reads_transformers4_and_transformers5_layouts(rope):
    v4_scaling, v5_params = V4_V5[rope]
    v4 = {**_hf_dict_common(), "rope_theta": 500000.0, "rope_scaling": v4_scaling}
    v5 = {**_hf_dict_common(), "rope_parameters": {**v5_params, "rope_theta": 500000.0}}
    a, b = ModelConfig.from_hf_dict(v4), ModelConfig.from_hf_dict(v5)
    assert a == b
    assert a.rope_theta == 500000.0
    assert a.rope_type == rope
    expected_scaling = {k: v for k, v in v5_params.items() if k != "rope_type"}
    assert {k: v for k, v in (a.rope_scaling or {}).items() if k != "rope_type"} == expected_scaling
    assert (a.num_key_value_heads, a.head_dim, a.rms_norm_eps, a.mlp_bias) == (2, 16, 1e-5, True)
    assert a.tie_word_embeddings is True


@pytest.mark.parametrize("rope", list(V4_V5))
def test_to_hf_dict_loads_into_transformers_with_equal_rope_parameters(rope):
    _, v5_params = V4_V5[rope]
    scaling = None if rope == "default" else dict(v5_params)
    config = ModelConfig(**{**BASE, "rope_theta": 250000.0, "rope_scaling": scaling})
    hf_config = transformers.LlamaConfig(**copy.deepcopy(config.to_hf_dict()))
    assert hf_config.rope_parameters == {**v5_params, "rope_theta": 250000.0}
    assert hf_config.head_dim == 16 and hf_config.num_key_value_heads == 4
    assert ModelConfig.from_hf_dict(hf_config.to_dict()) == config


def test_to_hf_dict_is_not_aliased():
    kwargs = {**BASE, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    config = ModelConfig(**kwargs)
    transformers.LlamaConfig(**config.to_hf_dict())
    assert config == ModelConfig(**kwargs)
    config.rope_theta = 500000.0
    assert config.to_hf_dict()["rope_parameters"]["rope_theta"] == 500000.0
