"""configs/: yaml + dotted overrides into dataclasses, the model they resolve to, and every error names its key."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from configs.architecture import padded_vocab_size, resolve_model_config
from configs.schema import load_config
from configs.sections import ConfigError, LoraSection
from modeling.config import ModelConfig
from parallel.lora import LORA_TARGETS

ROOT = Path(__file__).resolve().parents[2]

BASE = ["model.preset=tiny", "data.train=shards/*.jsonl.zst", "data.tokenizer=tok"]


def _cfg(*overrides, path=None):
    return load_config(path, [*BASE, *overrides])


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 3e-4\ntrain:\n  max_steps: 7\nmodel:\n  preset: 125m\n")
    cfg = load_config(p, ["optim.lr=1e-3", "model.hidden_size=384", "parallel.tp=2", "logging.tags=[a, b]"])
    assert cfg.optim.lr == 1e-3 and cfg.train.max_steps == 7 and cfg.parallel.tp == 2
    model = resolve_model_config(cfg, None)
    assert cfg.model.preset == "125m" and model.hidden_size == 384
    assert model.num_hidden_layers == 12  # from the preset
    assert cfg.logging.tags == ["a", "b"]
    assert isinstance(load_config(p).optim.lr, float) and load_config(p).optim.lr == 3e-4  # yaml 1.1's "3e-4"


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["optim.lrr=1"], 1, "unknown key optim.lrr"),
        (["optimizer.lr=1"], 1, "unknown section 'optimizer'"),
        (["train.max_steps=ten"], 1, "train.max_steps: expected an integer, got 'ten'"),
        (["train.max_steps=0"], 1, "train.max_steps=0 must be positive"),
        (["optim.decay=step"], 1, "optim.decay='step'; choose one of cosine, linear, constant"),
        (["parallel.tp=3"], 4, "parallel.tp=3 does not divide the world size 4"),
        (
            ["parallel.tp=2", "model.num_attention_heads=6", "model.num_key_value_heads=3"],
            2,
            "model.num_key_value_heads=3 is not divisible by parallel.tp=2",
        ),
        (
            ["train.global_batch_size=10", "train.micro_batch_size=4"],
            1,
            "train.global_batch_size=10 is not a multiple of train.micro_batch_size (4) x data-parallel ranks (1) = 4",
        ),
        (["parallel.deepspeed_config=configs/deepspeed/nope.json"], 1, "parallel.deepspeed_config:"),
        (["model.preset=huge"], 1, "model.preset='huge': no"),
        (["model.colour=3"], 1, "model.overrides.colour: unknown model key"),
        (["optim.min_lr=1", "optim.lr=0.1"], 1, "optim.min_lr=1.0 is above optim.lr=0.1"),
        (["data.seq_len=4096"], 1, "data.seq_len=4096 exceeds model max_position_embeddings=1024"),
        (["model.rope_scaling={type: yarn, factor: 2}"], 1, "yarn"),
        (["data.train="], 1, "data.train is empty"),
        (["parallel.ep=3"], 2, "parallel.ep=3 does not divide the data-parallel degree 2"),
        (["parallel.tp=0"], 1, "parallel.tp=0 must be positive"),
        (["checkpoint.keep_last=0"], 1, "checkpoint.keep_last=0 must be positive"),
        (["checkpoint.save=false", "train.exit_interval=5"], 1, "train.exit_interval=5 saves a checkpoint and exits"),
        (["logging.wandb_mode=loud"], 1, "logging.wandb_mode='loud'; choose one of"),
        (["lora.enabled=true", "lora.targets=[q_proj, lm_head]"], 1, "lora.targets=['q_proj', 'lm_head']; choose"),
        (["data.synthetic=true"], 1, "data.synthetic needs model.overrides.vocab_size"),
        (["model.init_from=nowhere"], 1, "model.preset='tiny' and model.init_from are both set"),
    ],
)
def test_validation_errors_name_the_key(overrides, world, message):
    with pytest.raises(ConfigError) as e:
        _cfg(*overrides).validate(world_size=world)
    assert message in str(e.value)


@pytest.mark.parametrize("stage", ["two", "2", 2.5, True, 4, None, [1]])
def test_zero_stage_must_be_an_integer_from_0_to_3(tmp_path, stage):
    ds = tmp_path / "zero.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    cfg = _cfg(f"parallel.deepspeed_config={ds}")
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert f"{ds}: zero_optimization.stage={json.dumps(stage)}; set it to the integer 0, 1, 2 or 3" in str(e.value)


def test_zero_stages_of_the_shipped_configs():
    stages = {
        p.stem: _cfg(f"parallel.deepspeed_config={p}").zero_stage() for p in ROOT.glob("configs/deepspeed/*.json")
    }
    assert stages == {"zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}
    assert _cfg().zero_stage() == 0


def test_bad_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  max_steps: 3\n  seed: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: invalid yaml"):
        load_config(p)


def test_layout_errors_name_the_key_and_how_to_launch():
    with pytest.raises(ConfigError) as e:
        _cfg("parallel.tp=2").validate(world_size=3)
    assert "parallel.tp=2 does not divide the world size 3" in str(e.value)
    assert "torchrun --nproc_per_node 2" in str(e.value)
    cfg = _cfg("parallel.tp=2", "train.global_batch_size=32", "train.micro_batch_size=4")
    assert cfg.grad_accum_steps(8) == 2  # 32 / (4 x dp 4)


def _tokenizer(vocab_size, bos=1, eos=2, pad=-1):
    return SimpleNamespace(vocab_size=vocab_size, bos_id=bos, eos_id=eos, pad_id=pad)


def test_model_config_takes_the_padded_vocabulary_and_ids_from_the_tokenizer():
    assert [padded_vocab_size(n, tp) for n, tp in ((1, 1), (64, 1), (65, 1), (100, 2), (300, 4))] == [
        64,
        64,
        128,
        128,
        512,
    ]
    model = resolve_model_config(_cfg("parallel.tp=2"), _tokenizer(1000, bos=5, eos=6, pad=7))
    assert isinstance(model, ModelConfig) and model.vocab_size == 1024  # a multiple of 64 x tp
    assert (model.bos_token_id, model.eos_token_id, model.pad_token_id) == (5, 6, 7)
    assert resolve_model_config(_cfg(), _tokenizer(1000, pad=-1)).pad_token_id is None
    assert resolve_model_config(_cfg("model.vocab_size=2000"), _tokenizer(1000)).vocab_size == 2000
    # a run started at tp=1 (300 -> 320) and resumed at tp=2 (its own padding: 384) keeps its model
    assert resolve_model_config(_cfg("parallel.tp=2"), _tokenizer(300)).vocab_size == 384
    assert resolve_model_config(_cfg("parallel.tp=2"), _tokenizer(300), resumed_vocab=320).vocab_size == 320
    with pytest.raises(ConfigError, match="model vocab_size=500 is smaller than the tokenizer's 1000"):
        resolve_model_config(_cfg("model.vocab_size=500"), _tokenizer(1000))
    # an unset max_position_embeddings is the model's default (2048), not stretched to data.seq_len
    with pytest.raises(ConfigError, match="data.seq_len=4096 exceeds model max_position_embeddings=2048"):
        resolve_model_config(_cfg("data.seq_len=4096", "model.max_position_embeddings=null"), None)


def test_init_from_a_run_directory_reads_its_latest_steps_config(tmp_path):
    step = tmp_path / "run" / "step-00000005"
    step.mkdir(parents=True)
    ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4).save(
        step / "config.json"
    )
    (tmp_path / "run" / "latest").write_text("step-00000005\n")
    for init_from in (step, tmp_path / "run"):
        cfg = _cfg("model.preset=null", f"model.init_from={init_from}", "model.num_hidden_layers=2")
        cfg.validate()
        model = resolve_model_config(cfg, None)
        assert (model.hidden_size, model.num_hidden_layers, model.vocab_size) == (64, 2, 128)
    with pytest.raises(ConfigError, match=r"model\.init_from=.*config\.json: no such file"):
        _cfg("model.preset=null", f"model.init_from={tmp_path}").validate()


def test_loading_and_validating_a_config_imports_no_checkpoint_io():
    code = (
        "import sys; from configs.schema import load_config; "
        "load_config('configs/pretrain_tiny.yaml').validate(); "
        "heavy = ('safetensors', 'modeling.convert', 'modeling.llama', 'dataset.tokenizer'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_lora_targets_default_to_every_projection():
    assert LoraSection().targets == list(LORA_TARGETS)


def test_shipped_configs_validate():
    root = ROOT / "configs"
    shipped = sorted(root.glob("pretrain_*.yaml"))
    assert shipped, "no configs/pretrain_*.yaml"
    for path in shipped:
        cfg = load_config(path)
        world = cfg.parallel.tp * 8  # the recipes are written for nodes of 8 GPUs
        cfg.validate(world_size=world if "7b" in path.name else 1)
