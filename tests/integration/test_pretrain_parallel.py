"""The same global batch gives the same loss and gradient norm per step whatever the layout: ZeRO-1 on 2
data-parallel ranks (and ZeRO-2 in one plain process) vs one process, dp=2 x tp=2 on 4 processes under ZeRO-2, and
tp=2 with sequence parallelism on text as without it (its samples too). Elsewhere: tp=2, dp=2 and dp=2 ZeRO-2 on
text vs one process, and ZeRO-3 at dp=2 resumed from dp=2: test_layout_resume.py; ZeRO-3 at dp=2 from the start:
test_pretrain_outputs.py and test_launchers.py; tensor-split gradients reduced by the torch engine over the
data-parallel x context group: cp=2 x tp=2 in test_pretrain_context.py. The runs are the scenarios of `runs`, one
torchrun launch (gloo) per process count (train_utils.run_worlds), except ZeRO-2 in one plain process:
pretrain_llama.py started by python alone.

The reference is the one-process run: no collectives, no sharding. The pre-clip grad norm is compared too (relative
1e-5): the loss alone would not see a gradient scaled by dp or grad_accum, as AdamW and clipping undo the scale.
Synthetic data numbers every sequence of the run globally, so every layout sees the same sequences in each step
(training/data.py).
"""

import pytest

from tests.integration.train_utils import (
    Run,
    assert_same_curve,
    metrics,
    pretrain,
    run_worlds,
    text_corpus,
    text_overrides,
)

TOL = 1e-4
STEPS = 10
ZERO = "parallel.deepspeed_config=configs/deepspeed/zero{}.json"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """Every run of this module but the plain-process one, by name; the reference learns."""
    root = tmp_path_factory.mktemp("parallel")
    (root / "corpus").mkdir()
    text = [*text_overrides(text_corpus(root / "corpus")), "train.max_steps=4", "train.sample_tokens=4"]
    text += ["parallel.tp=2"]
    runs = run_worlds(
        root,
        {
            "reference": (1, []),
            "zero1_dp2": (2, [ZERO.format(1)]),
            "text_tp2_sp": (2, [*text, "parallel.sequence_parallel=true"]),
            "text_tp2": (2, text),
            "dp2_tp2_zero2": (4, ["parallel.tp=2", ZERO.format(2)]),
        },
    )
    ref = metrics(runs["reference"].out)
    assert len(ref) == STEPS
    assert ref[-1]["loss"] < ref[0]["loss"] - 0.1, f"the reference run does not learn: {[r['loss'] for r in ref]}"
    return runs


# tp=2, dp=2 (ZeRO-0) and dp=2 ZeRO-2 against one process: tests/integration/test_layout_resume.py, on text; ZeRO-3
# at dp=2: test_pretrain_outputs.py (the weights too) and test_launchers.py (accelerate), and resumed in
# test_layout_resume.py
@pytest.mark.parametrize("name", ["zero1_dp2", "dp2_tp2_zero2"])
def test_layouts_match_one_process(runs, name):
    assert_same_curve(metrics(runs[name].out), metrics(runs["reference"].out), loss_tol=TOL)


def test_zero2_in_one_plain_python_process_matches(runs, tmp_path):
    # no launcher: the trainer makes a world of one for DeepSpeed itself
    pretrain(tmp_path, [ZERO.format(2)])
    assert_same_curve(metrics(tmp_path), metrics(runs["reference"].out), loss_tol=TOL)


def test_tp2_sequence_parallel_on_text_samples_as_without_it(runs):
    # the samples' KV cache feeds a token at a time, which sequence parallelism cannot split: generation runs the
    # layers with whole sequences (modeling.generation.whole_sequences); it used to stop the run at its first sample.
    # Plain tp=2 equals one process in test_layout_resume.py; sequence parallelism at tp=2 against one process also
    # in the pp=2 x tp=2 (test_pretrain_pipeline.py) and cp=2 x tp=2 (test_pretrain_context.py) runs.
    sp, plain = runs["text_tp2_sp"], runs["text_tp2"]
    assert sp.printed("sample ") and sp.printed("sample ") == plain.printed("sample ")
    assert_same_curve(metrics(sp.out), metrics(plain.out), loss_tol=TOL)
