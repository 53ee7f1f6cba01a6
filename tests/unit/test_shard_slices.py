"""Slice reading of native shards (modeling.shard_files.ShardReader) and the general shard writer (write_shards).

The reference is split_for_rank of a full state dict: a rank's read at any (tp, ep) must equal it exactly, whatever
degree wrote the files, and the reader may copy out of the files only the rows that rank holds.
"""

import pytest
import torch

import modeling.shard_files as shard_files
from modeling.config import CheckpointError, ModelConfig
from modeling.llama import LlamaForCausalLM, ModelPart
from modeling.native_format import (
    EXPERT_SHARDS,
    MODEL_SHARDS,
    OPTIMIZER_EXPERT_SHARDS,
    OPTIMIZER_SHARDS,
    ShardReader,
    expert_tensor_names,
    model_tensors,
    read_rank_state_dict,
    save_native,
    split_for_rank,
    write_shards,
)
from parallel.layers import tp_chunk
from parallel.state import ParallelDims, ParallelState
from training.checkpoint import load_model_weights

# vocab 131: neither tp=2 nor tp=4 divides it (padded vocabulary shards); 4 heads so that tp=4 divides the rest
BASE = dict(
    vocab_size=131,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=32,
)
MOE = dict(num_local_experts=4, num_experts_per_tok=2, router_expert_bias=True)
SPLIT_ATTRS = ("tp_split_dim", "tp_full_size", "expert_parallel")


