"""Mixture-of-experts Llama against transformers' MixtralForCausalLM, and Mixtral checkpoints through modeling.convert.

transformers is the reference: a random-weight MixtralForCausalLM (fp32) gives the logits and the training loss, its
save_pretrained directory (per-expert tensors) and its in-memory state_dict (fused gate_up_proj) are the two input
layouts, and from_pretrained must load what we export. Round trips compare tensors byte for byte.
"""

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from modeling.config import CheckpointError, ModelConfig
from modeling.convert import (
    hf_to_native,
    load_checkpoint,
    load_model,
    native_to_hf,
    save_hf_checkpoint,
)
from modeling.llama import LlamaForCausalLM
from parallel.state import ParallelConfigError, ParallelDims, ParallelState

TOL = 1e-4
MIXTRAL = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    initializer_range=0.2,
    router_aux_loss_coef=0.05,
)


def _hf_model(**kw) -> transformers.MixtralForCausalLM:
    torch.manual_seed(7)
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**MIXTRAL, **kw})).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, MIXTRAL["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(3))


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = _hf_model()
    out = tmp_path_factory.mktemp("mixtral") / "hf"
    model.save_pretrained(out)
    return out, model


def test_logits_equal_transformers_per_expert_and_fused_layouts(hf_dir, tmp_path):
    path, hf = hf_dir
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        assert any("block_sparse_moe.experts.3.w2" in k for k in _tensors(path))  # save_pretrained's layout
        ours = load_model(path)
        assert (ours(ids).logits - ref).abs().max() <= TOL
        fused = tmp_path / "fused"  # transformers 5's in-memory names: experts.gate_up_proj / down_proj
        fused.mkdir()
        (fused / "config.json").write_text((path / "config.json").read_text())
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(fused / "model.safetensors"))
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in _tensors(fused))
        assert (load_model(fused)(ids).logits - ref).abs().max() <= TOL


def test_training_loss_is_ce_plus_coef_times_load_balancing_on_one_layer(tmp_path):
    """With one MoE layer Mixtral's whole-model aux loss is that layer's: loss = CE + coef * lb, as ours."""
    hf = _hf_model(num_hidden_layers=1, output_router_logits=True)
    hf.save_pretrained(tmp_path)
    ids = _ids()
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)  # same routed tokens as transformers
    ours = load_model(tmp_path)
    with torch.no_grad():
        ref = hf(ids, labels=ids)
        out = ours(ids, targets=targets)
    assert abs(out.loss.item() - ref.loss.item()) <= TOL
    assert abs(out.aux_loss.item() - MIXTRAL["router_aux_loss_coef"] * ref.aux_loss.item()) <= TOL
    assert abs(out.ce_loss.item() - (ref.loss - MIXTRAL["router_aux_loss_coef"] * ref.aux_loss).item()) <= TOL


@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 2), (1, 4)])
def test_hf_native_hf_round_trip_is_identical_and_loads_in_transformers(hf_dir, tmp_path, tp, ep):
    path, hf = hf_dir
    native, back = tmp_path / "native", tmp_path / "back"
    hf_to_native(path, native, tp=tp, ep=ep)
    names = sorted(p.name for p in native.glob("*.safetensors"))
    assert names == [f"experts-ep{r:02d}-of-{ep:02d}.safetensors" for r in range(ep)] + [
        f"model-tp{r:02d}-of-{tp:02d}.safetensors" for r in range(tp)
    ]
    assert json.loads((native / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    native_to_hf(native, back)
    original, exported = _tensors(path), _tensors(back)
    assert sorted(original) == sorted(exported)
    for k, v in original.items():
        assert torch.equal(v, exported[k]), k
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    assert type(reloaded).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        assert torch.equal(reloaded(_ids()).logits, hf(_ids()).logits)


def test_native_shards_of_one_rank_hold_its_experts(hf_dir, tmp_path):
    path, _ = hf_dir
    hf_to_native(path, tmp_path, ep=2)
    _, full = load_checkpoint(path)
    with safe_open(str(tmp_path / "experts-ep01-of-02.safetensors"), framework="pt") as f:
        w1 = f.get_tensor("model.layers.1.mlp.w1")  # (E/ep, I, H): experts 2 and 3
        assert json.loads(f.metadata()["split_dims"])["model.layers.1.mlp.w1"] == 0
    assert torch.equal(w1, full["model.layers.1.mlp.w1"][2:])


def test_dense_llama_config_json_has_no_moe_keys():
    d = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4).to_hf_dict()
    assert d["model_type"] == "llama" and "num_local_experts" not in d and "router_score" not in d


def test_error_experts_not_divisible_by_ep_names_the_key():
    config = ModelConfig(**{**MIXTRAL, "num_local_experts": 4})
    state = ParallelState(dims=ParallelDims(world_size=3, ep=3), rank=0)  # validation only: no process group
    with pytest.raises(ParallelConfigError, match=r"model\.num_local_experts=4 is not divisible by parallel\.ep=3"):
        LlamaForCausalLM(config, state)


def test_error_export_of_what_mixtral_cannot_represent_names_the_key(tmp_path):
    config = ModelConfig(**{**MIXTRAL, "router_score": "sigmoid"})
    model = LlamaForCausalLM(config)
    with pytest.raises(CheckpointError, match=r"model\.router_score"):
        save_hf_checkpoint(config, dict(model.state_dict()), tmp_path)


def test_sliding_window_mixtral_loads_and_exports_with_equal_logits(tmp_path):
    """Mixtral's sliding_window (shorter than the 11 tokens) is the native model's, both ways."""
    hf = _hf_model(sliding_window=3)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert ours.config.sliding_window == 3
    save_hf_checkpoint(ours.config, dict(ours.state_dict()), tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert back.config.sliding_window == 3
    with torch.no_grad():
        ref = hf(_ids()).logits
        assert (ours(_ids()).logits - ref).abs().max() <= TOL
        assert (back(_ids()).logits - ref).abs().max() <= TOL
        assert (_hf_model()(_ids()).logits - ref).abs().max() > 1e-2  # the window matters at this length


def test_error_mixtral_that_cannot_convert_names_the_key(hf_dir, tmp_path):
    path, _ = hf_dir
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text((path / "config.json").read_text())
    tensors = {k: v for k, v in _tensors(path).items() if "layers.1.block_sparse_moe.experts.2.w3" not in k}
    save_file(tensors, str(incomplete / "model.safetensors"))
    with pytest.raises(ValueError, match=r"layer 1 has no block_sparse_moe\.experts\.2\.w3\.weight"):
        load_checkpoint(incomplete)
