"""Checkpoint conversion HF <-> native (tensor-parallel shards), its command line, and the errors users see.

The reference is what transformers itself writes (`save_pretrained`) and loads (`AutoModelForCausalLM`): an
export must hold the very same tensors and give the very same logits.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from modeling.config import CheckpointError, ConfigError, ModelConfig
from modeling.convert import hf_to_native, load_hf_checkpoint, load_model, native_to_hf
from modeling.llama import LlamaForCausalLM
from modeling.native_format import save_native, split_for_rank
from parallel.state import ParallelConfigError, ParallelDims, ParallelState

REPO_ROOT = Path(__file__).resolve().parents[2]
# MHA with 4 heads so that tp=4 divides every sharded dimension
BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
)
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))

# The Megatron layout, written down independently of the `tp_split_dim` attributes the code carries:
# column-parallel (q, k, v, gate, up, lm_head) and the vocab-parallel embedding split dim 0 (output rows),
# row-parallel (o, down) split dim 1 (input columns), norms are replicated.
SPLIT_DIM_BY_SUFFIX = {
    "embed_tokens.weight": 0,
    "q_proj.weight": 0,
    "k_proj.weight": 0,
    "v_proj.weight": 0,
    "gate_proj.weight": 0,
    "up_proj.weight": 0,
    "lm_head.weight": 0,
    "o_proj.weight": 1,
    "down_proj.weight": 1,
    "norm.weight": None,
    "layernorm.weight": None,
}


def _split_dim(name: str) -> int | None:
    for suffix, dim in SPLIT_DIM_BY_SUFFIX.items():
        if name.endswith(suffix):
            return dim
    raise AssertionError(f"unexpected tensor {name}")


def _save_hf(path: Path, *, tied: bool, seed: int = 0) -> tuple[Path, torch.Tensor]:
    """save_pretrained of a random transformers Llama; returns the directory and its logits on IDS."""
    torch.manual_seed(seed)
    config = ModelConfig(**BASE, tie_word_embeddings=tied)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**json.loads(json.dumps(config.to_hf_dict()))))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # not all ones, so a dropped norm weight would show
    hf.eval().save_pretrained(path)
    with torch.no_grad():
        return path, hf(IDS).logits


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{'untied': (dir, logits), 'tied': (dir, logits)}."""
    root = tmp_path_factory.mktemp("hf")
    return {
        "untied": _save_hf(root / "untied", tied=False, seed=0),
        "tied": _save_hf(root / "tied", tied=True, seed=1),
    }


def _hf_logits(path: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        return model(IDS).logits


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


# ---- round trips ----


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_hf_native_hf_round_trip_is_exact(hf_dirs, tmp_path, kind, tp):
    hf_dir, ref_logits = hf_dirs[kind]
    hf_to_native(hf_dir, tmp_path / "native", tp=tp)
    shards = sorted(p.name for p in (tmp_path / "native").glob("*.safetensors"))
    assert shards == [f"model-tp{r:02d}-of-{tp:02d}.safetensors" for r in range(tp)]
    native_to_hf(tmp_path / "native", tmp_path / "hf")

    _assert_same_tensors(load_file(tmp_path / "hf" / "model.safetensors"), load_file(hf_dir / "model.safetensors"))
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["tie_word_embeddings"] is (kind == "tied")
    torch.testing.assert_close(_hf_logits(tmp_path / "hf"), ref_logits, atol=0, rtol=0)


def test_tied_checkpoint_that_also_stores_lm_head_converts(hf_dirs, tmp_path):
    """Some exporters write the tied lm_head.weight out as a copy of the embedding; it is the same tensor."""
    hf_dir, ref_logits = hf_dirs["tied"]
    src = shutil.copytree(hf_dir, tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    hf_to_native(src, tmp_path / "native", tp=2)
    model = load_model(tmp_path / "native").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref_logits, atol=1e-4, rtol=0)


def test_native_shards_are_the_megatron_split(hf_dirs, tmp_path):
    hf_dir, _ = hf_dirs["untied"]
    full = load_file(hf_dir / "model.safetensors")
    hf_to_native(hf_dir, tmp_path, tp=4)
    for rank in range(4):
        shard = load_file(tmp_path / f"model-tp{rank:02d}-of-04.safetensors")
        assert sorted(shard) == sorted(full)
        for name, tensor in full.items():
            dim = _split_dim(name)
            expected = tensor if dim is None else tensor.chunk(4, dim=dim)[rank]
            assert torch.equal(shard[name], expected), (rank, name)


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_split_for_rank_concatenates_back(hf_dirs, kind):
    config, full = load_hf_checkpoint(hf_dirs[kind][0])
    shards = [split_for_rank(full, config, r, 4) for r in range(4)]
    for name, tensor in full.items():
        dim = _split_dim(name)
        parts = [s[name] for s in shards]
        if dim is None:
            assert all(torch.equal(p, tensor) for p in parts), name
            continue
        expected_shape = list(tensor.shape)
        expected_shape[dim] //= 4
        assert all(list(p.shape) == expected_shape for p in parts), name
        assert torch.equal(torch.cat(parts, dim=dim), tensor), name


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_tp2_shards_load_at_tp1_with_hf_logits(hf_dirs, tmp_path, kind):
    hf_dir, ref_logits = hf_dirs[kind]
    hf_to_native(hf_dir, tmp_path, tp=2)
    model = load_model(tmp_path).eval()
    assert model.state.tp_size == 1
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_save_native_then_load_model_is_exact(tmp_path, tied):
    torch.manual_seed(3)
    model = LlamaForCausalLM(ModelConfig(**BASE, tie_word_embeddings=tied, attention_bias=True))
    save_native(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model-tp00-of-01.safetensors"]
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    a, b = dict(model.named_parameters()), dict(loaded.named_parameters())
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_convert_cli_round_trip(hf_dirs, tmp_path):
    hf_dir, ref_logits = hf_dirs["untied"]
    native, hf2 = tmp_path / "native", tmp_path / "hf2"
    r = _run(["-m", "modeling.convert", "--from-hf", str(hf_dir), "--out", str(native), "--tp", "2"])
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in native.glob("*.safetensors")) == [
        "model-tp00-of-02.safetensors",
        "model-tp01-of-02.safetensors",
    ]
    r = _run(["-m", "modeling.convert", "--to-hf", str(native), "--out", str(hf2)])
    assert r.returncode == 0, r.stderr
    _assert_same_tensors(load_file(hf2 / "model.safetensors"), load_file(hf_dir / "model.safetensors"))
    torch.testing.assert_close(_hf_logits(hf2), ref_logits, atol=0, rtol=0)


# ---- bad input: each error names what is wrong ----


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_error_hf_dir_of_another_model_type(hf_dirs, tmp_path):
    bad = _copy(hf_dirs["untied"][0], tmp_path / "gpt2")
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"model_type='gpt2'"):
        hf_to_native(bad, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"model_type='gpt2'"):
        load_model(bad)


