"""train.compile: the compiled trainer's loss and gradient norm equal eager's, step by step, and nothing recompiles.

One torchrun world of 2 processes runs every scenario in turn (this file is also the driver, as
tests/integration/layout_runs.py is for the layout tests: the process group, the imports and dynamo's caches are
shared, so the suite pays the start-up once): tensor parallelism (tp=2 with sequence parallelism), ZeRO-2 through
DeepSpeed at tp=1, DDP with activation checkpointing, MoE at ep=2, LoRA adapters and ring attention over documents at
cp=2, each eager and compiled on the
same synthetic data. fp32: the compiled kernels reorder some sums, so the figures agree to 1e-5, not exactly. tp=2
with sequence parallelism runs once more in bf16 (fp32 weights under autocast; on a CPU with bf16 hardware the
compiled layers then take the bf16 paths of parallel.layers.linear, for gate/up's local shard, and of
parallel.sdpa), agreeing to 4e-3, about one bf16 rounding.
Every compiled run must have compiled graphs (`compile/graphs` > 0: the layers did run through torch.compile) and
none after its first step (`compile/recompiles` = 0 on every row).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))

from tests.integration.train_utils import SYNTHETIC, TIMEOUT_S, env  # noqa: E402

RTOL = {"fp32": 1e-5, "bf16": 4e-3}
STEPS = ["train.max_steps=2", "train.global_batch_size=4", "train.micro_batch_size=1", "checkpoint.every=0"]
SCENARIOS = {
    "tp2-sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "zero2": ["parallel.deepspeed_config=configs/deepspeed/zero2.json"],
    "ddp-ckpt": ["train.activation_checkpointing=true"],
    "moe-ep2": ["model.num_local_experts=4", "model.num_experts_per_tok=2", "parallel.ep=2"],
    "lora": [],  # + adapters on every target (the driver's LoraTrainer)
    "tp2-sp-bf16": ["parallel.tp=2", "parallel.sequence_parallel=true", "train.dtype=bf16"],
    # ring attention with documents at micro-batch 2 (its masks' shapes once crashed inductor)
    "cp2-ring-docs": [
        "parallel.cp=2",
        "parallel.cp_attention=ring",
        "data.document_attention=true",
        "train.micro_batch_size=2",
    ],
}


def _trainer_class(name: str):
    """The Trainer, or for the LoRA scenario one that puts adapters on the base (as sft.py does) in pretraining."""
    from parallel.lora import apply_lora
    from training.loop import Trainer

    if name != "lora":
        return Trainer

    class LoraTrainer(Trainer):
        def build_model(self):
            model = super().build_model()
            apply_lora(model, r=4, alpha=8.0)  # B = 0 at init: a non-zero lr moves it from the first step
            return model

    return LoraTrainer


def drive(root: Path) -> None:
    """Run every scenario eager and compiled into root/NAME-{eager,compiled} (called in each torchrun process)."""
    import torch._dynamo

    from configs.schema import load_config

    for name, overrides in SCENARIOS.items():
        torch._dynamo.reset()  # each scenario compiles afresh, as its own run would (inductor's disk cache stays)
        for mode in ("eager", "compiled"):
            out = root / f"{name}-{mode}"
            extra = [f"checkpoint.dir={out}", f"train.compile={mode == 'compiled'}", *STEPS, *overrides]
            cfg = load_config(None, [*SYNTHETIC, *extra])
            _trainer_class(name)(cfg, resume=False).run()


def _rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Launch the world once; {scenario: (eager rows, compiled rows)}."""
    root = tmp_path_factory.mktemp("compile")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(Path(__file__).resolve()), str(root)]
    p = subprocess.run(cmd, cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=2 * TIMEOUT_S)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return {name: (_rows(root / f"{name}-eager"), _rows(root / f"{name}-compiled")) for name in SCENARIOS}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_compiled_equals_eager_and_never_recompiles(runs, name):
    eager, compiled = runs[name]
    rtol = RTOL["bf16" if name.endswith("bf16") else "fp32"]
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == [1, 2]
    for e, c in zip(eager, compiled, strict=True):
        assert c["loss"] == pytest.approx(e["loss"], rel=rtol), (name, e["step"])
        assert c["grad_norm"] == pytest.approx(e["grad_norm"], rel=rtol), (name, e["step"])
    assert "compile/graphs" not in eager[0]
    assert compiled[-1]["compile/graphs"] > 0, "the layers never ran through torch.compile"
    assert [r["compile/recompiles"] for r in compiled] == [0, 0]


def test_compile_watch_counts_graphs_after_the_first_step_and_warns():
    from torch._dynamo.utils import counters

    from modeling.compile import CompileWatch

    said = []
    watch = CompileWatch(say=said.append)
    counters["stats"]["unique_graphs"] += 3  # the first step compiles
    assert watch.row(1) == {"compile/graphs": 3, "compile/recompiles": 0} and said == []
    assert watch.row(2)["compile/recompiles"] == 0
    counters["stats"]["unique_graphs"] += 2  # recompiled during step 3
    assert watch.row(3) == {"compile/graphs": 5, "compile/recompiles": 2}
    assert len(said) == 1 and "2 new graph(s) by step 3" in said[0]
    assert watch.row(4)["compile/recompiles"] == 2 and len(said) == 1  # warned once per new recompilation
    with watch.outside():  # the first eval compiles its own graph (CUDA: FlexAttention without gradients)
        counters["stats"]["unique_graphs"] += 1
    assert watch.row(5) == {"compile/graphs": 6, "compile/recompiles": 2} and len(said) == 1
    counters["stats"]["unique_graphs"] += 1  # in a training step again
    assert watch.row(6) == {"compile/graphs": 7, "compile/recompiles": 3} and len(said) == 2
    assert CompileWatch(enabled=False).row(1) == {}


def test_compile_under_zero3_is_refused_naming_the_keys():
    from configs.schema import ConfigError, load_config

    zero3 = "parallel.deepspeed_config=configs/deepspeed/zero3.json"
    cfg = load_config(None, [*SYNTHETIC, "train.compile=true", zero3])
    with pytest.raises(ConfigError, match="train.compile=true with configs/deepspeed/zero3.json"):
        cfg.validate(world_size=2)


if __name__ == "__main__":
    drive(Path(sys.argv[1]))
