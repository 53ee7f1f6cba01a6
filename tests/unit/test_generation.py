"""Generation: greedy decoding equals transformers' `generate`, sampling keeps to its top-k / top-p support, and
generate.py prints what transformers would generate.

References are independent of the code under test: `transformers.LlamaForCausalLM.generate(do_sample=False)` run on
each prompt alone, and top-k / nucleus sets computed here with numpy from the probabilities.
"""

import copy
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from transformers.generation.logits_process import TopPLogitsWarper

from modeling.config import ModelConfig
from modeling.convert import hf_to_native
from modeling.generation import generate, sample
from modeling.llama import LlamaForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[2]
# initializer_range 0.2: random weights strong enough that greedy decoding does not collapse onto one token
BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    initializer_range=0.2,
    bos_token_id=None,
    eos_token_id=None,
)
PROMPTS = [[17], [5, 99, 23, 64, 8, 110], [3, 41, 77, 12, 90, 6, 55, 101, 9, 33, 70, 2, 48]]  # left padding varies


def _hf_model(config: ModelConfig, seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**copy.deepcopy(config.to_hf_dict()))).eval()


def _ours_from(hf: transformers.LlamaForCausalLM) -> LlamaForCausalLM:
    model = LlamaForCausalLM(ModelConfig.from_hf_dict(hf.config.to_dict()))
    model.load_state_dict(hf.state_dict())
    return model.eval()


def _hf_greedy(hf, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """transformers' greedy continuation of one prompt alone (no padding involved)."""
    gen_config = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=0
    )
    out = hf.generate(torch.tensor([prompt]), generation_config=gen_config)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def models(request):
    hf = _hf_model(ModelConfig(**BASE, num_key_value_heads=request.param), seed=request.param)
    return hf, _ours_from(hf)


def test_greedy_batch_equals_transformers_per_prompt(models):
    hf, ours = models
    got = generate(ours, PROMPTS, max_new_tokens=16, temperature=0.0)
    expected = [_hf_greedy(hf, p, 16) for p in PROMPTS]
    assert got == expected
    assert all(len(ids) == 16 for ids in got)
    assert len({tuple(ids) for ids in got}) == len(PROMPTS) and all(len(set(ids)) > 3 for ids in got)


def test_greedy_stops_after_eos_where_transformers_stops(models):
    hf, ours = models
    free = [_hf_greedy(hf, p, 16) for p in PROMPTS]
    # EOS := the token the longest prompt produces at step 5, the first time it appears in that continuation
    row = free[2]
    step = next(i for i in range(5, 16) if row[i] not in row[:i])
    eos = row[step]

    got = generate(ours, PROMPTS, max_new_tokens=16, eos_token_id=eos)
    expected = [_hf_greedy(hf, p, 16, eos_token_id=eos) for p in PROMPTS]
    assert got == expected
    assert got[2] == row[: step + 1]  # stopped right after EOS, EOS included
    for ids, full in zip(got, free, strict=True):
        cut = full.index(eos) + 1 if eos in full else 16
        assert ids == full[:cut]
    # a list of EOS ids works the same
    assert generate(ours, PROMPTS, max_new_tokens=16, eos_token_id=[eos]) == expected


# ---- sample() ----


def test_top_k_1_is_argmax_at_any_temperature():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 3
    argmax = torch.from_numpy(np.argmax(logits.numpy(), axis=-1))
    gen = torch.Generator().manual_seed(1)
    for temperature in (0.3, 1.0, 2.0, 50.0):
        assert torch.equal(sample(logits, temperature=temperature, top_k=1, generator=gen), argmax)
    assert torch.equal(sample(logits, temperature=0.0), argmax)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_top_k_samples_only_the_k_most_likely(k):
    probs = np.array([0.04, 0.20, 0.07, 0.15, 0.01, 0.18, 0.10, 0.03, 0.13, 0.09])
    top = set(np.argsort(-probs)[:k].tolist())
    logits = torch.log(torch.tensor(probs, dtype=torch.float32)).expand(2000, -1)
    draws = sample(logits, temperature=1.0, top_k=k, generator=torch.Generator().manual_seed(k))
    seen = set(draws.tolist())
    assert seen <= top
    assert seen == top  # each top-k token has p >= 0.10: missing one in 2000 draws has probability < 1e-90