def test_error_missing_tensor(hf_dirs, tmp_path):
    bad = _copy(hf_dirs["untied"][0], tmp_path / "missing")
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
        hf_to_native(bad, tmp_path / "out")


def test_error_wrong_shape(hf_dirs, tmp_path):
    bad = _copy(hf_dirs["untied"][0], tmp_path / "shape")
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(32, 64\).*\(64, 64\)"):
        load_model(bad)


def test_error_native_shards_of_two_tp_degrees(hf_dirs, tmp_path):
    hf_dir, _ = hf_dirs["untied"]
    hf_to_native(hf_dir, tmp_path / "tp2", tp=2)
    hf_to_native(hf_dir, tmp_path / "tp1", tp=1)
    shutil.copy(tmp_path / "tp1" / "model-tp00-of-01.safetensors", tmp_path / "tp2")
    with pytest.raises(CheckpointError, match=r"model-tp00-of-01.*one complete set"):
        load_model(tmp_path / "tp2")
    with pytest.raises(CheckpointError, match=r"one complete set"):
        native_to_hf(tmp_path / "tp2", tmp_path / "out")


def test_error_heads_not_divisible_by_kv_heads():
    with pytest.raises(ConfigError, match=r"num_attention_heads=4.*num_key_value_heads=3"):
        ModelConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)


def test_error_unknown_rope_type():
    with pytest.raises(ConfigError, match=r"rope_type='foo'"):
        ModelConfig(**BASE, rope_scaling={"rope_type": "foo", "factor": 2})


def test_error_llama3_scaling_missing_keys():
    with pytest.raises(ConfigError, match=r"llama3.*missing.*low_freq_factor"):
        ModelConfig(**BASE, rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0})


def test_error_validate_parallel():
    with pytest.raises(ParallelConfigError, match=r"num_attention_heads=6.*parallel\.tp=4"):
        config = ModelConfig(**{**BASE, "hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 6})
        config.validate_parallel(4)
    with pytest.raises(ParallelConfigError, match=r"num_key_value_heads=1.*parallel\.tp=2"):
        ModelConfig(**{**BASE, "num_key_value_heads": 1}).validate_parallel(2)


def test_error_model_built_for_a_tp_that_does_not_divide_kv_heads():
    state = ParallelState(dims=ParallelDims(world_size=2, tp=2), rank=0)  # validation only: no process group
    with pytest.raises(ParallelConfigError, match=r"num_key_value_heads=1.*parallel\.tp=2"):
        LlamaForCausalLM(ModelConfig(**{**BASE, "num_key_value_heads": 1}), state)


def test_error_tp2_state_without_process_group_fails_before_compute():
    state = ParallelState(dims=ParallelDims(world_size=2, tp=2), rank=0)
    with pytest.raises(ValueError, match=r"(?i)group|distributed|torchrun"):
        model = LlamaForCausalLM(ModelConfig(**BASE), state)
        model(IDS)


# ---- generate.py command-line errors ----

GENERATE_ERRORS = {
    # name -> (arguments after `generate.py --ckpt <ckpt>`, regex for stderr)
    "out_of_vocab": (["--prompt-ids", "1,2,128", "--max-new-tokens", "2"], r"error: .*\[0, 128\)"),
    "no_prompt": (["--max-new-tokens", "2"], r"error: .*--prompt"),
    "missing_ckpt": (["--prompt-ids", "1,2", "--max-new-tokens", "2"], r"error: .*does_not_exist"),
}


@pytest.fixture(scope="module")
def generate_error_runs(hf_dirs, tmp_path_factory):
    """Run the three failing generate.py commands at once (each pays a torch import)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    procs = {}
    for name, (args, _) in GENERATE_ERRORS.items():
        ckpt = tmp_path_factory.mktemp("gen") / "does_not_exist" if name == "missing_ckpt" else hf_dirs["untied"][0]
        procs[name] = subprocess.Popen(
            [sys.executable, "generate.py", "--ckpt", str(ckpt), *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out, err)
    return results


@pytest.mark.parametrize("name", list(GENERATE_ERRORS))
def test_generate_cli_errors(generate_error_runs, name):
    returncode, out, err = generate_error_runs[name]
    assert returncode != 0
    assert "Traceback" not in err, err
    assert out == ""
    assert re.search(GENERATE_ERRORS[name][1], err), err
