"""A mixture-of-experts model trained through pretrain_llama.py on 4 processes, 2 expert-data-parallel replicas x 2
expert ranks (parallel.ep=2: each rank holds 2 of the 4 experts of every layer), gives the one-process run's curve.

The reference is the one-process run of the same global batch (grad_accum 4, no collectives). Compared per step:
the cross-entropy `loss`, the pre-clip gradient norm (relative 1e-5: it sees a gradient scaled by dp or
grad_accum, which the loss would not), the aux loss, and the expert load (tokens per expert, dropped fraction),
which the one-process run counts on its own. Runs: the torch engine, and ZeRO-1 stopped at step 5 and resumed
under ZeRO-2 to step 10 (with a capacity factor and the auxiliary-loss-free expert bias, whose state must survive
the resume; both checkpoints hold the experts' optimizer states per expert shard, gathered from their ZeRO
partitions), and the torch engine with every expert's rows padded to its capacity (parallel.moe_pad_to_capacity).
The torch run's checkpoint exports to Hugging Face Mixtral and transformers gives our logits.

The runs are the scenarios of `runs`: one launch per process count (train_utils.run_worlds).
"""

import pytest
import torch

from tests.integration.train_utils import Run, assert_same_curve, metrics, run_worlds

TOL = 1e-4
STEPS = 10
MOE = ["model.num_local_experts=4", "model.router_aux_loss_coef=0.01", "model.router_z_loss_coef=0.001"]
BIAS_CAPACITY = ["model.router_expert_bias=true", "model.router_bias_update_rate=0.01", "model.capacity_factor=1.0"]
EP2 = ["parallel.ep=2"]
ZERO = "parallel.deepspeed_config=configs/deepspeed/zero{}.json"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """Every run of this module, by name; the references learn."""
    ep2_bias = [*MOE, *BIAS_CAPACITY, *EP2]
    runs = run_worlds(
        tmp_path_factory.mktemp("moe"),
        {
            "reference": (1, MOE),
            "reference_bias_capacity": (1, [*MOE, *BIAS_CAPACITY]),
            "torch_ep2": (4, [*MOE, *EP2]),
            # the ZeRO-1 run stops at step 5, the ZeRO-2 run resumes its checkpoint (a change of zero_stage: the
            # optimizer state is re-split from the whole per-expert-shard tensors the checkpoint holds)
            "zero1_ep2": (4, [*ep2_bias, ZERO.format(1), "train.exit_interval=5"]),
            "zero2_ep2": (4, [*ep2_bias, ZERO.format(2)], "zero1_ep2"),
            "padded_ep2": (4, [*ep2_bias, "parallel.moe_pad_to_capacity=true"]),
        },
    )
    for name in ("reference", "reference_bias_capacity"):
        rows = metrics(runs[name].out)
        assert len(rows) == STEPS
        assert rows[-1]["loss"] < rows[0]["loss"] - 0.1, f"{name} does not learn: {[r['loss'] for r in rows]}"
    dropped = metrics(runs["reference_bias_capacity"].out)
    assert all(r["moe/layer0/dropped_frac"] > 0 for r in dropped), "capacity 1.0 should drop some assignments"
    return runs


def _assert_same_curve(got: list[dict], ref: list[dict]) -> None:
    # loss and grad norm: the grad norm relative to the reference's (NORM_RTOL), which sees a gradient-scale bug
    assert_same_curve(got, ref, loss_tol=TOL)
    for key in ("moe/aux_loss", "moe/layer0/lb_loss", "moe/layer1/z_loss"):
        diff = max(abs(a[key] - b[key]) for a, b in zip(got, ref, strict=True))
        assert diff < TOL, f"{key}: max diff {diff:.2e}\ngot {[a[key] for a in got]}\nref {[b[key] for b in ref]}"
    for key in ("moe/layer0/tokens_per_expert", "moe/layer1/tokens_per_expert", "moe/layer1/dropped_frac"):
        assert [a[key] for a in got] == [b[key] for b in ref], key


def test_torch_engine_ep2_matches_one_process_and_exports_to_mixtral(runs, tmp_path):
    out = runs["torch_ep2"].out
    _assert_same_curve(metrics(out), metrics(runs["reference"].out))

    import transformers

    from modeling.convert import load_model, native_to_hf

    step = out / "step-00000010"
    assert sorted(p.name for p in step.glob("experts-*")) == [
        "experts-ep00-of-02.safetensors",
        "experts-ep01-of-02.safetensors",
    ]
    native_to_hf(step, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (load_model(step)(ids).logits - hf(ids).logits).abs().max().item()
    assert diff < TOL


def test_zero1_ep2_to_step_5_then_zero2_ep2_match_one_process(runs):
    out = runs["zero1_ep2"].out
    assert "stopped by train.exit_interval at step 5" in runs["zero1_ep2"].stdout
    assert "resuming at another layout (zero_stage 1 -> 2)" in runs["zero2_ep2"].stdout, runs["zero2_ep2"].stdout
    _assert_same_curve(metrics(out), metrics(runs["reference_bias_capacity"].out))

    # the experts' Adam moments are saved per expert shard, whole over their edp=2 ZeRO partitions, like the weights
    from safetensors import safe_open

    for step in (out / "step-00000005", out / "step-00000010"):  # written by ZeRO-1, then by ZeRO-2
        for ep_rank in range(2):
            with safe_open(str(step / f"experts-ep{ep_rank:02d}-of-02.safetensors"), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            optimizer = step / f"optimizer-experts-ep{ep_rank:02d}-of-02.safetensors"
            with safe_open(str(optimizer), framework="pt") as f:
                moments = {k.removesuffix(".exp_avg"): f.get_tensor(k) for k in f.keys() if k.endswith(".exp_avg")}  # noqa: SIM118
            assert {k: tuple(v.shape) for k, v in moments.items() if k in shapes} == shapes, step.name
            assert all(v.abs().sum() > 0 for v in moments.values())  # stepped: not a fresh zero state


def test_experts_padded_to_capacity_match_one_process(runs):
    # every expert's rows padded to its capacity (no host sync for the split sizes): the same curve and loads
    _assert_same_curve(metrics(runs["padded_ep2"].out), metrics(runs["reference_bias_capacity"].out))
