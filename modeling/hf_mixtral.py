"""Expert tensor names between Hugging Face Mixtral checkpoints and the native MoE layer.

Native (modeling.moe.MoEMLP, layer i): `model.layers.{i}.mlp.gate.weight` (E, H) and the experts stacked,
`mlp.w1` (E, I, H), `mlp.w3` (E, I, H), `mlp.w2` (E, H, I). Every other tensor has the same name as in Llama.

Hugging Face, two layouts, both read:

    per expert (what transformers 4 and 5 write with save_pretrained, and what Mixtral-8x7B ships):
        model.layers.{i}.block_sparse_moe.gate.weight                 (E, H)
        model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight       (I, H)   e = 0 .. E-1, likewise w3
        model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight       (H, I)
    fused (transformers 5's module layout, what its state_dict() holds in memory):
        model.layers.{i}.mlp.gate.weight                              (E, H)
        model.layers.{i}.mlp.experts.gate_up_proj                     (E, 2I, H) = [w1; w3] along dim 1
        model.layers.{i}.mlp.experts.down_proj                        (E, H, I)  = w2

Exports are written per expert, the layout every transformers version loads.
"""

from __future__ import annotations

import re

import torch

from modeling.config import ModelConfig

PER_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
PER_EXPERT_GATE = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight$")
FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


class MixtralLayoutError(ValueError):
    """Expert tensors of a Mixtral checkpoint that do not form whole layers; the message names them."""


def mixtral_to_native(state_dict: dict[str, torch.Tensor], config: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """A Hugging Face Mixtral state dict (either layout) with its expert tensors renamed and stacked as native."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    I = config.intermediate_size  # noqa: E741
    for name, tensor in state_dict.items():
        if m := PER_EXPERT.match(name):
            experts.setdefault((int(m[1]), m[3]), {})[int(m[2])] = tensor
        elif m := PER_EXPERT_GATE.match(name):
            out[f"model.layers.{m[1]}.mlp.gate.weight"] = tensor
        elif m := FUSED.match(name):
            prefix = f"model.layers.{m[1]}.mlp"
            if m[2] == "gate_up_proj":
                out[f"{prefix}.w1"], out[f"{prefix}.w3"] = tensor[:, :I], tensor[:, I:]  # (E, I, H) each
            else:
                out[f"{prefix}.w2"] = tensor
        else:
            out[name] = tensor
    for (layer, w), by_index in sorted(experts.items()):
        missing = sorted(set(range(config.num_local_experts)) - set(by_index))
        if missing:
            raise MixtralLayoutError(
                f"{source}: layer {layer} has no block_sparse_moe.experts.{missing[0]}.{w}.weight (config.json says "
                f"num_local_experts={config.num_local_experts}); the checkpoint is incomplete"
            )
        out[f"model.layers.{layer}.mlp.{w}"] = torch.stack([by_index[e] for e in range(config.num_local_experts)])
    return out


def native_to_mixtral(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full native state dict with its expert tensors renamed and unstacked into the per-expert Mixtral layout."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        m = re.match(r"model\.layers\.(\d+)\.mlp\.(w[123]|gate\.weight)$", name)
        if m is None:
            out[name] = tensor
        elif m[2] == "gate.weight":
            out[f"model.layers.{m[1]}.block_sparse_moe.gate.weight"] = tensor
        else:
            for e, expert in enumerate(tensor.unbind(0)):  # (E, ...) -> E x (I, H) or (H, I)
                out[f"model.layers.{m[1]}.block_sparse_moe.experts.{e}.{m[2]}.weight"] = expert.contiguous()
    return out
