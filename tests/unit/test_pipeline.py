"""Pipeline parallelism in one process: the stage plan, every refused combination (by message), and stages cut
from the one model that compose to it, weights, loss and gradients included."""

from pathlib import Path

import pytest
import torch

from configs.schema import ConfigError, load_config
from configs.sections import ParallelSection
from modeling.config import ModelConfig
from modeling.llama import LlamaForCausalLM
from modeling.pipeline import PipelinePlan, StageModule
from parallel.pipeline import PipelineSchedule, check_schedule_torch, rank_stages, stage_layer_counts, stage_rank
from parallel.state import ParallelConfigError
from training.pipeline_run import TrainingPipeline

TINY = ["model.preset=tiny", "model.vocab_size=256", "data.synthetic=true", "data.seq_len=32"]
TINY += ["train.micro_batch_size=1", "train.global_batch_size=4"]


def _validate(overrides: list[str], world: int = 2) -> None:
    load_config(None, [*TINY, *overrides]).validate(world_size=world)


def test_balanced_split_weighs_embedding_and_head_as_layers():
    assert stage_layer_counts(4, 2) == [2, 2]
    assert stage_layer_counts(8, 4) == [2, 3, 2, 1]  # loads 3, 3, 2, 2: the end stages carry embedding and head
    assert stage_layer_counts(6, 2) == [3, 3]
    assert stage_layer_counts(5, 2) == [3, 2]  # the tie goes to the earlier stage
    assert stage_layer_counts(32, 4) == [8, 9, 8, 7]
    assert stage_layer_counts(4, 2, [3, 1]) == [3, 1]


def test_stage_ranks_loop_and_v_orders():
    assert [stage_rank(s, 2, "interleaved_1f1b") for s in range(4)] == [0, 1, 0, 1]
    assert [stage_rank(s, 2, "zbv") for s in range(4)] == [0, 1, 1, 0]  # the V: rank 0 holds first and last
    assert rank_stages(0, 4, 2, "zbv") == [0, 7] and rank_stages(3, 4, 2, "zbv") == [3, 4]
    assert rank_stages(1, 4, 2, "interleaved_1f1b") == [1, 5]


def test_training_pipeline_records_its_stages_and_warns_when_the_bubble_dominates():
    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=8, num_attention_heads=2)
    said: list[str] = []
    pipe = TrainingPipeline(cfg, ParallelSection(pp=4, pp_schedule="gpipe"), None, 2, say=said.append)
    assert pipe.record() == [[0, 0, 2], [1, 2, 3], [2, 5, 2], [3, 7, 1]]  # [rank, first layer, layers] per stage
    assert len(said) == 1 and "2 micro-batches" in said[0] and "parallel.pp=4" in said[0] and "3 of 5" in said[0]
    said.clear()
    pipe = TrainingPipeline(
        cfg, ParallelSection(pp=2, pp_schedule="zbv", pp_stages_per_rank=2), None, 4, say=said.append
    )
    assert pipe.record() == [[0, 0, 2], [1, 2, 3], [1, 5, 2], [0, 7, 1]] and said == []  # the V: rank 0 first and last


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["parallel.pp=4", "parallel.pp_stages_per_rank=2", "parallel.pp_schedule=interleaved_1f1b"], 4,
         "parallel.pp=4 x parallel.pp_stages_per_rank=2 = 8 stages, but the model has 4 layers"),
        (["parallel.pp=2", "parallel.pp_layers=[3,2]"], 2, "parallel.pp_layers=[3, 2] must give 2 stages"),
        (["parallel.pp=2", "parallel.pp_layers=[4]"], 2, "parallel.pp_layers=[4] must give 2 stages"),
        (["parallel.pp=2", "parallel.pp_layers=[4,0]"], 2, "at least one layer each"),
        (["parallel.pp_layers=[2,2]"], 2, "parallel.pp_layers is set but parallel.pp=1"),
        (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"], 2,
         "parallel.pp_schedule=interleaved_1f1b needs parallel.pp_stages_per_rank >= 2"),
        (["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_stages_per_rank=3", "model.num_hidden_layers=6"],
         2, "parallel.pp_schedule=zbv runs exactly two stages per rank"),
        (["parallel.pp=2", "parallel.pp_stages_per_rank=2"], 2, "parallel.pp_schedule=1f1b runs one stage per rank"),
        (["parallel.pp=2", "parallel.pp_schedule=pipedream"], 2, "parallel.pp_schedule='pipedream'; choose one of"),
        (["parallel.pp=2", "parallel.deepspeed_config=configs/deepspeed/zero2.json"], 2,
         "parallel.pp=2 with configs/deepspeed/zero2.json (ZeRO stage 2)"),
        (["parallel.pp=2", "parallel.deepspeed_config=configs/deepspeed/zero3.json"], 2, "(ZeRO stage 3)"),
        (["parallel.pp=2", "train.global_batch_size=1", "train.micro_batch_size=1"], 2,
         "parallel.pp_schedule=1f1b needs at least parallel.pp=2 micro-batches per step, got 1"),
        (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_stages_per_rank=2",
          "train.global_batch_size=7"], 2, "needs the micro-batches per step (7) to be a multiple of 3"),
        (["parallel.pp=3"], 4, "parallel.pp=3 does not divide the world size 4"),
        (["parallel.pp=0"], 2, "parallel.pp=0 must be positive"),
    ],
)  # fmt: skip
def test_refused_pipeline_layouts_name_the_keys(overrides, world, message):
    with pytest.raises(ConfigError) as err:
        _validate(overrides, world)
    assert message in str(err.value)


