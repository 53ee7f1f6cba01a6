"""Layout-free checkpoints on text shards: the same global batches at any layout, resumes across layouts.

Three launches of tests/integration/layout_runs.py run every scenario (one process, then a torchrun world of 2,
then one process again); each test compares what they wrote with the uninterrupted one-process run `ref`
(independent of the checkpoint code under test: it never resumes).
- The first 10 steps (loss and grad norm) of dp=2, dp=2 with ZeRO-2 and micro-batch 4 instead of 2, tp=2 and an MoE
  run at ep=2 equal the one-process run's, at the same global batch of 8 sequences.
- Saved at step 10 and resumed to step 20 at another layout, steps 11-20 equal the one-process run's:
  dp=2 ZeRO-2 -> one process; one process -> tp=2; dp=2 torch -> dp=2 ZeRO-3; tp=2 -> pp=2; tp=2 -> cp=2; MoE ep=2 ->
  ep=1.
- Every sequence is trained on exactly once across a resume at another layout, also when the global batch size
  changes (8 -> 4: a warning, and the stream goes on at the next unseen sequence): the rows the ranks trained on,
  in global order, are the one-process run's.
- Another tokenizer or sequence length is refused, naming it.
"""

import json

import pytest

from tests.integration.train_utils import (
    MOE,
    assert_same_curve,
    metrics,
    run_scenarios,
    text_corpus,
    text_overrides,
)

# fp32 on gloo: the layouts differ in reduction order only. Measured: see the README's checkpoint section.
TOL = 1e-5
# dp=2 -> ZeRO-3: DeepSpeed steps its flat fp32 partitions. With fused AdamW (training.optim) step 20's gradient
# norm differs from the one-process run's by 2.6e-5 relative (5.8e-6 with foreach AdamW): fp32 rounding grown over
# 20 steps, where a gradient scaled wrongly (by dp or grad_accum) moves it by 1e-2 or more
ZERO3_NORM_RTOL = 5e-5
ZERO2 = "parallel.deepspeed_config=configs/deepspeed/zero2.json"
ZERO3 = "parallel.deepspeed_config=configs/deepspeed/zero3.json"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every scenario; returns (root, {phase: stdout})."""
    root = tmp_path_factory.mktemp("layouts")
    (root / "corpus").mkdir()
    corpus = text_corpus(root / "corpus")
    from dataset.train_tokenizer import train_tokenizer

    train_tokenizer([str(corpus / "train" / "*.jsonl.zst")], root / "tok2", vocab_size=400, split_digits=False)
    text = [
        *text_overrides(corpus),
        "data.seq_len=32",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
        "train.max_steps=20",
        "checkpoint.every=10",
        "model.vocab_size=512",  # the tokenizer's 400 would pad to 448 at tp=1, 512 at tp=2: another model
    ]
    first = [*text, "train.exit_interval=10"]  # the same LR schedule (max_steps=20), stopped at step 10

    def sc(name, overrides, seed=None, error=None):
        seed_from = None if seed is None else str(root / seed / "step-00000010")
        return {"out": str(root / name), "overrides": overrides, "seed_from": seed_from, "expect_error": error}

    out = {}
    out["one"] = run_scenarios(
        [sc("ref", [*text, "data.num_workers=2"]), sc("moe_ref", [*text, *MOE])], root / "one.json", 1
    ).stdout
    out["two"] = run_scenarios(
        [
            sc("dp2", first),
            sc("dp2_zero2_m4", [*first, ZERO2, "train.micro_batch_size=4"]),
            sc("tp2", [*first, "parallel.tp=2"]),
            sc("moe_ep2", [*first, *MOE, "parallel.ep=2"]),
            sc("one_to_tp2", [*text, "parallel.tp=2"], seed="ref"),
            sc("dp2_to_zero3", [*text, ZERO3], seed="dp2"),
            sc("tp2_to_pp2", [*text, "parallel.pp=2"], seed="tp2"),
            sc("tp2_to_cp2", [*text, "parallel.cp=2"], seed="tp2"),
            sc("dp2_to_batch4", [*text, "train.global_batch_size=4"], seed="dp2"),
        ],
        root / "two.json",
        2,
    ).stdout
    out["three"] = run_scenarios(
        [
            sc("zero2_to_one", text, seed="dp2_zero2_m4"),
            sc("ep2_to_one", [*text, *MOE], seed="moe_ep2"),
            sc("tokenizer", [*text, f"data.tokenizer={root / 'tok2'}"], seed="ref", error=True),
            sc("seq_len", [*text, "data.seq_len=16"], seed="ref", error=True),
        ],
        root / "three.json",
        1,
    ).stdout
    return root, out


def _global_rows(run_dir) -> list[list[str]]:
    """The rows of each step in global-batch order: the data ranks' rows of a step, in rank order."""
    records = sorted((json.loads(p.read_text()) for p in run_dir.glob("rows-dp*.json")), key=lambda r: r["dp_rank"])
    steps = []
    for record in records:
        rows = record["rows"]
        per_step = len(rows) // 10  # every run trains 10 steps
        for s in range(10):
            if len(steps) <= s:
                steps.append([])
            steps[s] += rows[s * per_step : (s + 1) * per_step]
    return steps


