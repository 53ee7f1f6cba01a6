"""bf16 on a CPU without bf16 hardware (parallel.layers.emulated_bf16): every matmul and attention runs in fp32.

torch emulates bf16 matmuls there hundreds of times slower than fp32. The trainer's bf16 on the torch engine keeps
fp32 weights under bf16 autocast, which casts F.linear, the head's product and SDPA to bf16: the model must multiply
in fp32 all the same, as it does for bf16 weights. The machine's answer is patched (`_native_bf16`), so the test
runs on any CPU; its reference is the same model in fp32 without autocast.
"""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import parallel.layers
from modeling.config import ModelConfig
from modeling.llama import LlamaForCausalLM

PRODUCTS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu"}
PRODUCTS |= {f"{name}_backward" for name in PRODUCTS}


class _ProductDtypes(TorchDispatchMode):
    """Counts (op, dtype of its first operand) for every matmul and attention kernel run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in PRODUCTS:
            self.seen[(func.overloadpacket.__name__, args[0].dtype)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("weights", ["fp32-autocast", "bf16"])
def test_bf16_without_bf16_hardware_multiplies_in_fp32(monkeypatch, weights):
    monkeypatch.setattr(parallel.layers, "_native_bf16", False)
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16 if weights == "bf16" else torch.float32)
    model.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 128, (2, 33))
    with _ProductDtypes() as products:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=weights != "bf16"):
            loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
    assert products.seen and {dtype for _, dtype in products.seen} == {torch.float32}, products.seen
    want = ref(ids[:, :-1], targets=ids[:, 1:]).loss
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-2)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        err = ((p.grad.float() - q.grad).norm() / q.grad.norm()).item()
        assert err < 3e-2, (name, err)  # activations are bf16 between the fp32 products
