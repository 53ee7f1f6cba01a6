"""Pipeline parallelism through pretrain_llama.py on gloo: the same global batch gives the same loss and pre-clip
gradient norm per step at pp=2 as in one process, for every schedule, an uneven cut with activation checkpointing
(under GPipe), bf16, pp x tp with sequence parallelism, pp x dp under ZeRO-1 with an MoE model at pp x ep, and pp=4.
The model is the tiny preset's shape with 4 layers and a tied embedding (tie_word_embeddings: true), so every run
also checks that the first stage's embedding and the last stage's copy stay one weight.

On real text (document attention, eval, samples): eval loss, bits per byte and the sampled text equal pp=1's; the
pp=2 checkpoint exports to Hugging Face with transformers' logits, and an HF model starts a pp=2 run.

The runs compared are the scenarios of `runs`: one launch per process count (train_utils.run_worlds).
"""

import json

import pytest
import torch

from parallel.pipeline import check_schedule_torch
from parallel.state import ParallelConfigError
from tests.integration.train_utils import (
    MOE,
    Run,
    assert_same_curve,
    assert_same_moe_stats,
    metrics,
    pretrain,
    run_worlds,
    text_corpus,
    text_overrides,
)

TOL = 1e-5
LAYERS = ["model.num_hidden_layers=4"]
AC = "train.activation_checkpointing=true"
BF16 = [*LAYERS, "train.dtype=bf16", "train.max_steps=5"]
SCHEDULES = {
    # 1f1b, the default: the text run, pp x tp, the MoE pp x ep run and pp=4 below (and pp x cp in
    # test_pretrain_context.py), each against one process. Here: an uneven cut, the first stage's 3 layers
    # recomputed in backward
    "gpipe_uneven_ac": ["parallel.pp_schedule=gpipe", "parallel.pp_layers=[3,1]", AC],
    "interleaved_1f1b": ["parallel.pp_schedule=interleaved_1f1b", "parallel.pp_stages_per_rank=2"],
    "zbv": ["parallel.pp_schedule=zbv", "parallel.pp_stages_per_rank=2"],  # a split backward
}
MOE_LAYOUTS = {
    # 2 stages x 2 data-parallel ranks, experts split over those; ZeRO-1 partitions the optimizer over dp (the
    # experts' over their expert-data-parallel group of 1). pp x dp under the torch engine: pp=2 x cp=2 in
    # test_pretrain_context.py (non-expert gradients are reduced over dp x cp alike)
    "pp2_ep2": (4, ["parallel.pp=2", "parallel.ep=2", "parallel.deepspeed_config=configs/deepspeed/zero1.json"]),
    "zbv": (2, ["parallel.pp=2", *SCHEDULES["zbv"]]),
}


def _zbv_refused() -> str | None:
    """Before torch 2.13 zbv's split backward fails; the run refuses it there (tests/unit/test_pipeline.py)."""
    try:
        check_schedule_torch("zbv")
    except ParallelConfigError as e:
        return str(e)
    return None