@pytest.mark.parametrize("run", ["dp2", "dp2_zero2_m4", "tp2"])
def test_first_steps_equal_one_process(runs, run):
    root, _ = runs
    assert_same_curve(metrics(root / run), metrics(root / "ref")[:10], loss_tol=TOL, norm_rtol=TOL)


def test_moe_ep2_first_steps_and_resume_at_ep1(runs):
    root, _ = runs
    ref = metrics(root / "moe_ref")
    assert_same_curve(metrics(root / "moe_ep2"), ref[:10], loss_tol=TOL, norm_rtol=TOL)
    assert_same_curve(metrics(root / "ep2_to_one"), ref[10:], loss_tol=TOL, norm_rtol=TOL)


@pytest.mark.parametrize(
    ("run", "first"),
    [
        ("zero2_to_one", "dp2_zero2_m4"),
        ("one_to_tp2", None),
        ("dp2_to_zero3", "dp2"),
        ("tp2_to_pp2", "tp2"),
        ("tp2_to_cp2", "tp2"),
    ],
)
def test_resume_at_another_layout_continues_the_one_process_run(runs, run, first):
    root, out = runs
    ref = metrics(root / "ref")
    norm_rtol = ZERO3_NORM_RTOL if "zero3" in run else TOL
    assert_same_curve(metrics(root / run), ref[10:], loss_tol=TOL, norm_rtol=norm_rtol)
    assert "resuming at another layout (" in out["two"] + out["three"]
    # every sequence once, in the same global order: the rows of both halves are the one-process run's
    before = _ref_steps(root)[:10] if first is None else _global_rows(root / first)
    assert before + _global_rows(root / run) == _ref_steps(root)


def _ref_steps(root) -> list[list[str]]:
    record = json.loads((root / "ref" / "rows-dp0.json").read_text())
    return [record["rows"][s * 8 : (s + 1) * 8] for s in range(20)]


def test_changed_global_batch_continues_at_the_next_unseen_sequence(runs):
    root, out = runs
    assert "warning: train.global_batch_size changed from 8 to 4" in out["two"], out["two"][-3000:]
    ref_rows = [row for step in _ref_steps(root) for row in step]  # the stream's sequences in order
    trained = [row for step in _global_rows(root / "dp2") + _global_rows(root / "dp2_to_batch4") for row in step]
    assert len(trained) == 10 * 8 + 10 * 4
    assert trained == ref_rows[: len(trained)]  # none repeated, none skipped, in the stream's order


@pytest.mark.parametrize(("run", "named"), [("tokenizer", "tokenizer"), ("seq_len", "data.seq_len")])
def test_resume_that_cannot_continue_is_refused(runs, run, named):
    root, _ = runs
    message = (root / run / "error.txt").read_text()
    assert message.startswith("CheckpointError: ") and named in message, message  # a user error: exit 2, one line
