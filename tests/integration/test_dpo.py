"""dpo.py end to end: layouts, resume, the precomputed reference, and a preference the model learns.

Two launches of tests/integration/layout_runs.py (one process, then a torchrun world of 2) run every scenario with
dpo.py's DPOTrainer, from one randomly initialised native base and a tokenizer with the chat markers:
- tp=2 (full fine-tuning and LoRA), dp=2 under ZeRO-2 and dp=2 under ZeRO-3 (LoRA, whose live reference runs
  through ZeRO-3's gathering hooks) give the one-process run's loss, gradient norm and rewards at every step (and
  its final eval where dp=1: each dp rank evaluates its own pairs); LoRA at tp=2 and full fine-tuning under
  ZeRO-2, each stopped at step 3 and resumed, give the uninterrupted one-process run's curve.
- A precomputed reference (`dpo.precompute_reference`) gives the live reference's losses, at one process and under
  ZeRO-3 at dp=2 (whose collective pass over an odd number of pairs must keep the ranks in step).
- Step 1's loss is log 2 on every layout: the policy is the reference there, so h = 0 and -log sigmoid(0) = log 2
  (a reference that is not the start, or log-probs summed over the wrong tokens, moves it).
- The task: chosen responses are spelled with letters of the first half of the alphabet, rejected ones with the
  second half; the held-out pairs are strings never trained on. The base prefers the chosen response of about half
  of them (read from the precomputed reference's table); after 40 steps the eval reward accuracy is above 0.9.
- IPO starts at (1 / (2 beta))^2 and goes down; parallel.pp=2 is refused, naming the key; configs/dpo_tiny.yaml
  runs.
"""

import json
import random
import sys

import pytest
import torch

from tests.integration.train_utils import REPO_ROOT, assert_same_curve, eval_metrics, metrics, run_scenarios

FIRST, SECOND = "abcdefghijk", "lmnoprstuvw"
ARCH = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)
TOL = 1e-5  # fp32 on gloo: the layouts differ in reduction order only
STEPS = 6
ZERO2 = "parallel.deepspeed_config=configs/deepspeed/zero2.json"
ZERO3 = "parallel.deepspeed_config=configs/deepspeed/zero3.json"
LORA = ["lora.enabled=true", "lora.r=4", "optim.lr=3e-3"]  # no dropout: dp layouts draw other masks


