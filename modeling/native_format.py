"""The native shard format: safetensors files that record which dimension each tensor is split along.

A native checkpoint is a directory holding
    config.json                          the model config, in Hugging Face's layout
    model-tp00-of-02.safetensors, ...    one file per tensor rank; each file's metadata records its rank, the
                                         tensor degree and, per tensor, the dimension it is split along
    experts-ep00-of-02.safetensors, ...  (mixture of experts only) the stacked expert tensors (E/ep, ...) of one
                                         expert rank, the same on every tensor rank; the metadata records the rank,
                                         the expert degree and, per tensor, the dimension the experts are split along
Because every shard says how it was cut, weights saved at one tp (and ep) degree load at any other: the shards are
concatenated along that dimension and re-split for the new degree. A vocabulary that tp does not divide is padded
in memory only (parallel.layers.tp_chunk): a file holds the real rows, so the last ranks' vocabulary shards are
shorter and the concatenation is the real (vocab_size, hidden) tensor, which re-splits at any tp. LoRA adapter
shards (modeling.lora_files, adapter-tpNN-of-NN.safetensors) are the same kind of file: one ShardSet describes
each of the three.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from modeling.config import CheckpointError, ModelConfig
from modeling.llama import LlamaForCausalLM
from parallel.layers import strip_padding, tp_chunk
from parallel.pipeline import recv_tensor, send_tensor
from parallel.state import ParallelState

EXPERT_SPLIT_DIM = 0  # expert tensors are stacked (E, ...): expert ranks hold consecutive blocks of E/ep


@dataclass(frozen=True)
class ShardSet:
    """One kind of shard file, `<prefix>-<axis>NN-of-NN.safetensors`, one file per rank of the `axis` group.

    Each file's metadata holds `format`, `<axis>_rank`, `<axis>_size` and `split_dims` (tensor name -> the dimension
    it is split along, None = replicated: read from the first file only). `error` is the exception an incomplete
    set raises, `label` how its message names the files.
    """

    prefix: str  # "model", "experts", "adapter"
    axis: str  # "tp" or "ep"
    format: str  # the metadata's "format" value
    error: type[ValueError] = CheckpointError
    label: str = "shards"

    @property
    def pattern(self) -> str:
        """The file name as the user reads it in messages: model-tpNN-of-NN.safetensors."""
        return f"{self.prefix}-{self.axis}NN-of-NN.safetensors"

    @property
    def regex(self) -> re.Pattern:
        """Matches a shard file name; group 1 is the rank, group 2 the degree."""
        return re.compile(rf"{self.prefix}-{self.axis}(\d+)-of-(\d+)\.safetensors$")

    def file_name(self, rank: int, size: int) -> str:
        """File name of one rank's shard."""
        return f"{self.prefix}-{self.axis}{rank:02d}-of-{size:02d}.safetensors"

    def write(
        self, tensors: dict[str, torch.Tensor], dims: dict[str, int | None], out_dir: Path, rank: int, size: int
    ) -> None:
        """Write one rank's safetensors file, its metadata recording rank, degree and each tensor's split dim."""
        meta = {
            "format": self.format,
            f"{self.axis}_rank": str(rank),
            f"{self.axis}_size": str(size),
            "split_dims": json.dumps(dims),
        }
        save_file(tensors, str(out_dir / self.file_name(rank, size)), metadata=meta)

    def files(self, directory: Path) -> list[Path]:
        """This kind's shard files in `directory`, sorted by name (by rank: ranks are zero-padded)."""
        pattern = f"{self.prefix}-{self.axis}*-of-*.safetensors"
        return sorted(p for p in directory.glob(pattern) if self.regex.search(p.name))

    def complete_set(self, directory: Path) -> list[Path]:
        """The shard files, raising `error` unless they are exactly one set of one degree."""
        files = self.files(directory)
        sizes = {int(self.regex.search(p.name).group(2)) for p in files}
        if len(sizes) != 1 or len(files) != next(iter(sizes)):
            raise self.error(
                f"{directory}: {self.label} {[p.name for p in files]} do not form one complete set; remove stale "
                f"shards of another {self.axis} degree"
            )
        return files

    def read(self, directory: Path) -> dict[str, torch.Tensor]:
        """The full tensors of the complete set in `directory`: split ones concatenated along their split dim."""
        handles = [safe_open(str(p), framework="pt") for p in self.complete_set(directory)]
        dims = json.loads(handles[0].metadata()["split_dims"])
        merged = {}
        for name, dim in dims.items():
            parts = [h.get_tensor(name) for h in handles] if dim is not None else [handles[0].get_tensor(name)]
            merged[name] = torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]
        return merged


