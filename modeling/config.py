"""ModelConfig: the Llama architecture as a dataclass, read from and written to Hugging Face `config.json`.

Every LlamaConfig field that changes the numbers is here: sizes, head_dim, rms_norm_eps, rope_theta,
rope_scaling (none / linear / dynamic / llama3), tie_word_embeddings, attention_bias, mlp_bias. Both the
transformers 4 form (`rope_theta` + `rope_scaling`) and the transformers 5 form (`rope_parameters`) are read; both
are written, so either version loads an export.

sliding_window (Mistral's and Mixtral's key; None = full causal attention): a query at sequence index i attends the
keys at j with i - window < j <= i (modeling.llama.causal_mask). A dense model with a window reads and writes
Mistral's config.json (architectures MistralForCausalLM, model_type mistral); without one it is a Llama (a Mistral
checkpoint with "sliding_window": null exports as the Llama it computes). Llama has no window: a Llama config.json
with one is refused.

A model with experts (num_local_experts > 0) reads and writes Mixtral's config.json (architectures
MixtralForCausalLM, model_type mixtral: num_local_experts, num_experts_per_tok, router_aux_loss_coef, ...); the
fields Mixtral lacks (router_score, capacity_factor, shared experts, ...) are written beside them, so a native
checkpoint reloads exactly. A dense model's config.json has no MoE keys.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from parallel.state import ParallelConfigError

ROPE_TYPES = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


MOE_FIELDS = (
    "num_local_experts",
    "num_experts_per_tok",
    "moe_layer_interval",
    "moe_layers",
    "router_score",
    "norm_topk_prob",
    "router_aux_loss_coef",
    "router_z_loss_coef",
    "capacity_factor",
    "num_shared_experts",
    "router_expert_bias",
    "router_bias_update_rate",
)


MISTRAL_DEFAULT_WINDOW = 4096  # transformers' MistralConfig.sliding_window when config.json leaves it out


class ConfigError(ValueError):
    """A model configuration that cannot work; the message names the key."""


class CheckpointError(ValueError):
    """A checkpoint that does not match what it claims to be; the message names the file or tensor."""


@dataclass
class ModelConfig:
    """Llama decoder hyper-parameters, in Hugging Face's names. `None` fields are derived in __post_init__."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    sliding_window: int | None = None  # attend to the last `sliding_window` tokens (this one included); None = all
    # Mixture of experts (Mixtral's names where it has them). num_local_experts=0 is a dense Llama.
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    moe_layer_interval: int = 1  # every k-th layer is MoE (layers k-1, 2k-1, ...); 1 = all
    moe_layers: list[int] | None = None  # explicit MoE layer indices; overrides moe_layer_interval
    router_score: str = "softmax"  # softmax | sigmoid
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum to 1 (Mixtral does)
    router_aux_loss_coef: float = 0.001  # Switch/Mixtral load-balancing loss
    router_z_loss_coef: float = 0.0  # ST-MoE router z-loss
    capacity_factor: float | None = None  # None = dropless; else tokens per expert <= cf * tokens * k / experts
    num_shared_experts: int = 0  # DeepSeek-style experts every token goes through
    router_expert_bias: bool = False  # auxiliary-loss-free balancing: a per-expert bias used only for selection
    router_bias_update_rate: float = 0.001

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"model.hidden_size={self.hidden_size} is not divisible by model.num_attention_heads="
                    f"{self.num_attention_heads}; set model.head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_key_value_heads={self.num_key_value_heads}"
            )
        if self.sliding_window is not None and (
            isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int) or self.sliding_window < 1
        ):
            raise ConfigError(
                f"model.sliding_window={self.sliding_window!r} must be a positive integer (the number of tokens a "
                f"query attends to, itself included) or null for full causal attention"
            )
        self.rope_scaling = self._check_rope_scaling(self.rope_scaling)
        self._check_moe()

    def _check_moe(self) -> None:
        if self.num_local_experts == 0:
            return
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(
                f"model.num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                f"model.num_local_experts={self.num_local_experts}"
            )
        if self.router_score not in ("softmax", "sigmoid"):
            raise ConfigError(f"model.router_score={self.router_score!r}; choose softmax or sigmoid")
        if self.moe_layer_interval < 1:
            raise ConfigError(f"model.moe_layer_interval={self.moe_layer_interval} must be >= 1")
        bad = [i for i in self.moe_layers or [] if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ConfigError(f"model.moe_layers has {bad}, outside 0..{self.num_hidden_layers - 1}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(f"model.capacity_factor={self.capacity_factor} must be positive (or null: dropless)")

    def is_moe_layer(self, index: int) -> bool:
        """Whether decoder layer `index` has a mixture-of-experts MLP."""
        if self.num_local_experts == 0:
            return False
        if self.moe_layers is not None:
            return index in self.moe_layers
        return index % self.moe_layer_interval == self.moe_layer_interval - 1

    @staticmethod
    def _check_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
        if not scaling:
            return None
        scaling = dict(scaling)
        rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
        scaling.pop("type", None)
        scaling.pop("rope_theta", None)  # transformers 5 keeps it inside rope_parameters; ours is a field
        if rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"model.rope_scaling.rope_type={rope_type!r} is not supported; use one of {sorted(ROPE_TYPES)}"
            )
        missing = ROPE_TYPES[rope_type] - set(scaling)
        if missing:
            raise ConfigError(f"model.rope_scaling (rope_type={rope_type!r}) is missing {sorted(missing)}")
        if rope_type == "default":
            return None
        if scaling["factor"] <= 0:
            raise ConfigError(f"model.rope_scaling.factor must be > 0, got {scaling['factor']}")
        return {"rope_type": rope_type, **{k: scaling[k] for k in sorted(ROPE_TYPES[rope_type])}}

    @property
    def rope_type(self) -> str:
        """'default', 'linear', 'dynamic' or 'llama3'."""
        return self.rope_scaling["rope_type"] if self.rope_scaling else "default"

    def validate_parallel(self, tp: int, ep: int = 1) -> None:
        """Check that every sharded dimension splits over `tp` tensor ranks (experts over `ep`); errors name the key.

        The vocabulary need not divide: the embedding and the head pad it to a multiple of tp (parallel.layers).
        """
        if ep > 1 and (self.num_local_experts == 0 or self.num_local_experts % ep):
            raise ParallelConfigError(
                f"model.num_local_experts={self.num_local_experts} is not divisible by parallel.ep={ep}"
                + (" (this model has no experts: use parallel.ep=1)" if self.num_local_experts == 0 else "")
            )
        checks = [
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("intermediate_size", self.intermediate_size),
        ]
        for key, value in checks:
            if value % tp:
                hint = (
                    " (key/value heads are sharded, not replicated: use a tp that divides num_key_value_heads)"
                    if key == "num_key_value_heads"
                    else ""
                )
                raise ParallelConfigError(f"model.{key}={value} is not divisible by parallel.tp={tp}{hint}")

    # ---- Hugging Face config.json ----

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Read a Hugging Face LlamaConfig, MistralConfig or MixtralConfig dict (transformers 4 or 5 layout)."""
        model_type = d.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "mixtral"):
            raise ConfigError(
                f"{source}: model_type={model_type!r}; this converter reads Llama, Mistral and Mixtral checkpoints "
                f"(model_type 'llama', 'mistral' or 'mixtral', architectures ['LlamaForCausalLM'], "
                f"['MistralForCausalLM'] or ['MixtralForCausalLM'])"
            )
        d = dict(d)
        if model_type == "llama" and d.get("sliding_window") is not None:
            raise ConfigError(
                f"{source}: sliding_window={d['sliding_window']} with model_type 'llama': transformers' Llama has no "
                f"sliding window and would ignore it. Use model_type 'mistral' (MistralForCausalLM) for a model "
                f'trained with a window, or set "sliding_window": null'
            )
        if model_type == "mistral":
            d.setdefault("sliding_window", MISTRAL_DEFAULT_WINDOW)  # MistralConfig's default when the key is absent
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={d['hidden_act']!r} is not supported (Llama uses 'silu')")
        if d.get("pretraining_tp", 1) != 1:
            raise ConfigError(f"{source}: pretraining_tp={d['pretraining_tp']} is not supported; it must be 1")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        if rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ConfigError(f"{source}: partial_rotary_factor != 1 is not supported")
        names = {f.name for f in fields(cls)} - {"rope_theta", "rope_scaling"}
        kwargs = {k: v for k, v in d.items() if k in names}
        return cls(**kwargs, rope_theta=float(rope_theta), rope_scaling=rope or None)

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers 4 and 5 load as LlamaForCausalLM.

        With experts: MixtralForCausalLM; dense with a sliding window: MistralForCausalLM (Llama has no window).
        """
        moe, mistral = self.num_local_experts > 0, self.num_local_experts == 0 and self.sliding_window is not None
        skip = {"rope_scaling", *(() if moe else MOE_FIELDS), *(() if moe or mistral else ("sliding_window",))}
        d = {k: v for k, v in asdict(self).items() if k not in skip}  # asdict copies: no aliasing
        rope_scaling = dict(self.rope_scaling) if self.rope_scaling else None
        rope_parameters = {**(rope_scaling or {}), "rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if moe:
            arch = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}
        elif mistral:
            arch = {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}
        else:
            arch = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "pretraining_tp": 1}
        return {
            **arch,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            **d,
            "rope_scaling": rope_scaling,
            "rope_parameters": rope_parameters,
        }

    def mistral_incompatibilities(self) -> list[str]:
        """The settings transformers' MistralForCausalLM cannot represent (empty: a windowed model exports exactly).

        Mistral's projections have no biases (its attention and MLP are built with bias=False).
        """
        return [k for k in ("attention_bias", "mlp_bias") if getattr(self, k)]

    def mixtral_incompatibilities(self) -> list[str]:
        """The settings transformers' MixtralForCausalLM cannot represent (empty: the model exports exactly)."""
        wrong = {
            "num_local_experts": self.num_local_experts < 1,
            "moe_layer_interval / moe_layers": any(not self.is_moe_layer(i) for i in range(self.num_hidden_layers)),
            "router_score": self.router_score != "softmax",
            "norm_topk_prob": not self.norm_topk_prob,
            "capacity_factor": self.capacity_factor is not None,
            "num_shared_experts": self.num_shared_experts > 0,
            "router_expert_bias": self.router_expert_bias,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
        }
        return [k for k, bad in wrong.items() if bad]

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """Read a config.json file (ours or Hugging Face's)."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file; a checkpoint directory needs a config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        return cls.from_hf_dict(d, source=str(path))

    def save(self, path: str | Path) -> None:
        """Write config.json in Hugging Face's layout."""
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")

    def num_params(self) -> int:
        """Parameter count of the full (unsharded) model."""
        return self._count_params(self.num_local_experts)

    def num_active_params(self) -> int:
        """Parameters one token passes through: a MoE layer counts its top-k routed experts (FLOPs per token)."""
        return self._count_params(self.num_experts_per_tok)

    def _count_params(self, experts_counted: int) -> int:
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attn = h * self.num_attention_heads * self.head_dim * 2 + h * kv * 2
        dense_mlp = 3 * h * self.intermediate_size
        moe_mlp = dense_mlp * (experts_counted + self.num_shared_experts) + h * self.num_local_experts  # + router
        n_moe = sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        mlps = (self.num_hidden_layers - n_moe) * dense_mlp + n_moe * moe_mlp
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * (attn + 2 * h) + mlps + embed + h


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The directory whose config.json describes a checkpoint: a run directory resolves to its `latest` step."""
    path = Path(path)
    if (path / "latest").is_file() and not (path / "config.json").exists():
        step = path / (path / "latest").read_text().strip()
        if not step.is_dir():
            raise CheckpointError(f"{path / 'latest'} names {step.name}, which does not exist; pass a step-* directory")
        return step
    return path
