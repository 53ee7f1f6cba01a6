"""Context parallelism in one process: every refused layout by message, and the model's chunks at cp=1."""

import pytest
import torch

from configs.schema import ConfigError, load_config
from modeling.config import ModelConfig
from modeling.context import active, loss_share
from modeling.llama import LlamaForCausalLM
from parallel.state import ParallelState

TINY = ["model.preset=tiny", "model.vocab_size=256", "data.synthetic=true", "data.seq_len=32"]
TINY += ["train.micro_batch_size=1", "train.global_batch_size=4"]


def _validate(overrides: list[str], world: int = 2) -> None:
    load_config(None, [*TINY, *overrides]).validate(world_size=world)


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["parallel.cp=2", "data.seq_len=30"], 2, "data.seq_len=30 must divide by 2 x parallel.cp=4"),
        (["parallel.cp=4", "data.seq_len=36"], 4, "data.seq_len=36 must divide by 2 x parallel.cp=8"),
        (["parallel.cp=2", "parallel.tp=4", "parallel.sequence_parallel=true", "data.seq_len=36",
          "model.num_attention_heads=8", "model.num_key_value_heads=4"], 8,
         "data.seq_len=36 / parallel.cp=2 must divide by parallel.tp=4 under sequence_parallel"),
        (["parallel.cp=4", "parallel.tp=2", "model.num_attention_heads=4"], 8,
         "parallel.cp_attention=ulysses splits each tensor rank's 2 attention heads"),
        (["parallel.cp=2", "parallel.ep=2", "model.num_local_experts=4",
          "parallel.deepspeed_config=configs/deepspeed/zero1.json"], 4, "DeepSpeed reduces expert gradients"),
        (["parallel.cp=2", "parallel.cp_attention=flash"], 2, "parallel.cp_attention='flash'; choose one of"),
        (["parallel.cp=3"], 4, "parallel.cp=3 does not divide the world size 4"),
        (["parallel.cp=0"], 2, "parallel.cp=0 must be positive"),
    ],
)  # fmt: skip
def test_refused_context_layouts_name_the_keys(overrides, world, message):
    with pytest.raises(ConfigError) as err:
        _validate(overrides, world)
    assert message in str(err.value)


def test_accepted_context_layouts():
    _validate(["parallel.cp=2"])
    _validate(["parallel.cp=4", "parallel.tp=2", "model.num_attention_heads=4", "parallel.cp_attention=ring"], 8)
    _validate(["parallel.cp=2", "parallel.pp=2"], 4)
    _validate(["parallel.cp=2", "parallel.ep=2", "model.num_local_experts=4"], 4)


def test_cp1_model_is_the_plain_model():
    # the default state has no context group: nothing is split, the loss share is the loss
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    assert not active(model.state)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    assert model.local(ids) is ids
    ce = torch.tensor(2.5)
    targets = torch.tensor([[1, 2, -100]])
    loss, mean = loss_share(ParallelState(), ce, targets)
    assert loss.item() == mean.item() == 2.5


def test_a_chunk_without_targets_has_loss_zero_and_finite_gradients():
    # under context parallelism a chunk may hold only prompt tokens (SFT): its share must be 0, not 0/0
    from parallel.cross_entropy import vocab_parallel_linear_cross_entropy

    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(16, 8, requires_grad=True)
    loss = vocab_parallel_linear_cross_entropy(x, w, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))