def test_zbv_is_refused_before_torch_2_13():
    # torch 2.12's split backward died on RMSNorm's autograd node at the first W action (2.11 has the same code, and
    # over gloo died earlier: a send to its own rank); 2.13 runs it. The backend plays no part.
    for version in ("2.11.0+cu130", "2.12.0+cu130", "2.12.1"):
        with pytest.raises(ParallelConfigError, match="parallel.pp_schedule=zbv needs torch 2.13 or newer"):
            check_schedule_torch("zbv", version)
    for version in ("2.13.0+cpu", "2.13.0.dev20260601", "2.14.0"):
        check_schedule_torch("zbv", version)
    check_schedule_torch("interleaved_1f1b", "2.11.0+cu130")


def test_zbv_before_torch_2_13_is_refused_with_the_config_and_by_the_schedule(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.12.0+cu130")
    with pytest.raises(ConfigError, match="parallel.pp_schedule=zbv needs torch 2.13 or newer, found 2.12.0"):
        _validate(["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_stages_per_rank=2"])
    _validate(["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_stages_per_rank=2"])
    _validate(["parallel.pp_schedule=zbv", "parallel.pp_stages_per_rank=2"])  # pp=1 runs no schedule
    # PipelineSchedule checks before it touches its stages (bench/pipeline.py builds it without a config)
    with pytest.raises(ParallelConfigError, match="parallel.pp_schedule=zbv needs torch 2.13 or newer"):
        PipelineSchedule([], [], [], state=None, schedule="zbv", microbatches=1, device=torch.device("cpu"))


def test_zero1_overlap_comm_is_refused_at_pp2(tmp_path):
    import json

    zero1 = json.loads((Path(__file__).resolve().parents[2] / "configs/deepspeed/zero1.json").read_text())
    zero1["zero_optimization"]["overlap_comm"] = True
    (tmp_path / "z1.json").write_text(json.dumps(zero1))
    with pytest.raises(ConfigError, match="zero_optimization.overlap_comm=true overlaps a reduction"):
        _validate(["parallel.pp=2", f"parallel.deepspeed_config={tmp_path / 'z1.json'}"], world=4)


def test_accepted_pipeline_layouts(monkeypatch):
    # the zbv layout is accepted whatever torch runs this test; the torch check has its own test above
    monkeypatch.setattr(torch, "__version__", "2.13.0")
    _validate(["parallel.pp=2"])
    _validate(["parallel.pp=2", "parallel.pp_schedule=gpipe", "train.global_batch_size=1", "train.micro_batch_size=1"])
    _validate(["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_stages_per_rank=2"])
    _validate(["parallel.pp=2", "parallel.deepspeed_config=configs/deepspeed/zero1.json"], world=4)


def _config(**kw) -> ModelConfig:
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("schedule", ["1f1b", "zbv"])
def test_stages_compose_to_the_whole_model(tied, schedule):
    # every part is built from the same seed as the whole model: same weights, no second model definition
    config = _config(tie_word_embeddings=tied)
    torch.manual_seed(0)
    whole = LlamaForCausalLM(config)
    plan = PipelinePlan.build(config, pp=2, schedule=schedule, stages_per_rank=2 if schedule == "zbv" else 1)
    parts = []
    for pp_rank in range(2):
        torch.manual_seed(0)
        parts.append(LlamaForCausalLM(config, part=plan.part(pp_rank)))
    full = dict(whole.named_parameters())
    for part in parts:
        for name, p in part.named_parameters():
            source = "model.embed_tokens.weight" if getattr(p, "pipeline_tied", None) == "copy" else name
            torch.testing.assert_close(p, full[source], rtol=0, atol=0)
    names = {n for part in parts for n, p in part.named_parameters() if getattr(p, "pipeline_tied", None) != "copy"}
    assert names == set(full)  # every parameter on exactly the stages that need it

    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    ref = whole(ids, targets=targets).loss
    ref.backward()
    x = ids  # the stages in order, one graph (the schedule cuts it at the stage boundaries)
    for stage in range(plan.num_stages):
        module = StageModule(parts[plan.owner(stage)], plan, stage, microbatches=1)
        x = module(x, targets=targets if module.last else None)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)
    x.backward()
    grads = {}
    for part in parts:
        for name, p in part.named_parameters():
            source = "model.embed_tokens.weight" if getattr(p, "pipeline_tied", None) == "copy" else name
            grads[source] = grads.get(source, 0) + p.grad  # the tied copies' gradients add up (embedding group)
    for name, p in full.items():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7)


