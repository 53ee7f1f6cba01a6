"""The native shard format: safetensors files that record which dimension each tensor is split along.

A native checkpoint is a directory holding
    config.json                          the model config, in Hugging Face's layout
    model-tp00-of-02.safetensors, ...    one file per tensor rank; each file's metadata records its rank, the
                                         tensor degree and, per tensor, the dimension it is split along
    experts-ep00-of-02.safetensors, ...  (mixture of experts only) the stacked expert tensors (E/ep, ...) of one
                                         expert rank, the same on every tensor rank; the metadata records the rank,
                                         the expert degree and, per tensor, the dimension the experts are split along
Because every shard says how it was cut, weights saved at one tp (and ep) degree load at any other: each rank reads
the rows it holds from the files that hold them (modeling.shard_files.ShardReader, read_rank_state_dict). A
vocabulary that tp does not divide is padded in memory only (parallel.layers.tp_chunk): a file holds the real rows,
so the last ranks' vocabulary shards are shorter and the concatenation is the real (vocab_size, hidden) tensor,
which re-splits at any tp. An optimizer's per-parameter state (optimizer-tpNN-of-NN, optimizer-experts-epNN-of-NN:
"<name>.exp_avg", ..., split like the parameter) and LoRA adapter shards (modeling.lora_files,
adapter-tpNN-of-NN.safetensors) are the same kind of file: one ShardSet describes each kind, write_shards writes
any of them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from modeling.config import CheckpointError, ModelConfig
from modeling.llama import LlamaForCausalLM
from modeling.shard_files import EXPERT_SHARDS, MODEL_SHARDS, ShardReader, ShardSet
from modeling.shard_files import OPTIMIZER_EXPERT_SHARDS as OPTIMIZER_EXPERT_SHARDS  # re-exported: the file kinds
from modeling.shard_files import OPTIMIZER_SHARDS as OPTIMIZER_SHARDS
from parallel.layers import strip_padding, tp_chunk
from parallel.mappings import comm_device
from parallel.pipeline import recv_tensor, send_tensor
from parallel.state import ParallelState

TIED_HEAD, TIED_SOURCE = "lm_head.weight", "model.embed_tokens.weight"  # a pipeline's tied copy and what it copies
EXPERT_SPLIT_DIM = 0  # expert tensors are stacked (E, ...): expert ranks hold consecutive blocks of E/ep


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of a model: its parameters and its persistent buffers (MoE expert_bias)."""
    tensors = dict(model.named_parameters())
    for prefix, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                tensors[f"{prefix}.{name}" if prefix else name] = buf
    return tensors


def expected_tensors(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], int | None]]:
    """Full shape and tensor-parallel split dimension of every tensor of the model, from a meta-device build."""
    model = LlamaForCausalLM(config, device="meta")
    return {name: (tuple(p.shape), getattr(p, "tp_split_dim", None)) for name, p in model_tensors(model).items()}


def expert_tensor_names(config: ModelConfig) -> set[str]:
    """Names of the expert-parallel tensors (split over expert ranks along EXPERT_SPLIT_DIM)."""
    model = LlamaForCausalLM(config, device="meta")
    return {name for name, p in model.named_parameters() if getattr(p, "expert_parallel", False)}


def check_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig, source: str) -> None:
    """Raise CheckpointError naming every missing or unexpected tensor and every shape that disagrees with config."""
    check_shapes({name: tuple(t.shape) for name, t in state_dict.items()}, config, source)


def check_shapes(shapes: dict[str, tuple[int, ...]], config: ModelConfig, source: str) -> None:
    """check_state_dict from the full shapes alone (a ShardReader's, read from the files' headers)."""
    expected = expected_tensors(config)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: tensors do not match config.json: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}"
            f", unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    for name, (shape, _) in expected.items():
        if tuple(shapes[name]) != shape:
            got = tuple(shapes[name])
            raise CheckpointError(f"{source}: tensor {name} has shape {got}, config.json implies {shape}")


