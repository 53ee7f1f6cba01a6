"""Context parallelism through pretrain_llama.py on gloo: with each sequence split over cp ranks, the same global
batch gives one process's loss and pre-clip gradient norm per step (1e-5), for Ulysses and ring attention, cp=2
and cp=4, with tensor parallelism (one key/value head per tensor rank), under ZeRO-2, with a sliding window, on
text with document attention (eval and samples too), with pp=2, and an MoE model at cp=2 and cp=2 x ep=2. A
ring-attention run with activation checkpointing (the recomputed layers run their collectives again in backward),
stopped and rerun at cp=2, resumes exactly.

Every run of the module is one scenario of `runs`: one launch per process count (train_utils.run_worlds).
"""

import pytest

from tests.integration.train_utils import (
    MOE,
    Run,
    assert_same_curve,
    assert_same_moe_stats,
    metrics,
    run_worlds,
    text_corpus,
    text_overrides,
)

TOL = 1e-5
WINDOW = ["model.sliding_window=8"]  # shorter than data.seq_len=32: the window hides keys in every sequence
RING, ULYSSES = ["parallel.cp=2", "parallel.cp_attention=ring"], ["parallel.cp=2", "parallel.cp_attention=ulysses"]
# the recomputed layers run their context attention (and its collectives) again in backward; stopped at step 5
RING_AC = [*RING, "train.activation_checkpointing=true", "checkpoint.every=5", "train.exit_interval=5"]
# 2 kv heads over tp=2: one per tensor rank, fewer than cp=2, so Ulysses repeats it; sequence parallelism on
TP2 = [*ULYSSES, "parallel.tp=2", "parallel.sequence_parallel=true", "train.micro_batch_size=2"]
BF16 = ["train.dtype=bf16", "train.max_steps=5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """Every run of this module, by name."""
    root = tmp_path_factory.mktemp("context")
    (root / "corpus").mkdir()
    text = [*text_overrides(text_corpus(root / "corpus")), "data.document_attention=true", "train.max_steps=4"]
    text += ["train.eval_every=2"]
    return run_worlds(
        root,
        {
            "reference": (1, []),
            "window_reference": (1, WINDOW),
            "moe_reference": (1, MOE),
            "text_one": (1, text),
            "bf16_one": (1, BF16),
            "ring_ac": (2, RING_AC),
            "ring_ac_rerun": (2, RING_AC, "ring_ac"),
            "window_ulysses": (2, [*WINDOW, *ULYSSES]),
            "window_ring": (2, [*WINDOW, *RING]),
            "text_ulysses": (2, [*text, *ULYSSES]),
            "text_ring": (2, [*text, *RING]),
            "moe_cp2": (2, [*MOE, *RING]),
            "bf16_cp2": (2, [*BF16, *ULYSSES]),
            "cp4_ring": (4, ["parallel.cp=4", "parallel.cp_attention=ring"]),
            "cp2_tp2": (4, TP2),
            "cp2_dp2_zero2": (4, [*RING, "parallel.deepspeed_config=configs/deepspeed/zero2.json"]),
            "moe_cp2_ep2": (4, [*MOE, *ULYSSES, "parallel.ep=2"]),
            # pipeline stages (one layer each) over context chunks: the activations between stages are this rank's
            "pp2_cp2": (4, [*ULYSSES, "parallel.pp=2"]),
        },
    )


def test_cp2_ring_with_activation_checkpointing_matches_one_process_and_resumes_exactly(runs):
    # Causal Ulysses at cp=2: the tp=2, MoE ep=2 and pp=2 tests below (and bf16, document attention)
    out = runs["ring_ac"].out
    assert "stopped by train.exit_interval at step 5" in runs["ring_ac"].stdout
    assert f"resumed from {out / 'step-00000005'} at step 5" in runs["ring_ac_rerun"].stdout
    assert_same_curve(metrics(out), metrics(runs["reference"].out), loss_tol=TOL)


@pytest.mark.parametrize("name", ["cp4_ring", "cp2_tp2", "cp2_dp2_zero2", "pp2_cp2"])
def test_layouts_match_one_process(runs, name):
    assert_same_curve(metrics(runs[name].out), metrics(runs["reference"].out), loss_tol=TOL)


@pytest.mark.parametrize("kind", ["ulysses", "ring"])
def test_sliding_window_at_cp2_matches_cp1(runs, kind):
    window_reference = metrics(runs["window_reference"].out)
    assert_same_curve(metrics(runs[f"window_{kind}"].out), window_reference, loss_tol=TOL)
    assert abs(window_reference[-1]["loss"] - metrics(runs["reference"].out)[-1]["loss"]) > 1e-4  # a new model


def test_document_attention_on_text_at_cp2_matches_one_process(runs):
    one = runs["text_one"]
    for name in ("text_ulysses", "text_ring"):
        assert_same_curve(metrics(runs[name].out), metrics(one.out), loss_tol=TOL)
        # eval lines (loss, ppl, bpb to 3-4 digits) and the sampled text
        assert runs[name].printed("sample ", "step ") == one.printed("sample ", "step ")
    assert one.printed("sample ")


@pytest.mark.parametrize("name", ["moe_cp2", "moe_cp2_ep2"])
def test_moe_at_cp2_matches_one_process(runs, name):
    # the chunks' routers: load-balancing counts, aux losses and expert-bias loads over the whole sequence
    got, want = metrics(runs[name].out), metrics(runs["moe_reference"].out)
    assert_same_curve(got, want, loss_tol=TOL)
    assert_same_moe_stats(got, want)


def test_cp2_bf16_matches_one_process_bf16(runs):
    # bf16 inputs, fp32 softmax statistics and merge: the chunks add up to the unsplit attention up to bf16 rounding
    # measured here: 3e-4 (loss) and 6e-4 (relative grad norm) over 5 steps
    got, want = metrics(runs["bf16_cp2"].out), metrics(runs["bf16_one"].out)
    assert_same_curve(got, want, loss_tol=2e-3, norm_rtol=2e-3)
