"""sft.py end to end, from a Hugging Face directory and from a native checkpoint; generate.py --chat.

- Full fine-tuning from a `transformers` save_pretrained directory: a tiny model answers held-out questions of a
  generated task far more often than before.
- configs/sft_tiny.yaml runs, and a run from an HF directory starts from exactly its weights; at cp=2 it gives
  cp=1's loss curve (full fine-tuning at tp=2: tests/integration/test_dpo.py, whose DPOTrainer is sft.py's; an HF
  start at tp=2: tests/integration/test_vocab_padding.py; SFT data at tp=2: the LoRA test below).
- LoRA from a native checkpoint: tp=2 gives tp=1's loss curve, as does a run stopped and resumed; the checkpoint
  holds only the adapter; merged, it gives the LoRA model's logits and greedy ids (generate.py --lora) in
  transformers.
- generate.py --chat streams, over two turns, what greedy generation of the rendered conversation gives.

The task: `Repeat:\\nk o l` -> `k o l` for random strings of three letters. Training and held-out strings are
disjoint, so only a model that learned to copy (not one that memorised) answers the held-out ones. The base models are
randomly initialised (they answer none); the tokenizer is trained by dataset/train_tokenizer.py, which reserves the
chat markers the template needs, on text that makes every letter one token wherever it stands.
"""

import json
import random
import subprocess
import sys

import pytest
import torch

from tests.integration.train_utils import REPO_ROOT, env