def split_for_rank(
    state_dict: dict[str, torch.Tensor],
    config: ModelConfig,
    tp_rank: int,
    tp_size: int,
    *,
    ep_rank: int = 0,
    ep_size: int = 1,
    pad: bool = True,
) -> dict[str, torch.Tensor]:
    """This (tensor rank, expert rank)'s shard of a full state dict, as the model holds it (vocabulary padded).

    `pad=False` keeps only the real rows of a padded vocabulary shard: what a file holds.
    """
    config.validate_parallel(tp_size, ep_size)
    dims = expected_tensors(config)
    experts = expert_tensor_names(config)
    out = {}
    for name, tensor in state_dict.items():
        dim, size, rank = dims[name][1], tp_size, tp_rank
        if name in experts:
            dim, size, rank = EXPERT_SPLIT_DIM, ep_size, ep_rank
        if dim is None or size == 1:
            out[name] = tensor
        elif name in experts:
            out[name] = tensor.chunk(size, dim=dim)[rank].contiguous()
        else:  # only the vocabulary may not divide by tp (validate_parallel checks the rest): padded
            out[name] = tp_chunk(tensor, dim, rank, size, pad=pad)
    return out


def is_native(path: str | Path) -> bool:
    """True when the directory holds native tensor-parallel shards."""
    return bool(MODEL_SHARDS.files(Path(path)))


def save_native(model: LlamaForCausalLM, out_dir: str | Path) -> None:
    """Write this rank's share of the model's weights (write_shards over its tensors) and config.json."""
    tensors = model_tensors(model)
    write_shards(tensors, tensors, out_dir, model.state, config=model.config)


def write_shards(
    tensors: dict[str, torch.Tensor],
    like: dict[str, torch.Tensor],
    out_dir: str | Path,
    state: ParallelState,
    *,
    model_set: ShardSet = MODEL_SHARDS,
    expert_set: ShardSet = EXPERT_SHARDS,
    config: ModelConfig | None = None,
) -> None:
    """Write this rank's share of `tensors` as `model_set` (tensor shards) and `expert_set` (expert shards) files.

    `tensors[k]` is cut like the parameter `like[k]`, whose attributes say how it is split (tp_split_dim,
    tp_full_size, expert_parallel: along EXPERT_SPLIT_DIM) and whether it is a pipeline's tied copy (left out: the
    first stage holds the embedding itself): its length along the split dimension is the parameter's local one (the
    rest of its shape may differ: an expert tensor's per-expert step is (E_local,)); a 0-d tensor (an optimizer's
    step) and one whose parameter is not split are replicated. dp_rank 0 writes the tensor
    shard of its tensor rank (tensor rank 0 also writes `config`'s config.json), tensor rank 0 of the first expert
    group the expert shard of its expert rank; context ranks > 0 write nothing (they hold context rank 0's weights).
    Under pipeline parallelism the stages of a pipeline send their tensors to its first stage (collective over the
    pipeline group), which writes the files a run without a pipeline writes: layers under their global indices.
    """
    coords = state.dims.coords(state.rank)
    if coords["cp"] != 0:
        return
    out = Path(out_dir)
    dense, experts, dims = {}, {}, {}
    for name, tensor in tensors.items():
        p = like[name]
        if getattr(p, "pipeline_tied", None) == "copy":
            continue
        is_expert = getattr(p, "expert_parallel", False)
        dim = None if tensor.dim() == 0 else EXPERT_SPLIT_DIM if is_expert else getattr(p, "tp_split_dim", None)
        if dim is not None and (tensor.dim() <= dim or tensor.shape[dim] != _local_shape(p)[dim]):
            raise ValueError(
                f"write_shards: tensor {name} has shape {tuple(tensor.shape)}, its parameter's local shape is "
                f"{_local_shape(p)}, split along dim {dim}: pass it with the parameter's length along that dim "
                f"(not flattened or partitioned)"
            )
        if is_expert:
            experts[name], dims[name] = tensor.detach().contiguous().cpu(), dim
            continue
        full_size = getattr(p, "tp_full_size", None)
        if dim is not None and full_size is not None:  # a padded vocabulary's shard: the file holds its real rows
            tensor = strip_padding(tensor, dim, state.tp_rank, full_size)
        dense[name], dims[name] = tensor.detach().contiguous().cpu(), dim
    writes_dense = state.dp_rank == 0
    writes_experts = coords["edp"] == 0 and state.tp_rank == 0  # one copy of each expert shard
    if state.pp_size > 1:
        if not (writes_dense or writes_experts):
            return  # a pipeline whose first stage writes nothing
        if not writes_dense:
            dense = {}  # only its experts are written
        if not writes_experts:
            experts = {}  # another tensor rank writes them
        # the group's device (NCCL moves CUDA tensors), not one read off `like`: the first stage may hold nothing to
        # write (the optimizer's expert tensors from stages with MoE layers, none on it) and still receive
        if not _gather_to_first_stage(dense, experts, dims, state, comm_device(state.pp_group)):
            return
    if writes_dense:
        out.mkdir(parents=True, exist_ok=True)
        model_set.write(dense, {k: dims[k] for k in dense}, out, state.tp_rank, state.tp_size)
        if config is not None and state.tp_rank == 0:
            config.save(out / "config.json")
    if experts and writes_experts:
        out.mkdir(parents=True, exist_ok=True)
        expert_set.write(experts, {k: dims[k] for k in experts}, out, state.ep_rank, state.ep_size)


