"""generate.py on a Mixtral checkpoint prints transformers' greedy ids: one process, and expert-parallel at ep=2.

The reference is transformers' `MixtralForCausalLM.generate(do_sample=False)`, one prompt at a time, on the random
model that wrote the Hugging Face directory. ep=1 reads native shards written at ep=2 (`modeling.convert --ep 2`);
ep=2 runs under `python -m torch.distributed.run` with 2 gloo CPU processes, each holding 2 of the 4 experts.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[1, 5, 9, 200, 37], [3, 250, 8, 8, 100, 42, 7]]
MAX_NEW = 10


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env.pop("WORLD_SIZE", None)  # only torchrun may set it
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _generate(ckpt: Path, ep: int) -> list[list[int]]:
    launcher = [sys.executable]
    if ep > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ep)]
    cmd = launcher + ["generate.py", "--ckpt", str(ckpt), "--ep", str(ep), "--max-new-tokens", str(MAX_NEW)]
    for p in PROMPTS:
        cmd += ["--prompt-ids", ",".join(map(str, p))]
    lines = _run(cmd + ["--temperature", "0", "--print-ids"]).stdout.strip().splitlines()
    assert len(lines) == len(PROMPTS), lines
    return [[int(t) for t in line.split()] for line in lines]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> tuple[Path, list[list[int]]]:
    """A random transformers Mixtral on disk and its greedy new ids per prompt."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(1234)
    model = MixtralForCausalLM(cfg).eval()
    hf_dir = tmp_path_factory.mktemp("generate_moe") / "hf"
    model.save_pretrained(hf_dir)
    expected = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False)
            expected.append(out[0, len(p) :].tolist())
            top2 = model(out[:, :-1]).logits[0, len(p) - 1 :].topk(2, dim=-1).values  # (new, 2)
            assert (top2[:, 0] - top2[:, 1]).min() > 1e-3, "reference greedy path has a near-tie; change the seed"
    assert any(len(e) == MAX_NEW for e in expected), "every reference stopped at EOS early: nothing to compare"
    return hf_dir, expected


def test_ep1_from_native_ep2_shards_matches_transformers(mixtral, tmp_path):
    hf_dir, expected = mixtral
    _run([sys.executable, "-m", "modeling.convert", "--from-hf", str(hf_dir), "--out", str(tmp_path), "--ep", "2"])
    assert (tmp_path / "experts-ep01-of-02.safetensors").exists()
    assert _generate(tmp_path, ep=1) == expected


def test_torchrun_ep2_matches_transformers(mixtral):
    hf_dir, expected = mixtral
    assert _generate(hf_dir, ep=2) == expected