def _pair(rng: random.Random, form: int) -> dict:
    prompt = "Pick:\n" + " ".join(rng.choice(FIRST + SECOND) for _ in range(3))
    chosen, rejected = (" ".join(rng.choice(letters) for _ in range(3)) for letters in (FIRST, SECOND))
    if form == 0:
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if form == 1:
        return {
            "messages": [{"role": "user", "content": prompt}],
            "chosen": {"role": "assistant", "content": chosen},
            "rejected": {"role": "assistant", "content": rejected},
        }
    return {  # TRL's conversational form
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    rng = random.Random(3)
    train = [_pair(rng, i % 3) for i in range(257)]  # odd: the ranks' shares of the precomputed pass differ
    seen = {json.dumps(p, sort_keys=True) for p in train}
    held = [p for p in (_pair(rng, 0) for _ in range(80)) if json.dumps(p, sort_keys=True) not in seen][:64]
    for name, rows in (("train", train), ("held", held)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # tokenizer text in which every " x" is a piece: a response tokenizes letter by letter
    letters = " ".join(FIRST + SECOND)
    (root / "text.txt").write_text("".join(f"Pick:\n{letters}\nuser assistant system\n" for _ in range(200)))

    sys.path.insert(0, str(REPO_ROOT))
    from dataset.train_tokenizer import train_tokenizer
    from modeling.config import ModelConfig
    from modeling.convert import copy_tokenizer
    from modeling.llama import LlamaForCausalLM
    from modeling.native_format import save_native

    train_tokenizer([str(root / "text.txt")], root / "tok", vocab_size=300)
    torch.manual_seed(0)
    save_native(LlamaForCausalLM(ModelConfig(**ARCH)), root / "base")
    copy_tokenizer(root / "tok", root / "base")
    return root


def _common(task) -> list[str]:
    return [
        f"model.init_from={task / 'base'}",
        f"data.train={task / 'train.jsonl'}",
        f"data.valid={task / 'held.jsonl'}",
        "data.seq_len=48",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
        f"train.max_steps={STEPS}",
        "train.seed=1",
        "train.eval_batches=4",
        "train.eval_every=0",
        "train.sample_every=0",
        "train.sample_tokens=4",
        "train.sample_prompts=[Pick a b c]",
        "optim.lr=1e-3",
        "optim.warmup_steps=0",
        "optim.decay=constant",
        "optim.weight_decay=0.0",
        "checkpoint.every=0",
        "logging.log_every=1",
        "logging.wandb_mode=disabled",
        "logging.progress_bar=false",
        "dpo.beta=0.5",
    ]


@pytest.fixture(scope="module")
def runs(task, tmp_path_factory):
    """Run every scenario; returns the directory holding one run directory per scenario name."""
    root = tmp_path_factory.mktemp("dpo_runs")
    common = _common(task)

    def scenario(name: str, *overrides: str, expect_error: str | None = None) -> dict:
        return {
            "out": str(root / name),
            "overrides": [*common, *overrides],
            "trainer": "dpo",
            "expect_error": expect_error,
        }

    run_scenarios(
        [
            scenario("full"),
            scenario("full_pre", "dpo.precompute_reference=true"),
            scenario("lora", *LORA),
            scenario("ipo", "dpo.loss=ipo", "train.max_steps=2"),
            {  # the shipped config runs (its paths replaced by the task's)
                **scenario("tiny_config", "train.max_steps=2", "train.eval_batches=1", "train.sample_tokens=2"),
                "config": "configs/dpo_tiny.yaml",
            },
            scenario(
                "learn",
                "dpo.precompute_reference=true",
                "train.max_steps=40",
                "train.eval_every=40",
                "train.sample_every=40",
                "optim.lr=2e-3",
                "dpo.beta=0.1",
            ),
        ],
        root / "one.json",
        1,
    )
    run_scenarios(
        [
            scenario("full_tp2", "parallel.tp=2"),
            scenario("lora_tp2", *LORA, "parallel.tp=2", "train.exit_interval=3"),
            scenario("lora_tp2", *LORA, "parallel.tp=2"),  # resumes at step 3
            scenario("zero2", ZERO2, "train.exit_interval=3"),
            scenario("zero2", ZERO2),  # resumes at step 3: the frozen reference is rebuilt from model.init_from
            scenario("zero3_pre", ZERO3, "dpo.precompute_reference=true"),
            scenario("zero3_lora", ZERO3, *LORA),  # the live LoRA reference through ZeRO-3's gathering hooks
            scenario("pp2", "parallel.pp=2", expect_error="parallel.pp=2"),
        ],
        root / "two.json",
        2,
    )
    return root


@pytest.mark.parametrize(
    "name, ref",
    [
        ("full_tp2", "full"),
        ("zero2", "full"),
        ("zero3_pre", "full"),
        ("full_pre", "full"),
        ("lora_tp2", "lora"),
        ("zero3_lora", "lora"),
    ],
)
def test_layouts_and_references_give_the_one_process_live_curve(runs, name, ref):
    got, want = metrics(runs / name), metrics(runs / ref)
    assert len(want) == STEPS
    assert want[-1]["rewards/margin"] > 0.1 and want[-1]["loss"] < 0.6  # the reference stayed where the policy began
    assert_same_curve(got, want, loss_tol=TOL)
    for row, base in zip(got, want, strict=True):  # the rewards come from both log-probs of every pair
        assert row["rewards/margin"] == pytest.approx(base["rewards/margin"], abs=1e-5)
        assert row["rewards/accuracy"] == base["rewards/accuracy"]
    assert got[0]["loss"] == pytest.approx(0.6931472, abs=2e-6)  # log 2: policy == reference at step 1
    # data.valid at the last step, the precomputed valid table included
    evals, want_evals = eval_metrics(runs / name), eval_metrics(runs / ref)
    assert len(evals) == len(want_evals) == 1
    if name in ("full_tp2", "full_pre", "lora_tp2"):  # dp=1: the same held-out pairs (each dp rank reads its own)
        for key, value in want_evals[0].items():
            assert evals[0][key] == pytest.approx(value, rel=1e-5, abs=1e-5), key


def test_ipo_starts_at_its_margin_squared(runs):
    rows = metrics(runs / "ipo")
    assert rows[0]["loss"] == pytest.approx((1 / (2 * 0.5)) ** 2, abs=1e-6)  # (h - 1 / (2 beta))^2 at h = 0
    assert rows[1]["loss"] < rows[0]["loss"] and rows[1]["rewards/margin"] > 0


def test_the_shipped_config_runs(runs):
    rows = metrics(runs / "tiny_config")
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] == pytest.approx(0.6931472, abs=2e-6)


@pytest.mark.parametrize("name", ["lora_tp2", "zero2"])
def test_runs_stopped_and_resumed_continue_the_uninterrupted_run(runs, name):
    steps = [r["step"] for r in metrics(runs / name)]
    assert steps == list(range(1, STEPS + 1))  # 1-3, then 4-6 after the resume, one row each (curves: above)
    assert (runs / name / "step-00000003").is_dir()  # the checkpoint it resumed from


def test_a_held_out_preference_is_learned(runs):
    from safetensors.torch import load_file

    table = load_file(str(runs / "learn" / "reference_logps.safetensors"))["valid"]  # (64, 2) base log-probs
    base_accuracy = (table[:, 0] > table[:, 1]).float().mean().item()
    assert 0.2 < base_accuracy < 0.8, base_accuracy  # about chance: the base has no preference
    final = eval_metrics(runs / "learn")[-1]
    assert final["eval_rewards/accuracy"] > 0.9, final
    assert final["eval_rewards/margin"] > 0 and final["eval_loss"] < 0.5, final


def test_pipeline_parallelism_is_refused_naming_the_key(runs):
    message = (runs / "pp2" / "error.txt").read_text()
    assert "ConfigError" in message and "parallel.pp=2" in message and "dpo.py" in message