def _local_shape(p: torch.Tensor) -> tuple[int, ...]:
    # DeepSpeed ZeRO-3 leaves a partitioned parameter empty and records its shape as ds_shape
    return tuple(getattr(p, "ds_shape", p.shape))


def _gather_to_first_stage(
    dense: dict[str, torch.Tensor],
    experts: dict[str, torch.Tensor],
    dims: dict[str, int | None],
    state: ParallelState,
    device: torch.device,
) -> bool:
    """Move every stage's tensors into the first stage's dicts (collective over the pipeline group).

    The names and split dims travel as one small object; the tensors one at a time, point to point from `device`
    (NCCL moves CUDA tensors: one tensor at a time on the GPU, not a pickled stage). True on the first stage.
    """
    first = dist.get_global_rank(state.pp_group, 0)
    index = [(name, dims[name], name in experts) for name in [*dense, *experts]]
    indexes: list | None = [None] * state.pp_size if state.pp_rank == 0 else None
    dist.gather_object(index, indexes, dst=first, group=state.pp_group)
    if state.pp_rank != 0:
        for name, _, is_expert in index:
            send_tensor((experts if is_expert else dense)[name].to(device), first, state.pp_group)
        return False
    for stage in range(1, state.pp_size):
        src = dist.get_global_rank(state.pp_group, stage)
        for name, dim, is_expert in indexes[stage]:
            (experts if is_expert else dense)[name] = recv_tensor(src, state.pp_group, device).cpu()
            dims[name] = dim
    return True


def load_native_state_dict(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The full (merged) state dict of a native checkpoint, whatever tp (and ep) degree it was saved at."""
    ckpt = Path(ckpt_dir)
    if not is_native(ckpt):
        raise CheckpointError(f"{ckpt}: no {MODEL_SHARDS.pattern} shards (is this a Hugging Face directory?)")
    merged = MODEL_SHARDS.read(ckpt)
    if EXPERT_SHARDS.files(ckpt):
        merged.update(EXPERT_SHARDS.read(ckpt))
    return merged


def read_rank_state_dict(
    directory: str | Path, model: torch.nn.Module, *, reader: ShardReader | None = None
) -> dict[str, torch.Tensor]:
    """The tensors `model` holds (its pipeline part's only), each this rank's slice of a native checkpoint.

    The rank is the model's `state` (tensor and expert rank). A pipeline's tied head copy, which the checkpoint holds
    only as the embedding, is read from the embedding, as LlamaForCausalLM's load_state_dict pre-hook fills it.
    `reader`: the directory's ShardReader when the caller has one (its headers are then not read again).
    """
    reader = reader or ShardReader(directory)
    state = model.state
    ranks = {"tp_rank": state.tp_rank, "tp_size": state.tp_size, "ep_rank": state.ep_rank, "ep_size": state.ep_size}
    out = {}
    for name, p in model_tensors(model).items():
        source = TIED_SOURCE if name == TIED_HEAD and getattr(p, "pipeline_tied", None) == "copy" else name
        out[name] = reader.read(source, **ranks)
    return out
