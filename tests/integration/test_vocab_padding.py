"""`model.init_from=HF_DIR parallel.tp=2` trains a Hugging Face model whose vocabulary (251) tp does not divide.

The vocabulary is padded to 252 in the embedding and the head (tests/distributed/test_vocab_padding.py checks the
layers against transformers); here pretrain_llama.py under torchrun at tp=2 must give the one-process run's losses
and gradient norms step by step, and its checkpoint, exported with `--to-hf`, must carry vocab_size 251 and load in
transformers with the weights the one-process run ends with.
"""

import json

import torch

from modeling.convert import main as convert_main
from tests.integration.train_utils import assert_same_curve, metrics, pretrain

V = 251
STEPS = 4
# the SYNTHETIC run's model keys equal the checkpoint's but for the vocabulary; init_from replaces the preset
TRAIN = ["model.preset=null", f"model.vocab_size={V}"]


def _hf_dir(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)


def test_init_from_odd_vocab_hf_trains_at_tp2_like_one_process(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = tmp_path / "hf"
    _hf_dir(hf)
    run = [f"model.init_from={hf}", f"train.max_steps={STEPS}"]
    pretrain(tmp_path / "tp1", TRAIN + run)
    pretrain(tmp_path / "tp2", [*TRAIN, *run, "parallel.tp=2"], nproc=2)
    ref = metrics(tmp_path / "tp1")
    assert len(ref) == STEPS
    assert_same_curve(metrics(tmp_path / "tp2"), ref, loss_tol=1e-4)

    exported = {}
    for name in ("tp1", "tp2"):
        convert_main(["--to-hf", str(tmp_path / name), "--out", str(tmp_path / f"{name}_hf")])
        assert json.loads((tmp_path / f"{name}_hf" / "config.json").read_text())["vocab_size"] == V
        exported[name] = AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}_hf").state_dict()
    assert exported["tp2"]["model.embed_tokens.weight"].shape == (V, 64)
    for key, t in exported["tp1"].items():
        torch.testing.assert_close(exported["tp2"][key], t, rtol=1e-4, atol=1e-5, msg=key)