def _text(corpus) -> list[str]:
    return [*text_overrides(corpus), "data.document_attention=true", "train.max_steps=6", "train.eval_every=3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return text_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus) -> dict[str, Run]:
    """Every run of this module but the HF-started and the non-finite ones, by name."""
    scenarios = {
        "reference": (1, LAYERS),
        "moe_reference": (1, [*LAYERS, *MOE]),
        "bf16_one": (1, BF16),
        "text_one": (1, _text(corpus)),
        **{name: (2, [*LAYERS, "parallel.pp=2", *schedule]) for name, schedule in SCHEDULES.items()},
        "bf16_pp2": (2, [*BF16, "parallel.pp=2"]),
        "text_pp2": (2, [*_text(corpus), "parallel.pp=2"]),
        "pp2_tp2_sp": (4, [*LAYERS, "parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true"]),
        # middle stages: in no embedding group, one layer each, activations in and out
        "pp4": (4, [*LAYERS, "parallel.pp=4"]),
        **{f"moe_{name}": (n, [*LAYERS, *MOE, *layout]) for name, (n, layout) in MOE_LAYOUTS.items()},
    }
    if _zbv_refused():
        scenarios = {name: s for name, s in scenarios.items() if not name.endswith("zbv")}
    return run_worlds(tmp_path_factory.mktemp("pipeline"), scenarios)


def _skip_zbv(name: str) -> None:
    if name.endswith("zbv") and _zbv_refused():
        pytest.skip(_zbv_refused())


@pytest.mark.parametrize("name", [*SCHEDULES, "pp2_tp2_sp", "pp4"])
def test_schedules_and_layouts_match_one_process(runs, name):
    _skip_zbv(name)
    assert_same_curve(metrics(runs[name].out), metrics(runs["reference"].out), loss_tol=TOL)


def test_pp2_bf16_matches_one_process_bf16(runs):
    # the stages autocast their forwards only: a backward under autocast would run the fp32 formula backwards
    # (RMSNorm, the fused loss) in bf16 and drift from one process by 1e-3 in the grad norm within a few steps
    assert_same_curve(metrics(runs["bf16_pp2"].out), metrics(runs["bf16_one"].out), loss_tol=TOL)


@pytest.mark.parametrize("name", [f"moe_{name}" for name in MOE_LAYOUTS])
def test_moe_at_pp2_matches_one_process(runs, name):
    _skip_zbv(name)
    # every stage's aux losses in the objective, every stage's layers in rank 0's log
    got, want = metrics(runs[name].out), metrics(runs["moe_reference"].out)
    assert_same_curve(got, want, loss_tol=TOL)
    assert_same_moe_stats(got, want)


def _evals(out) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval_loss"], r["eval_bpb"]) for r in rows if "eval_loss" in r]


def test_text_run_at_pp2_equals_pp1_and_exports_to_hf(runs, corpus, tmp_path):
    one, pp2 = runs["text_one"], runs["text_pp2"]
    assert_same_curve(metrics(pp2.out), metrics(one.out), loss_tol=TOL)
    evals_one, evals_pp2 = _evals(one.out), _evals(pp2.out)
    assert [s for s, _, _ in evals_pp2] == [3, 6]
    for (_, loss_a, bpb_a), (_, loss_b, bpb_b) in zip(evals_pp2, evals_one, strict=True):
        assert loss_a == pytest.approx(loss_b, abs=TOL) and bpb_a == pytest.approx(bpb_b, abs=TOL)
    assert pp2.printed("sample ") and pp2.printed("sample ") == one.printed("sample ")

    # the pp=2 checkpoint is the native format of pp=1: it exports, and transformers computes the same logits
    from transformers import AutoModelForCausalLM

    from modeling.convert import load_model
    from modeling.convert import main as convert_main

    hf = tmp_path / "hf"
    convert_main(["--to-hf", str(pp2.out), "--out", str(hf)])

    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_model(pp2.out)(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(hf, attn_implementation="sdpa").eval()(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4

    # an HF model starts a pp=2 run as it starts a pp=1 run (the pp=2 checkpoint's weights are the export's, checked
    # above through transformers' logits)
    start = ["model.preset=null", "train.max_steps=2", "train.eval_every=0", "train.sample_every=0"]
    args = [*text_overrides(corpus), *start]
    pretrain(tmp_path / "from_hf1", [*args, f"model.init_from={hf}"])
    pretrain(tmp_path / "from_hf2", [*args, f"model.init_from={hf}", "parallel.pp=2"], nproc=2)
    assert_same_curve(metrics(tmp_path / "from_hf2"), metrics(tmp_path / "from_hf1"), loss_tol=TOL)


def test_nonfinite_steps_are_skipped_on_every_stage_then_stop(tmp_path):
    # the first stage's activations overflow, the last stage's loss is NaN: both stages skip the update together
    overrides = [*LAYERS, "parallel.pp=2", "model.initializer_range=1e18", "train.max_nonfinite_steps=3"]
    proc = pretrain(tmp_path, overrides, nproc=2, check=False)
    assert proc.returncode != 0 and "(exitcode: 2)" in proc.stderr, proc.stderr[-3000:]
    assert "3 non-finite losses or gradients in a row (train.max_nonfinite_steps=3) at step 3" in proc.stderr
    assert [r["nonfinite_steps"] for r in metrics(tmp_path)] == [1, 2, 3]
    assert not list(tmp_path.glob("step-*"))