def reference(config: ModelConfig, seed: int = 0) -> tuple[LlamaForCausalLM, dict[str, torch.Tensor]]:
    """A one-process model and its full state dict (what a checkpoint holds), with every tensor random."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    full = {name: torch.randn(t.shape) for name, t in model_tensors(model).items()}  # buffers too, not zeros
    return model, full


def stand_in_like(model: LlamaForCausalLM, shard: dict[str, torch.Tensor], suffix: str = "") -> dict:
    """Meta tensors of the shard's shapes carrying the parameters' split attributes (a rank's parameters)."""
    params = model_tensors(model)
    like = {}
    for key, tensor in shard.items():
        name = key[: -len(suffix)] if suffix else key
        t = torch.empty(tensor.shape, device="meta")
        for attr in SPLIT_ATTRS:
            if hasattr(params[name], attr):
                setattr(t, attr, getattr(params[name], attr))
        like[key] = t
    return like


def write_at(out, model, full, tp, ep, *, suffix="", sets=()):
    """Every rank of a tp x dp (dp = ep) world calls write_shards with its shard, as a training run does."""
    world = tp * ep
    for rank in range(world):
        state = ParallelState(dims=ParallelDims(world_size=world, tp=tp, ep=ep), rank=rank)
        shard = split_for_rank(full, model.config, state.tp_rank, tp, ep_rank=state.ep_rank, ep_size=ep)
        tensors = {name + suffix: t for name, t in shard.items()}
        like = stand_in_like(model, tensors, suffix)
        if suffix:  # an optimizer's step per parameter: 0-d (replicated), per expert for expert tensors
            for name in shard:
                param = like[name + suffix]
                if getattr(param, "expert_parallel", False):  # the global expert indices, to see the split
                    local = param.shape[0]
                    tensors[name + ".step"] = torch.arange(state.ep_rank * local, (state.ep_rank + 1) * local) * 1.0
                else:
                    tensors[name + ".step"] = torch.tensor(7.0)
                like[name + ".step"] = param
        kw = dict(zip(("model_set", "expert_set"), sets, strict=True)) if sets else {}
        write_shards(tensors, like, out, state, config=model.config, **kw)


@pytest.mark.parametrize(
    ("extra", "saved", "reads"),
    [
        ({}, (2, 1), [(1, 1), (2, 1), (4, 1)]),
        (MOE, (2, 2), [(1, 1), (2, 1), (1, 2), (2, 2)]),
    ],
    ids=["dense", "moe"],
)
def test_read_equals_split_for_rank_at_any_degree(tmp_path, extra, saved, reads):
    config = ModelConfig(**BASE, **extra)
    model, full = reference(config)
    write_at(tmp_path, model, full, *saved)
    expected_files = [MODEL_SHARDS.file_name(r, saved[0]) for r in range(saved[0])]
    if extra:
        expected_files += [EXPERT_SHARDS.file_name(r, saved[1]) for r in range(saved[1])]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(expected_files)
    reader = ShardReader(tmp_path)
    assert reader.keys() == set(full)
    assert reader.shapes() == {name: tuple(t.shape) for name, t in full.items()}
    for tp, ep in reads:
        for tp_rank in range(tp):
            for ep_rank in range(ep):
                want = split_for_rank(full, config, tp_rank, tp, ep_rank=ep_rank, ep_size=ep)
                for name, tensor in want.items():
                    got = reader.read(name, tp_rank=tp_rank, tp_size=tp, ep_rank=ep_rank, ep_size=ep)
                    assert got.shape == tensor.shape and torch.equal(got, tensor), (name, tp, tp_rank, ep, ep_rank)


def test_ranks_of_padding_only_read_zeros(tmp_path):
    """5 rows saved at tp=2 (3 + 2 rows) read at tp=8: ranks 5-7 hold only padding."""
    full = torch.arange(5 * 3, dtype=torch.float32).reshape(5, 3)
    for rank in range(2):
        MODEL_SHARDS.write({"w": tp_chunk(full, 0, rank, 2, pad=False)}, {"w": 0}, tmp_path, rank, 2)
    reader = ShardReader(tmp_path)
    for tp in (1, 2, 3, 8):
        for rank in range(tp):
            assert torch.equal(reader.read("w", tp_rank=rank, tp_size=tp), tp_chunk(full, 0, rank, tp)), (tp, rank)


class SpyOpen:
    """safe_open that records every whole tensor read and the number of elements every slice read returns."""

    whole: list[str] = []
    sliced: dict[str, int] = {}

    def __init__(self, path, framework):
        self._f = safe_open_real(path, framework=framework)

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def metadata(self):
        return self._f.metadata()

    def keys(self):
        return self._f.keys()

    def get_tensor(self, name):
        SpyOpen.whole.append(name)
        return self._f.get_tensor(name)

    def get_slice(self, name):
        real = self._f.get_slice(name)

        class Slice:
            def get_shape(self):
                return real.get_shape()

            def __getitem__(self, index):
                out = real[index]
                SpyOpen.sliced[name] = SpyOpen.sliced.get(name, 0) + out.numel()
                return out

        return Slice()


safe_open_real = shard_files.safe_open


def test_reader_copies_only_the_rows_a_rank_holds(tmp_path, monkeypatch):
    config = ModelConfig(**BASE, **MOE)
    model, full = reference(config)
    write_at(tmp_path, model, full, 2, 2)
    monkeypatch.setattr(shard_files, "safe_open", SpyOpen)
    SpyOpen.whole, SpyOpen.sliced = [], {}
    reader = ShardReader(tmp_path)
    assert SpyOpen.whole == [] and SpyOpen.sliced == {}  # the headers only
    split = {
        name for name, t in split_for_rank(full, config, 0, 4, ep_rank=1, ep_size=2).items() if t is not full[name]
    }
    assert "model.embed_tokens.weight" in split and "model.layers.0.mlp.w1" in split  # experts
    for name in full:
        reader.read(name, tp_rank=3, tp_size=4, ep_rank=1, ep_size=2)
    # replicated tensors whole from one file, split ones never whole: exactly the rank's real rows were copied out
    assert sorted(SpyOpen.whole) == sorted(set(full) - split)
    real_rows = split_for_rank(full, config, 3, 4, ep_rank=1, ep_size=2, pad=False)
    assert SpyOpen.sliced == {name: real_rows[name].numel() for name in split}


def test_optimizer_sets_round_trip_with_suffixes_and_0d_steps(tmp_path):
    config = ModelConfig(**BASE, **MOE)
    model, full = reference(config)
    save_native(model, tmp_path)  # the model's own files beside: neither kind may pick up the other's
    _, moments = reference(config, seed=1)
    write_at(tmp_path, model, moments, 2, 2, suffix=".exp_avg", sets=(OPTIMIZER_SHARDS, OPTIMIZER_EXPERT_SHARDS))
    assert [p.name for p in MODEL_SHARDS.files(tmp_path)] == ["model-tp00-of-01.safetensors"]
    assert [p.name for p in EXPERT_SHARDS.files(tmp_path)] == ["experts-ep00-of-01.safetensors"]
    assert [p.name for p in OPTIMIZER_SHARDS.files(tmp_path)] == [
        "optimizer-tp00-of-02.safetensors",
        "optimizer-tp01-of-02.safetensors",
    ]
    assert len(OPTIMIZER_EXPERT_SHARDS.files(tmp_path)) == 2
    assert ShardReader(tmp_path).keys() == set(full)
    reader = ShardReader(tmp_path, OPTIMIZER_SHARDS, OPTIMIZER_EXPERT_SHARDS)
    assert reader.keys() == {n + ".exp_avg" for n in full} | {n + ".step" for n in full}
    experts = expert_tensor_names(config)
    for tp, ep in [(4, 2), (1, 1)]:
        for tp_rank, ep_rank in [(r, r % ep) for r in range(tp)]:
            want = split_for_rank(moments, config, tp_rank, tp, ep_rank=ep_rank, ep_size=ep)
            ranks = {"tp_rank": tp_rank, "tp_size": tp, "ep_rank": ep_rank, "ep_size": ep}
            for name, tensor in want.items():
                assert torch.equal(reader.read(name + ".exp_avg", **ranks), tensor), name
                step = reader.read(name + ".step", **ranks)
                if name in experts:  # this expert rank's experts' steps
                    local = 4 // ep
                    assert torch.equal(step, torch.arange(ep_rank * local, (ep_rank + 1) * local) * 1.0), name
                else:
                    assert step.shape == () and step.item() == 7.0, name
    q = model_tensors(model)["model.layers.0.self_attn.q_proj.weight"]
    with pytest.raises(ValueError, match=r"q_proj.weight.exp_avg has shape \(1024,\).*split along dim 0"):
        write_shards(
            {"model.layers.0.self_attn.q_proj.weight.exp_avg": q.detach().flatten()},
            {"model.layers.0.self_attn.q_proj.weight.exp_avg": q},
            tmp_path / "bad",
            ParallelState(),
        )


def test_rank_state_dict_and_load_model_weights(tmp_path):
    """A tied model saved at tp=2: the whole model loads it exactly, a last pipeline stage fills its tied copy."""
    config = ModelConfig(**BASE, tie_word_embeddings=True)
    model, full = reference(config)
    write_at(tmp_path, model, full, 2, 1)
    loaded = LlamaForCausalLM(config, skip_init=True)
    load_model_weights(loaded, tmp_path, ParallelState())
    for name, tensor in model_tensors(loaded).items():
        assert torch.equal(tensor, full[name]), name
    last = LlamaForCausalLM(config, skip_init=True, part=ModelPart(layers=(1,), embedding=False, head=True))
    sd = read_rank_state_dict(tmp_path, last)
    assert set(sd) == set(model_tensors(last)) and "model.layers.0.mlp.up_proj.weight" not in sd
    assert torch.equal(sd["lm_head.weight"], full["model.embed_tokens.weight"])
    other = LlamaForCausalLM(ModelConfig(**{**BASE, "intermediate_size": 48}, tie_word_embeddings=True))
    with pytest.raises(CheckpointError, match=r"architecture differs .*mlp\.down_proj.*\(32, 64\).*\(32, 48\)"):
        load_model_weights(other, tmp_path, ParallelState())


def test_pipeline_gather_receives_on_the_groups_device_when_the_first_stage_holds_nothing(monkeypatch, tmp_path):
    """The optimizer's save at pp=2, ep=2: the first stage of a data-parallel rank 1 keeps no dense tensor, and no
    expert tensor when it holds no MoE layer, yet receives the later stages' experts; its buffers must be on the
    group's device (CUDA under NCCL), not the CPU that an empty `like` suggests."""
    import modeling.native_format as native_format

    seen = []
    monkeypatch.setattr(native_format, "comm_device", lambda group: torch.device("meta"))  # stands in for cuda:N
    monkeypatch.setattr(native_format, "_gather_to_first_stage", lambda *a: seen.append(a[-1]) or False)
    dims = ParallelDims(world_size=4, pp=2, ep=2)
    receivers = [r for r in range(4) if ParallelState(dims=dims, rank=r).pp_rank == 0]
    for rank in receivers:
        write_shards({}, {}, tmp_path, ParallelState(dims=dims, rank=rank))
    assert seen == [torch.device("meta")] * len(receivers) and len(receivers) == 2


def test_comm_device_follows_the_groups_backend(monkeypatch):
    from parallel import mappings

    monkeypatch.setattr(mappings.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert mappings.comm_device(None) == torch.device("cuda", 3)
    monkeypatch.setattr(mappings.dist, "get_backend", lambda group=None: "gloo")
    assert mappings.comm_device(None) == torch.device("cpu")