LETTERS = "abcdefghijklmnoprstuvw"
ARCH = dict(  # shared by the native and the HF base
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    rng = random.Random(1)
    seen: set[str] = set()

    def word():
        while (w := " ".join(rng.choice(LETTERS) for _ in range(3))) in seen:
            pass
        seen.add(w)
        return w

    held = [word() for _ in range(40)]
    train = [word() for _ in range(3000)]
    for name, words in (("train", train), ("held", held)):
        rows = [{"prompt": f"Repeat:\n{w}", "response": w} for w in words]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # tokenizer text in which every " x" is a piece, so that a string tokenizes letter by letter wherever it stands
    text = "".join(f"Repeat:\n{w}\nuser assistant system\n" for w in train)
    (root / "text.txt").write_text(text)

    sys.path.insert(0, str(REPO_ROOT))
    import transformers

    from dataset.train_tokenizer import train_tokenizer
    from modeling.config import ModelConfig
    from modeling.convert import copy_tokenizer
    from modeling.llama import LlamaForCausalLM
    from modeling.native_format import save_native

    train_tokenizer([str(root / "text.txt")], root / "tok", vocab_size=340)
    torch.manual_seed(0)
    save_native(LlamaForCausalLM(ModelConfig(**ARCH)), root / "base")
    copy_tokenizer(root / "tok", root / "base")
    # a Hugging Face directory as transformers writes it: weights, config and a tokenizer without tokenizer.model
    torch.manual_seed(1)
    hf_config = transformers.LlamaConfig(**ARCH, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    transformers.LlamaForCausalLM(hf_config).save_pretrained(root / "hf")
    transformers.AutoTokenizer.from_pretrained(root / "tok").save_pretrained(root / "hf")
    assert not (root / "hf" / "tokenizer.model").exists()
    return root


def _sft(task, out, overrides=(), nproc=1, *, init_from="base", config=None, error=None):
    """Run sft.py; return the logged losses, or with `error` assert that it fails with that message instead."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    args = [] if config is None else ["--config", config]
    if config is None:
        args += [
            "data.seq_len=64",
            "data.document_attention=true",
            "train.micro_batch_size=16",
            "train.global_batch_size=16",
            "train.eval_batches=2",
            "train.sample_tokens=8",
            "train.sample_prompts=[Repeat a b c]",
            "optim.lr=5e-3",
            "optim.warmup_steps=20",
            "optim.decay=constant",  # the copy skill appears after a plateau of varying length: keep the rate up
            "optim.weight_decay=0.0",
            "checkpoint.every=0",
            "logging.log_every=1",
        ]
    args += [
        f"model.init_from={task / init_from}",
        f"data.train={task / 'train.jsonl'}",
        f"data.valid={task / 'held.jsonl'}",
        "logging.wandb_mode=disabled",
        "logging.progress_bar=false",
        f"checkpoint.dir={out}",
        *overrides,
    ]
    proc = subprocess.run(
        [*launcher, "sft.py", *args], cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=600
    )
    if error is not None:
        assert proc.returncode == 2 and error in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-5000:]
        return []
    assert proc.returncode == 0, proc.stderr[-5000:]
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def finetuned(task, tmp_path_factory):
    """Full fine-tuning of the HF base (its tokenizer is transformers' files only)."""
    out = tmp_path_factory.mktemp("sft_run") / "run"
    _sft(task, out, ["train.max_steps=400"], init_from="hf")
    return out


def _held_out_accuracy(task, model) -> float:
    from dataset.chat import ChatRenderer
    from dataset.tokenizer import Tokenizer
    from modeling.generation import generate

    tok = Tokenizer(task / "tok")
    renderer = ChatRenderer(tok)
    rows = [json.loads(line) for line in (task / "held.jsonl").read_text().splitlines()]
    prompts = [renderer.render([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)[0] for r in rows]
    outs = generate(model, prompts, max_new_tokens=6, eos_token_id=renderer.eot)
    answers = [tok.decode([i for i in o if i != renderer.eot]).strip() for o in outs]
    return sum(a == r["response"] for a, r in zip(answers, rows, strict=True)) / len(rows)


def test_finetuning_from_hf_teaches_the_held_out_task(task, finetuned):
    from modeling.convert import load_model

    before = _held_out_accuracy(task, load_model(task / "hf"))
    after = _held_out_accuracy(task, load_model(finetuned))
    assert before == 0.0
    assert after >= 0.5, after  # measured 40/40 here (36/40 to 40/40 over three data orders, train.seed)


def test_sft_tiny_config_runs_and_starts_from_the_hf_weights(task, tmp_path):
    # the shipped config with this test's model and data; lr 0: the checkpoint must be the HF model unchanged
    overrides = ["optim.lr=0", "optim.min_lr=0", "train.max_steps=1", "train.eval_batches=1", "train.sample_tokens=4"]
    _sft(task, tmp_path / "run", overrides, init_from="hf", config="configs/sft_tiny.yaml")
    from transformers import AutoModelForCausalLM

    from modeling.convert import load_model

    step = tmp_path / "run" / "step-00000001"
    assert (step / "tokenizer.json").is_file()
    from transformers import AutoTokenizer

    # transformers 5 keeps the chat template in chat_template.jinja: the checkpoint must carry it along
    template = AutoTokenizer.from_pretrained(task / "hf").chat_template
    assert template and AutoTokenizer.from_pretrained(step).chat_template == template
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_model(step).eval()(ids).logits
        ref = AutoModelForCausalLM.from_pretrained(task / "hf").eval()(ids).logits
    assert (ours - ref).abs().max().item() < 1e-5


def test_lora_pp2_matches_pp1_and_its_checkpoint_holds_every_stage(task, tmp_path):
    # two pipeline stages of one layer each; 2 micro-batches of 8 per step (1F1B needs at least pp of them)
    lora = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "train.micro_batch_size=8", "train.max_steps=4"]
    lora += ["train.eval_every=0", "train.sample_tokens=4"]
    pp1 = _sft(task, tmp_path / "pp1", lora)
    pp2 = _sft(task, tmp_path / "pp2", [*lora, "parallel.pp=2"], nproc=2)
    assert len(pp2) == 4 and max(abs(a - b) for a, b in zip(pp1, pp2, strict=True)) < 1e-5, (pp1, pp2)
    from modeling.lora_files import load_adapter_full

    _, one = load_adapter_full(tmp_path / "pp1" / "step-00000004")
    _, two = load_adapter_full(tmp_path / "pp2" / "step-00000004")
    assert one.keys() == two.keys() and any(".layers.1." in k for k in two)  # the last stage's layer too
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5


def test_full_finetuning_from_hf_at_cp2_gives_cp1s_loss_curve(task, tmp_path):
    # chunks of prompt-only tokens carry no loss: the loss is the whole sequences' mean over response tokens
    short = ["train.max_steps=3", "train.eval_every=0", "train.sample_tokens=4"]
    cp1 = _sft(task, tmp_path / "cp1", short, init_from="hf")
    cp2 = _sft(task, tmp_path / "cp2", [*short, "parallel.cp=2", "parallel.cp_attention=ring"], nproc=2, init_from="hf")
    assert len(cp2) == 3 and cp1[-1] < cp1[0], cp1
    assert max(abs(a - b) for a, b in zip(cp1, cp2, strict=True)) < 1e-5, (cp1, cp2)


def test_lora_tp2_matches_tp1_resumes_exactly_and_checkpoint_holds_only_the_adapter(task, tmp_path):
    # dropout on: tp=2 must draw tp=1's masks, and the resumed run must restore the RNG state
    lora = [
        "lora.enabled=true",
        "lora.r=4",
        "lora.alpha=8",
        "lora.dropout=0.1",
        "train.max_steps=10",
        "checkpoint.every=5",
    ]
    tp1 = _sft(task, tmp_path / "tp1", lora)
    tp2 = _sft(task, tmp_path / "tp2", [*lora, "parallel.tp=2"], nproc=2)
    assert len(tp1) == len(tp2) == 10
    assert max(abs(a - b) for a, b in zip(tp1, tp2, strict=True)) < 1e-4, (tp1, tp2)
    assert tp1[-1] < tp1[0]
    # stopped at step 5 and resumed (adapter, optimizer, data position): the uninterrupted curve
    for _ in range(2):
        resumed = _sft(task, tmp_path / "resumed", [*lora, "train.exit_interval=5"])
    assert resumed == tp1
    # resuming with other adapter settings is an error naming them, not a traceback
    _sft(task, tmp_path / "resumed", [*lora, "lora.r=8", "train.max_steps=12"], error="adapter has r=4")
    step = tmp_path / "tp2" / "step-00000010"
    assert sorted(p.name for p in step.glob("*.safetensors")) == [
        "adapter-tp00-of-02.safetensors",
        "adapter-tp01-of-02.safetensors",
        "optimizer-tp00-of-02.safetensors",
        "optimizer-tp01-of-02.safetensors",
    ]
    # the optimizer holds the adapter and nothing else (the frozen base has no moments)
    from safetensors import safe_open

    def shapes(path, suffix=""):
        with safe_open(str(path), framework="pt") as f:
            return {k.removesuffix(suffix): tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.endswith(suffix)}  # noqa: SIM118

    adapter_shapes = shapes(step / "adapter-tp01-of-02.safetensors")
    assert len(adapter_shapes) == 2 * 7 * 2
    assert shapes(step / "optimizer-tp01-of-02.safetensors", ".exp_avg") == adapter_shapes
    # the adapter folds into the base: transformers on the merged export gives the LoRA model's logits
    hf = tmp_path / "hf"
    merge = ["--to-hf", str(task / "base"), "--merge-lora", str(step), "--out", str(hf)]
    subprocess.run(
        [sys.executable, "-m", "modeling.convert", *merge], cwd=REPO_ROOT, env=env(), check=True, capture_output=True
    )
    from transformers import AutoModelForCausalLM

    from modeling.convert import load_model
    from modeling.lora_files import load_adapter

    ours = load_adapter(load_model(task / "base"), step).eval()
    merged = AutoModelForCausalLM.from_pretrained(hf).eval()
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids).logits - merged(ids).logits).abs().max().item()
    assert diff < 1e-4
    # generate.py applies the adapter to its base: transformers' greedy ids on the merged export
    prompt = [1, 5, 9, 30, 31]
    proc = subprocess.run(
        [sys.executable, "generate.py", "--ckpt", str(task / "base"), "--lora", str(tmp_path / "tp2"), "--prompt-ids",
         ",".join(map(str, prompt)), "--max-new-tokens", "6", "--print-ids"],
        cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # generate.py without --chat stops at EOS only; the export's generation_config also stops at the end of turn
    eos = merged.config.eos_token_id
    ref = merged.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=eos)[0, len(prompt) :]
    assert proc.stdout.split() == [str(i) for i in ref.tolist()]


def test_chat_streams_the_greedy_replies_of_two_turns(task, finetuned):
    from dataset.chat import ChatRenderer
    from dataset.tokenizer import Tokenizer
    from modeling.config import resolve_checkpoint_dir
    from modeling.convert import load_model
    from modeling.generation import generate

    system, turns, max_new = "You repeat the letters.", ["Repeat: k o l", "Repeat: a b"], 8
    proc = subprocess.run(
        [sys.executable, "generate.py", "--ckpt", str(finetuned), "--chat", "--system", system, "--max-new-tokens",
         str(max_new)],
        input="".join(t + "\n" for t in turns) + "/exit\nRepeat: never asked\n",
        cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the reference: the same conversation rendered by the template and generated greedily, turn by turn
    model = load_model(finetuned)
    tok = Tokenizer(resolve_checkpoint_dir(finetuned))
    renderer = ChatRenderer(tok)
    markers = {renderer.header, renderer.end_header, renderer.eot}
    history, replies = [{"role": "system", "content": system}], []
    for turn in turns:
        history.append({"role": "user", "content": turn})
        prompt = renderer.render(history, add_generation_prompt=True)[0]
        out = generate(model, [prompt], max_new_tokens=max_new, eos_token_id=[renderer.eot, tok.eos_id])[0]
        replies.append(tok.decode([i for i in out if i not in markers]))
        history.append({"role": "assistant", "content": replies[-1]})
    assert proc.stdout == "".join(r + "\n" for r in replies)


def test_chat_streamer_writes_each_token_as_it_comes_and_never_half_a_character(task):
    sys.path.insert(0, str(REPO_ROOT))
    from dataset.tokenizer import Tokenizer
    from generate import ReplyStreamer

    tok = Tokenizer(task / "tok")
    text = " k o l café 🙂 a b"  # é and 🙂 are byte pieces: several tokens, one character
    ids = tok.encode(text)
    writes: list[tuple[int, str]] = []
    streamer = ReplyStreamer(tok, {tok.eos_id}, echo=True)
    streamer._write = lambda s: writes.append((len(streamer.ids), s))
    for token in [*ids, tok.eos_id]:
        streamer(0, token)
    reply = streamer.finish()
    assert reply == tok.decode(ids) and "".join(s for _, s in writes) == reply + "\n"
    assert all("\ufffd" not in s for _, s in writes)
    # streamed: the first letters are out after the first few tokens, long before the reply ends
    assert writes[0][0] <= 2 and len(writes) > len(ids) // 2
    assert len(writes) < len(ids) + 1  # the bytes of one character were held back until it was whole
