"""The same global batch gives the same loss and gradient norm per step whatever the layout: ZeRO-1 on 2
data-parallel ranks (and ZeRO-2 in one plain process) vs one process, dp=2 x tp=2 on 4 processes under ZeRO-2, and
tp=2 with sequence parallelism on text as without it (its samples too). Elsewhere: tp=2, dp=2 and dp=2 ZeRO-2 on
text vs one process, and ZeRO-3 at dp=2 resumed from dp=2: test_layout_resume.py; ZeRO-3 at dp=2 from the start:
test_pretrain_outputs.py and test_launchers.py; tensor-split gradients reduced by the torch engine over the
data-parallel x context group: cp=2 x tp=2 in test_pretrain_context.py. Each run is pretrain_llama.py launched by
torchrun on gloo.

The reference is the one-process run: no collectives, no sharding. The pre-clip grad norm is compared too (relative
1e-5): the loss alone would not see a gradient scaled by dp or grad_accum, as AdamW and clipping undo the scale.
Synthetic data numbers every sequence of the run globally, so every layout sees the same sequences in each step
(training/data.py).
"""

import pytest

from tests.integration.train_utils import assert_same_curve, metrics, pretrain, text_corpus, text_overrides

TOL = 1e-4
STEPS = 10


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ref")
    pretrain(out)
    ref = metrics(out)
    assert len(ref) == STEPS
    assert ref[-1]["loss"] < ref[0]["loss"] - 0.1, f"the reference run does not learn: {[r['loss'] for r in ref]}"
    return ref


def _assert_close(got: list[dict], ref: list[dict]) -> None:
    assert_same_curve(got, ref, loss_tol=TOL)


# tp=2, dp=2 (ZeRO-0) and dp=2 ZeRO-2 against one process: tests/integration/test_layout_resume.py, on text; ZeRO-3
# at dp=2: test_pretrain_outputs.py (the weights too) and test_launchers.py (accelerate), and resumed in
# test_layout_resume.py
def test_zero1_dp2_matches_one_process(reference, tmp_path):
    pretrain(tmp_path, ["parallel.deepspeed_config=configs/deepspeed/zero1.json"], nproc=2)
    _assert_close(metrics(tmp_path), reference)


def test_zero2_in_one_plain_python_process_matches(reference, tmp_path):
    # no launcher: the trainer makes a world of one for DeepSpeed itself
    pretrain(tmp_path, ["parallel.deepspeed_config=configs/deepspeed/zero2.json"])
    _assert_close(metrics(tmp_path), reference)


def test_dp2_tp2_zero2_four_processes_match_one_process(reference, tmp_path):
    pretrain(tmp_path, ["parallel.tp=2", "parallel.deepspeed_config=configs/deepspeed/zero2.json"], nproc=4)
    _assert_close(metrics(tmp_path), reference)


def test_tp2_sequence_parallel_on_text_samples_as_without_it(tmp_path):
    # the samples' KV cache feeds a token at a time, which sequence parallelism cannot split: generation runs the
    # layers with whole sequences (modeling.generation.whole_sequences); it used to stop the run at its first sample.
    # Plain tp=2 equals one process in test_layout_resume.py; sequence parallelism at tp=2 against one process also
    # in the pp=2 x tp=2 (test_pretrain_pipeline.py) and cp=2 x tp=2 (test_pretrain_context.py) runs.
    (tmp_path / "corpus").mkdir()
    corpus = text_corpus(tmp_path / "corpus")
    text = [*text_overrides(corpus), "train.max_steps=4", "train.sample_tokens=4"]
    runs = {}
    for name, extra in (("sp", ["parallel.sequence_parallel=true"]), ("plain", [])):
        proc = pretrain(tmp_path / name, [*text, "parallel.tp=2", *extra], nproc=2)
        runs[name] = [line for line in proc.stdout.splitlines() if line.startswith("sample ")]
    assert runs["sp"] and runs["sp"] == runs["plain"]
    assert_same_curve(metrics(tmp_path / "sp"), metrics(tmp_path / "plain"), loss_tol=TOL)