NUCLEUS_PROBS = np.array([0.02, 0.16, 0.06, 0.30, 0.08, 0.12, 0.04, 0.22])  # sorted: .30 .22 .16 .12 .08 ...


def _nucleus(probs: np.ndarray, p: float) -> np.ndarray:
    """Indices of the smallest set of most likely tokens whose total probability reaches p."""
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    size = int(np.searchsorted(cum, p)) + 1  # first index with cum >= p
    return order[:size]


@pytest.mark.parametrize(("top_p", "temperature"), [(0.7, 1.0), (0.5, 1.0), (0.9, 0.7), (0.6, 1.5)])
def test_top_p_samples_the_nucleus_with_renormalised_frequencies(top_p, temperature):
    tempered = np.exp(np.log(NUCLEUS_PROBS) / temperature)
    tempered /= tempered.sum()
    nucleus = _nucleus(tempered, top_p)
    assert 1 < len(nucleus) < len(NUCLEUS_PROBS)  # the case tests something
    # no cumulative sum lands within 1e-3 of top_p: the expected set does not hinge on float rounding
    assert np.abs(np.cumsum(np.sort(tempered)[::-1]) - top_p).min() > 1e-3

    n = 20000
    logits = torch.log(torch.tensor(NUCLEUS_PROBS, dtype=torch.float32)).expand(n, -1)
    draws = sample(logits, temperature=temperature, top_p=top_p, generator=torch.Generator().manual_seed(0))
    counts = np.bincount(draws.numpy(), minlength=len(NUCLEUS_PROBS))
    assert set(np.flatnonzero(counts).tolist()) == set(nucleus.tolist())

    # Renormalised probabilities inside the nucleus. Each count is Binomial(n, q): its frequency has standard error
    # sqrt(q (1 - q) / n) <= 0.0036 at n = 20000. Five standard errors keep a correct sampler's false-failure rate
    # below 1e-5 per token (the seed is fixed anyway), while the errors this guards against (sampling from the
    # un-renormalised distribution, or renormalising over the wrong set) move some frequency by more than 0.03.
    q = tempered[nucleus] / tempered[nucleus].sum()
    freq = counts[nucleus] / n
    tol = 5 * np.sqrt(q * (1 - q) / n)
    assert np.all(np.abs(freq - q) <= tol), (freq, q, tol)


TIE_LOGITS = torch.tensor([[np.log(2.0), 0.0, 0.0]], dtype=torch.float32)  # softmax: exactly [0.5, 0.25, 0.25]


def test_top_p_tie_case_reference():
    """The precondition of the next test: exact probabilities, and transformers keeps token 0 alone at top_p 0.5."""
    assert TIE_LOGITS.softmax(-1).tolist() == [[0.5, 0.25, 0.25]]
    hf_kept = torch.isfinite(TopPLogitsWarper(top_p=0.5)(None, TIE_LOGITS.clone())[0]).nonzero().flatten().tolist()
    assert hf_kept == [0] == _nucleus(np.array([0.5, 0.25, 0.25]), 0.5).tolist()


def test_top_p_excludes_token_once_mass_before_it_reaches_p():
    draws = sample(TIE_LOGITS.expand(2000, -1), temperature=1.0, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0}


def _generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_same_seed_same_samples():
    logits = torch.randn(8, 40, generator=torch.Generator().manual_seed(0))
    kw = dict(temperature=0.9, top_k=20, top_p=0.95)
    draws = [torch.stack([sample(logits, **kw, generator=g) for _ in range(20)]) for g in _generators(5, 5, 6)]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


def test_generate_with_sampling_is_reproducible_and_greedy_at_top_k_1(models):
    _, ours = models
    a = generate(ours, PROMPTS, max_new_tokens=8, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(3))
    b = generate(ours, PROMPTS, max_new_tokens=8, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(3))
    assert a == b
    greedy = generate(ours, PROMPTS, max_new_tokens=8)
    assert generate(ours, PROMPTS, max_new_tokens=8, temperature=1.0, top_k=1) == greedy


# ---- generate.py ----


