"""configs/schema.py: yaml + dotted overrides into dataclasses, and every validation error names its key."""

import pytest

from configs.schema import ConfigError, load_config

BASE = ["model.preset=tiny", "data.train=shards/*.jsonl.zst", "data.tokenizer=tok"]


def _cfg(*overrides, path=None):
    return load_config(path, [*BASE, *overrides])


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 3e-4\ntrain:\n  max_steps: 7\nmodel:\n  preset: 125m\n")
    cfg = load_config(p, ["optim.lr=1e-3", "model.hidden_size=256", "parallel.tp=2", "logging.tags=[a, b]"])
    assert cfg.optim.lr == 1e-3 and cfg.train.max_steps == 7 and cfg.parallel.tp == 2
    assert cfg.model.preset == "125m" and cfg.model_overrides()["hidden_size"] == 256
    assert cfg.model_overrides()["num_hidden_layers"] == 12  # from the preset
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
    ],
)
def test_validation_errors_name_the_key(overrides, world, message):
    with pytest.raises(ConfigError) as e:
        _cfg(*overrides).validate(world_size=world)
    assert message in str(e.value)


def test_bad_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  max_steps: 3\n  seed: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: invalid yaml"):
        load_config(p)


def test_shipped_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    shipped = sorted(root.glob("pretrain_*.yaml"))
    assert shipped, "no configs/pretrain_*.yaml"
    for path in shipped:
        cfg = load_config(path)
        world = cfg.parallel.tp * 8  # the recipes are written for nodes of 8 GPUs
        cfg.validate(world_size=world if "7b" in path.name else 1)
