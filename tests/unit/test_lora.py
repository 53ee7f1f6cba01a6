"""LoRA at tp=1: adapters on the seven projections, merge, native and PEFT files, the convert command line.

References: the base model itself (a fresh adapter has B = 0), the merged weights W + (alpha/r) B A run by a plain
model (the adapter path and the merge are independent code), and peft: the adapter exported in PEFT's format and
loaded by `PeftModel.from_pretrained` onto the Hugging Face export of the base must give our logits and gradients.
"""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers
from peft import PeftModel

from modeling.config import ModelConfig
from modeling.convert import load_model
from modeling.convert import main as convert_main
from modeling.llama import LlamaForCausalLM
from modeling.lora_files import load_adapter, load_adapter_full, save_adapter
from modeling.native_format import save_native
from parallel.lora import LORA_TARGETS, AdapterError, apply_lora, lora_state_dict, merge_lora_state_dict

CONFIG = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: k/v projections narrower than q
    max_position_embeddings=64,
)
R, ALPHA = 4, 12  # scaling 3
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))
TARGETS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(8))


def _base(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(ModelConfig(**CONFIG)).eval()


def _randomize_b(model, seed: int = 1) -> None:
    """B = 0 at init makes the adapter invisible; give every B random values so that it counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in lora_state_dict(model).items():
            if name.endswith("lora_B.weight"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))


def _lora_model(seed: int = 0, **kw) -> LlamaForCausalLM:
    model = _base(seed)
    torch.manual_seed(seed + 100)
    apply_lora(model, r=R, alpha=ALPHA, **kw)
    _randomize_b(model)
    return model


def _base_state_dict(model) -> dict[str, torch.Tensor]:
    adapters = set(lora_state_dict(model))
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in adapters}


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# ---- the adapter in the model ----


def test_fresh_adapter_gives_the_base_logits_exactly_and_only_adapters_train():
    model = _base()
    base_logits = _logits(model)
    apply_lora(model, r=R, alpha=ALPHA)
    assert torch.equal(_logits(model), base_logits)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        f"model.layers.{i}.{block}.{proj}.{factor}.weight"
        for i in range(CONFIG["num_hidden_layers"])
        for block, projs in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", LORA_TARGETS[4:]))
        for proj in projs
        for factor in ("lora_A", "lora_B")
    }
    assert trainable == expected
    assert set(lora_state_dict(model)) == expected
    params = dict(model.named_parameters())
    hd = CONFIG["hidden_size"] // CONFIG["num_attention_heads"]
    attn = "model.layers.0.self_attn"
    q_a, q_b = params[f"{attn}.q_proj.lora_A.weight"], params[f"{attn}.q_proj.lora_B.weight"]
    k_b = params[f"{attn}.k_proj.lora_B.weight"]
    o_a, o_b = params[f"{attn}.o_proj.lora_A.weight"], params[f"{attn}.o_proj.lora_B.weight"]
    assert q_a.shape == (R, 64) and q_b.shape == (64, R) and k_b.shape == (2 * hd, R)
    assert (q_a.tp_split_dim, q_b.tp_split_dim, o_a.tp_split_dim, o_b.tp_split_dim) == (None, 0, 1, None)
    assert torch.count_nonzero(q_b) == 0  # B starts at zero, A kaiming-uniform: |A| <= 1/sqrt(in)
    assert 0 < q_a.abs().max() <= 1 / 64**0.5 and q_a.std() > 0.3 / 64**0.5


def test_targets_subset_adapts_only_those_layers():
    model = _base()
    apply_lora(model, targets=["down_proj", "q_proj"], r=R, alpha=ALPHA)
    assert model.lora_config.targets == ("q_proj", "down_proj")
    names = {n.rsplit(".", 3)[-3] for n in lora_state_dict(model)}
    assert names == {"q_proj", "down_proj"}
    assert model.model.layers["0"].self_attn.k_proj.lora_A is None


def test_merged_weights_give_the_adapter_logits():
    model = _lora_model()
    merged_sd = merge_lora_state_dict(_base_state_dict(model), lora_state_dict(model), ALPHA / R)
    plain = _base(seed=5)
    plain.load_state_dict(merged_sd)
    lora_logits = _logits(model)
    assert _rel(lora_logits, _logits(_base())) > 0.1  # the adapter changes the output a lot
    torch.testing.assert_close(_logits(plain), lora_logits, atol=1e-5, rtol=0)


def test_dropout_is_identity_in_eval_and_active_in_training():
    plain, dropped = _lora_model(), _lora_model(dropout=0.5)
    torch.testing.assert_close(_logits(dropped), _logits(plain), atol=0, rtol=0)
    plain.train(), dropped.train()
    torch.testing.assert_close(_logits(plain), _logits(plain.eval()), atol=0, rtol=0)
    assert _rel(_logits(dropped), _logits(plain)) > 1e-2


# ---- files and the command line, checked against transformers + peft ----


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A LoRA model and its files: base (native), adapter (native), HF base, PEFT adapter, merged HF model."""
    root = tmp_path_factory.mktemp("lora")
    d = {k: root / k for k in ("base", "adapter", "hf_base", "peft", "hf_merged")}
    model = _base()
    save_native(model, d["base"])
    torch.manual_seed(100)
    apply_lora(model, r=R, alpha=ALPHA, dropout=0.1)
    _randomize_b(model)
    save_adapter(model, d["adapter"])
    convert_main(["--to-hf", str(d["base"]), "--out", str(d["hf_base"])])
    convert_main(["--to-peft", str(d["adapter"]), "--out", str(d["peft"])])
    convert_main(["--to-hf", str(d["base"]), "--merge-lora", str(d["adapter"]), "--out", str(d["hf_merged"])])
    return model, d


def _loss_and_adapter_grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = model(IDS).logits
    loss = F.cross_entropy(logits.flatten(0, 1), TARGETS.flatten())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_peft_loads_the_exported_adapter_with_our_logits_and_gradients(exported):
    model, d = exported
    cfg = json.loads((d["peft"] / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (R, ALPHA, 0.1)
    assert cfg["target_modules"] == list(LORA_TARGETS) and cfg["base_model_name_or_path"] is None

    hf = transformers.AutoModelForCausalLM.from_pretrained(d["hf_base"])
    peft_model = PeftModel.from_pretrained(hf, d["peft"], is_trainable=True).eval()
    torch.testing.assert_close(_logits(peft_model), _logits(model), atol=1e-4, rtol=0)

    peft_loss, peft_grads = _loss_and_adapter_grads(peft_model)
    loss, grads = _loss_and_adapter_grads(model)
    torch.testing.assert_close(loss, peft_loss, atol=1e-5, rtol=0)
    ours = {"base_model.model." + n.replace(".weight", ".default.weight"): g for n, g in grads.items()}
    assert sorted(ours) == sorted(peft_grads)
    for name, g in ours.items():
        assert g.abs().max() > 0, name
        assert _rel(g, peft_grads[name]) < 1e-4, name


def test_merge_lora_command_gives_the_adapter_logits_in_transformers(exported):
    model, d = exported
    merged = transformers.AutoModelForCausalLM.from_pretrained(d["hf_merged"]).eval()
    torch.testing.assert_close(_logits(merged), _logits(model), atol=1e-5, rtol=0)


def test_from_hf_with_the_peft_adapter_merged_gives_the_adapter_logits(exported, tmp_path):
    model, d = exported
    convert_main(["--from-hf", str(d["hf_base"]), "--merge-lora", str(d["peft"]), "--tp", "2", "--out", str(tmp_path)])
    torch.testing.assert_close(_logits(load_model(tmp_path)), _logits(model), atol=1e-5, rtol=0)


def test_adapter_files_round_trip(exported):
    model, d = exported
    assert sorted(p.name for p in d["adapter"].iterdir()) == ["adapter-tp00-of-01.safetensors", "adapter_config.json"]
    config, native = load_adapter_full(d["adapter"])
    peft_config, from_peft = load_adapter_full(d["peft"])  # a PEFT export reads back as the same adapter
    assert config == peft_config == model.lora_config
    ours = lora_state_dict(model)
    for full in (native, from_peft):
        assert sorted(full) == sorted(ours)
        assert all(torch.equal(full[k], ours[k]) for k in ours)

    fresh = _base()  # no adapters yet: load_adapter applies the saved config first
    load_adapter(fresh, d["adapter"])
    assert fresh.lora_config == model.lora_config
    torch.testing.assert_close(_logits(fresh), _logits(model), atol=0, rtol=0)


# ---- errors ----


def test_errors_name_the_setting_or_file(exported, tmp_path):
    model, d = exported
    with pytest.raises(AdapterError, match="q_proj"):
        apply_lora(_base(), targets=("qkv",))
    with pytest.raises(AdapterError, match="positive"):
        apply_lora(_base(), r=0)
    with pytest.raises(AdapterError, match="once"):
        apply_lora(model)
    other = apply_lora(_base(), r=2 * R, alpha=ALPHA)
    with pytest.raises(AdapterError, match="r=4"):
        load_adapter(other, d["adapter"])
    with pytest.raises(AdapterError, match="adapter_config.json"):
        load_adapter_full(tmp_path)
    rslora = shutil.copytree(d["peft"], tmp_path / "rslora")  # another scaling than alpha / r: refused
    cfg = json.loads((rslora / "adapter_config.json").read_text())
    (rslora / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    with pytest.raises(AdapterError, match="use_rslora"):
        load_adapter_full(rslora)
    adapter = lora_state_dict(model)
    with pytest.raises(AdapterError, match="no base weight"):
        merge_lora_state_dict({}, adapter, 1.0)
    lonely = {k: v for k, v in adapter.items() if "q_proj.lora_B" not in k}
    with pytest.raises(AdapterError, match="only one of"):
        merge_lora_state_dict(_base_state_dict(model), lonely, 1.0)
    with pytest.raises(SystemExit):
        convert_main(["--to-peft", str(d["adapter"]), "--merge-lora", str(d["adapter"]), "--out", str(tmp_path)])
