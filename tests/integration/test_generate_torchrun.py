"""generate.py under torchrun at tp=2 prints transformers' greedy ids, from a Hugging Face and a native checkpoint.

The reference is transformers' `LlamaForCausalLM.generate(do_sample=False)`, one prompt at a time (no padding), on
the model that wrote the Hugging Face directory. The launcher is `python -m torch.distributed.run` (torchrun's
module) with 2 gloo CPU processes; the native checkpoint is made by `python -m modeling.convert --tp 2`. Each test
runs with a vocabulary tp divides (256) and one it does not (251: padded to 252 in memory, 126 + 125 rows on disk).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[1, 5, 9, 200, 37], [1, 17], [3, 250, 8, 8, 100, 42, 7, 1, 99]]
MAX_NEW = 12
TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch.distributed.run") is None or not torch.distributed.is_available(),
    reason="torch.distributed.run (torchrun) is not available in this torch build",
)


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)  # generate.py reads WORLD_SIZE: only torchrun may set it
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def _run(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        args, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert proc.returncode == 0, (
        f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc


def _torchrun_generate(ckpt: Path) -> list[list[int]]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "generate.py"]
    cmd += ["--ckpt", str(ckpt)]
    for p in PROMPTS:
        cmd += ["--prompt-ids", ",".join(map(str, p))]
    cmd += ["--max-new-tokens", str(MAX_NEW), "--temperature", "0", "--print-ids", "--tp", "2"]
    proc = _run(cmd)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(PROMPTS), f"expected one line per prompt on stdout, got:\n{proc.stdout}"
    return [[int(t) for t in line.split()] for line in lines]


@pytest.fixture(scope="module", params=[256, 251], ids=lambda v: f"vocab{v}")
def hf_reference(tmp_path_factory, request) -> tuple[Path, list[list[int]]]:
    """A transformers Llama saved to disk (GQA, untied) and its greedy new ids per prompt."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=request.param,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.1,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(4321)
    model = LlamaForCausalLM(cfg).eval()
    hf_dir = tmp_path_factory.mktemp(f"generate_torchrun_{request.param}") / "hf"
    model.save_pretrained(hf_dir)
    expected = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([p])
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0
            )
            expected.append(out[0, len(p) :].tolist())
            top2 = model(out[:, :-1]).logits[0, len(p) - 1 :].topk(2, dim=-1).values  # (new, 2)
            assert (top2[:, 0] - top2[:, 1]).min() > 1e-3, "reference greedy path has a near-tie; change the seed"
    assert any(len(e) == MAX_NEW for e in expected), "every reference stopped at EOS early: nothing to compare"
    return hf_dir, expected


def test_torchrun_tp2_hf_checkpoint_matches_transformers(hf_reference):
    hf_dir, expected = hf_reference
    assert _torchrun_generate(hf_dir) == expected


def test_torchrun_tp2_native_checkpoint_matches_transformers(hf_reference, tmp_path):
    hf_dir, expected = hf_reference
    native = tmp_path / "native_tp2"
    _run([sys.executable, "-m", "modeling.convert", "--from-hf", str(hf_dir), "--out", str(native), "--tp", "2"])
    assert sorted(p.name for p in native.glob("model-tp*.safetensors")) == [
        "model-tp00-of-02.safetensors",
        "model-tp01-of-02.safetensors",
    ]
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    with safe_open(str(native / "model-tp01-of-02.safetensors"), framework="pt") as f:
        assert f.get_tensor("lm_head.weight").shape[0] == vocab // 2  # real rows only, no padding on disk
    assert _torchrun_generate(native) == expected