def _popen(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "generate.py", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _train_sentencepiece(directory: Path) -> Path:
    """A tiny BPE SentencePiece model with byte fallback, saved as directory/tokenizer.model."""
    import sentencepiece as spm

    rng = random.Random(0)
    words = "the cat dog sat on mat a big small red blue ran fast slow over under hill tree".split()
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(400)) + "\n")
    # byte_fallback reserves 256 byte pieces (+ 3 meta pieces + the corpus characters), so vocab 128 is too
    # small for SentencePiece to train at all; 300 is the smallest round size that works.
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "sp"),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    tokenizer_dir = directory / "tokenizer"
    tokenizer_dir.mkdir()
    shutil.copyfile(directory / "sp.model", tokenizer_dir / "tokenizer.model")
    return tokenizer_dir


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Checkpoints and reference outputs; the generate.py runs are started together (each imports torch)."""
    root = tmp_path_factory.mktemp("cli")
    config = ModelConfig(**{**BASE, "num_key_value_heads": 2})
    hf = _hf_model(config, seed=11)
    prompts = [[7, 8, 9], [100, 3, 55, 21, 90], [64]]
    # the checkpoint's EOS: a token greedy decoding of prompt 0 produces at step 4 (not earlier), so generate.py
    # must honour the checkpoint's eos_token_id to print what transformers prints
    free = _hf_greedy(hf, prompts[0], 12)
    eos = next(t for i, t in enumerate(free) if i >= 4 and t not in free[:i])
    hf.config.eos_token_id = hf.generation_config.eos_token_id = eos
    hf.save_pretrained(root / "hf")
    hf_to_native(root / "hf", root / "native", tp=2)

    reference = transformers.AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    expected = []
    for p in prompts:  # the checkpoint's own generation_config (with its EOS) drives transformers' generate
        expected.append(reference.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p) :].tolist())
    assert any(len(e) < 12 and e[-1] == eos for e in expected)

    # a model with the vocabulary of a trained SentencePiece tokenizer (BOS 1, EOS 2, as SentencePiece assigns)
    import sentencepiece as spm

    tokenizer_dir = _train_sentencepiece(root)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    text_config = ModelConfig(**{**BASE, "vocab_size": sp.vocab_size(), "bos_token_id": 1, "eos_token_id": 2})
    text_hf = _hf_model(text_config, seed=12)
    text_hf.save_pretrained(root / "text_hf")
    text_prompt = "the big cat sat on"
    prompt_ids = [sp.bos_id(), *sp.encode(text_prompt)]
    text_new = _hf_greedy(text_hf, prompt_ids, 10, eos_token_id=2)

    ids_args = [a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))]
    common = ["--max-new-tokens", "12", "--temperature", "0", "--print-ids"]
    procs = {
        "hf": _popen(["--ckpt", str(root / "hf"), *ids_args, *common]),
        "native": _popen(["--ckpt", str(root / "native"), *ids_args, *common]),
        "text": _popen(
            ["--ckpt", str(root / "text_hf"), "--prompt", text_prompt, "--tokenizer", str(tokenizer_dir)]
            + ["--max-new-tokens", "10", "--temperature", "0"]
        ),
    }
    runs = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        runs[name] = (proc.returncode, out, err)
    return {
        "runs": runs,
        "expected_ids": expected,
        "expected_text": sp.decode(prompt_ids + text_new),
        "native_config": json.loads((root / "native" / "config.json").read_text()),
        "eos": eos,
    }


@pytest.mark.parametrize("ckpt", ["hf", "native"])
def test_generate_cli_print_ids_equals_transformers(cli, ckpt):
    returncode, out, err = cli["runs"][ckpt]
    assert returncode == 0, err
    lines = out.splitlines()
    assert out.endswith("\n") and len(lines) == len(cli["expected_ids"])
    assert [[int(t) for t in line.split()] for line in lines] == cli["expected_ids"]
    if ckpt == "native":
        assert cli["native_config"]["eos_token_id"] == cli["eos"]


def test_generate_cli_text_prompt_with_sentencepiece(cli):
    returncode, out, err = cli["runs"]["text"]
    assert returncode == 0, err
    assert "Traceback" not in err
    assert out.splitlines() == [cli["expected_text"]]
    assert cli["expected_text"].startswith("the big cat sat on")