def test_a_part_refuses_the_whole_forward():
    config = _config()
    part = LlamaForCausalLM(config, part=PipelinePlan.build(config, pp=2).part(0))
    with pytest.raises(ValueError, match="one pipeline part of the model"):
        part(torch.zeros(1, 4, dtype=torch.long))


def test_pipeline_plan_refuses_more_stages_than_layers():
    with pytest.raises(ParallelConfigError, match="every stage needs at least one layer"):
        PipelinePlan.build(_config(num_hidden_layers=2), pp=4)


def test_fused_loss_backward_twice_keeps_its_buffers_only_when_asked():
    # the zero-bubble schedule runs the loss's backward twice (input, then weight gradients): the buffers must be
    # intact the second time; every other schedule runs it once, and then the buffers must go with the graph
    import torch.nn.functional as F

    from parallel.cross_entropy import vocab_parallel_linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g, requires_grad=True)
    w = torch.randn(16, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 16, (6,), generator=g)
    want = torch.autograd.grad(F.cross_entropy(x @ w.t(), t), (x, w))
    loss = vocab_parallel_linear_cross_entropy(x, w, t, reuse_buffers=False)
    first = torch.autograd.grad(loss, (x, w), retain_graph=True)
    second = torch.autograd.grad(loss, (x, w))
    for a, b, c in zip(want, first, second, strict=True):
        torch.testing.assert_close(b, a)
        torch.testing.assert_close(c, a)
    loss = vocab_parallel_linear_cross_entropy(x, w, t)
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.grad_fn.saved_tensors  # noqa: B018  freed with the graph, although the loss tensor lives on
    kept = [v for v in vars(loss.grad_fn).values() if torch.is_tensor(v) or isinstance(v, tuple | list)]
    assert not kept  # nor held as attributes of the node (torch's schedules keep every micro-batch's loss)


def test_pipeline_step_batch_stays_page_locked_when_its_micro_batches_are(monkeypatch):
    from training.pipeline_run import _joined

    parts = [torch.arange(6).view(2, 3), torch.arange(6, 12).view(2, 3)]
    assert torch.equal(_joined(parts), torch.arange(12).view(4, 3))  # pageable in, pageable out (the CPU)
    asked, empty = [], torch.empty
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t: True)  # the streaming loader's rows on CUDA
    # page-locked memory needs CUDA: the request is recorded, the memory is ordinary
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **kw: asked.append(pin_memory) or empty(*a, **kw))
    assert torch.equal(_joined(parts), torch.arange(12).view(4, 3)) and asked == [True]  # one copy, into it