MODEL_SHARDS = ShardSet("model", "tp", "llama-tp")
EXPERT_SHARDS = ShardSet("experts", "ep", "llama-ep")


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
    expected = expected_tensors(config)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: tensors do not match config.json: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}"
            f", unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    for name, (shape, _) in expected.items():
        if tuple(state_dict[name].shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(state_dict[name].shape)}, config.json implies {shape}"
            )


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
    """Write this rank's share: the tensor shard (dp_rank 0), the expert shard (tp_rank 0 of the first expert group).

    Tensor rank 0 of dp_rank 0 also writes config.json. Under pipeline parallelism the stages of a pipeline send
    their tensors to its first stage (collective over the pipeline group), which writes the files a run without
    a pipeline writes: layers under their global indices, the tied embedding once.
    """
    state = model.state
    coords = state.dims.coords(state.rank)
    if coords["cp"] != 0:
        return  # context ranks hold the same weights as context rank 0, which writes them
    out = Path(out_dir)
    tensors, dims, experts = {}, {}, {}
    for name, p in model_tensors(model).items():
        if getattr(p, "pipeline_tied", None) == "copy":  # the first stage holds the embedding itself
            continue
        if getattr(p, "expert_parallel", False):
            experts[name] = p.detach().contiguous().cpu()
        else:
            dim = getattr(p, "tp_split_dim", None)
            full_size = getattr(p, "tp_full_size", None)
            if full_size is not None:  # a padded vocabulary's shard: the file holds its real rows only
                p = strip_padding(p, dim, state.tp_rank, full_size)
            tensors[name] = p.detach().contiguous().cpu()
            dims[name] = dim
    if state.pp_size > 1:
        if not (state.dp_rank == 0 or (coords["edp"] == 0 and state.tp_rank == 0)):
            return  # a pipeline whose first stage writes nothing (the same test as below)
        if state.dp_rank != 0:
            tensors, dims = {}, {}  # only its experts are written
        if not (coords["edp"] == 0 and state.tp_rank == 0):
            experts = {}  # another tensor rank writes them
        device = next(model.parameters()).device
        if not _gather_to_first_stage(tensors, dims, experts, state, device):
            return
    if state.dp_rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        MODEL_SHARDS.write(tensors, dims, out, state.tp_rank, state.tp_size)
        if state.tp_rank == 0:
            model.config.save(out / "config.json")
    if experts and coords["edp"] == 0 and state.tp_rank == 0:  # one copy of each expert shard
        out.mkdir(parents=True, exist_ok=True)
        EXPERT_SHARDS.write(experts, dict.fromkeys(experts, EXPERT_SPLIT_DIM), out, state.ep_rank, state.ep_size)


def _gather_to_first_stage(
    tensors: dict[str, torch.Tensor],
    dims: dict[str, int | None],
    experts: dict[str, torch.Tensor],
    state: ParallelState,
    device: torch.device,
) -> bool:
    """Move every stage's tensors into the first stage's dicts (collective over the pipeline group).

    The names and split dims travel as one small object; the tensors one at a time, point to point from `device`
    (NCCL moves CUDA tensors: one tensor at a time on the GPU, not a pickled stage). True on the first stage.
    """
    first = dist.get_global_rank(state.pp_group, 0)
    index = [(name, dims.get(name), name in experts) for name in [*tensors, *experts]]
    indexes: list | None = [None] * state.pp_size if state.pp_rank == 0 else None
    dist.gather_object(index, indexes, dst=first, group=state.pp_group)
    if state.pp_rank != 0:
        for name, _, is_expert in index:
            send_tensor((experts if is_expert else tensors)[name].to(device), first, state.pp_group)
        return False
    for stage in range(1, state.pp_size):
        src = dist.get_global_rank(state.pp_group, stage)
        for name, dim, is_expert in indexes[stage]:
            tensor = recv_tensor(src, state.pp_group, device).cpu()
            if is_expert:
                experts[name] = tensor
            else:
                tensors[name], dims[name] = tensor, dim
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
