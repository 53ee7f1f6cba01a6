"""MFU's one definition (training.metrics: peaks by exact GPU part, timed-matmul fallback, FLOPs per token) and TF32."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from configs.schema import load_config
from configs.sections import ConfigError
from modeling.config import ModelConfig
from modeling.llama import LlamaForCausalLM
from training import distributed, metrics

CUDA = torch.device("cuda", 0)  # only a name here: the tests stub torch.cuda.get_device_name


@pytest.fixture
def restore_tf32():
    """Put torch's TF32 flags back as they were (the tests set them as the trainer does on CUDA)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.mark.parametrize(
    ("name", "part", "bf16_tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", "H100 NVL", 835.5),
        ("NVIDIA H200", "H200 SXM", 989.4),
        ("NVIDIA H200 NVL", "H200 NVL", 835.5),
        ("NVIDIA GH200 480GB", "GH200", 989.4),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
        ("NVIDIA A100 80GB PCIe", "A100", 312.0),
        ("NVIDIA L40S", "L40S", 362.05),
        ("NVIDIA L4", "L4", 121.0),
        ("NVIDIA A10", "A10", 125.0),
        ("NVIDIA GeForce RTX 4090", "RTX 4090", 165.2),
    ],
)
def test_gpu_peak_by_exact_part(name, part, bf16_tflops):
    peak = metrics.gpu_peak(name)
    assert peak is not None and peak.part == part
    assert peak.bf16 == pytest.approx(bf16_tflops * 1e12)
    assert peak.fp32 <= peak.tf32 <= peak.bf16  # TF32 can equal fp32 (Ada: RTX 4090, L40)


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA H800", "Tesla V100-SXM2-16GB"])
def test_unlisted_gpu_has_no_peak_not_a_neighbour_s(name):
    assert metrics.gpu_peak(name) is None  # A10G is not an A10, H800 not an H100: they get a timed matmul


def test_peak_flops_on_cuda_follows_dtype_and_tf32(monkeypatch, restore_tf32):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert metrics.peak_flops(CUDA, torch.bfloat16) == pytest.approx(756.5e12)
    distributed.set_fp32_matmul_precision(CUDA, tf32=True)
    assert metrics.tf32_enabled() and torch.backends.cuda.matmul.allow_tf32
    assert metrics.peak_flops(CUDA, torch.float32) == pytest.approx(378e12)
    distributed.set_fp32_matmul_precision(CUDA, tf32=False)
    assert not metrics.tf32_enabled() and not torch.backends.cuda.matmul.allow_tf32
    assert metrics.peak_flops(CUDA, torch.float32) == pytest.approx(51.2e12)


def test_tf32_is_left_alone_off_cuda(restore_tf32):
    torch.backends.cuda.matmul.allow_tf32 = False
    distributed.set_fp32_matmul_precision(torch.device("cpu"), tf32=True)
    assert not metrics.tf32_enabled()
    assert torch.backends.mkldnn.matmul.fp32_precision in ("none", "ieee")  # the CPU's fp32 matmuls stay exact


@pytest.mark.parametrize("tensor_cores", [True, False], ids=["A100/H100", "V100/T4: bf16 emulated"])
def test_auto_dtype_is_bf16_only_with_bf16_tensor_cores(monkeypatch, tensor_cores):
    from training.loop import Trainer

    # torch's answer counts emulation unless asked not to: True on a V100 by default
    bf16_support = lambda including_emulation=True: tensor_cores or including_emulation  # noqa: E731
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_support)
    want = torch.bfloat16 if tensor_cores else torch.float32
    assert distributed.auto_dtype(CUDA) == want
    auto = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(dtype="auto")))
    assert Trainer._dtype(SimpleNamespace(**vars(auto), device=CUDA)) == want  # train.dtype=auto
    assert Trainer._dtype(SimpleNamespace(**vars(auto), device=torch.device("cpu"))) == torch.float32


def test_a_backend_that_cannot_move_the_runs_tensors_is_refused():
    base = ["model.preset=tiny", "data.synthetic=true"]
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match=r"parallel.backend=nccl moves CUDA tensors only.*train.device=auto"):
        distributed.check_backend("nccl", cpu, load_config(None, base))
    distributed.check_backend("gloo", cpu, load_config(None, [*base, "parallel.pp=2", "parallel.cp=2"]))
    distributed.check_backend("nccl", CUDA, load_config(None, [*base, "parallel.pp=2"]))
    # gloo's collectives take CUDA tensors (through host copies): data, tensor and expert parallelism, Ulysses
    distributed.check_backend("gloo", CUDA, load_config(None, [*base, "parallel.tp=2", "parallel.cp=2"]))
    p2p = load_config(None, [*base, "parallel.pp=2", "parallel.cp=2", "parallel.cp_attention=ring"])
    with pytest.raises(ConfigError, match=r"gloo sends and receives CPU tensors only, and parallel.pp=2 and "):
        distributed.check_backend("gloo", CUDA, p2p)


def test_unlisted_gpu_peak_is_a_timed_matmul_in_the_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10G")
    calls = []
    monkeypatch.setattr(metrics, "matmul_peak_flops", lambda *args: calls.append(args) or 1.0)
    assert metrics.peak_flops(CUDA, torch.bfloat16) == 1.0
    assert calls == [(CUDA, torch.bfloat16, 8192)]


class _Events(TorchFunctionMode):
    """Records each matmul dispatched while active, into the shared event list."""

    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("matmul", "__matmul__"):
            self.events.append("matmul")
        return func(*args, **(kwargs or {}))


def test_timed_matmul_clock_runs_between_synchronizations(monkeypatch):
    events: list[str] = []
    clock = iter(range(100))
    monkeypatch.setattr(metrics, "_synchronize", lambda device: events.append("sync"))
    fake_time = SimpleNamespace(perf_counter=lambda: events.append("clock") or float(next(clock)))
    monkeypatch.setattr(metrics, "time", fake_time)
    with _Events(events):
        flops = metrics.matmul_peak_flops(torch.device("cpu"), torch.float32, n=8)
    # warm-up, then wait for it before the clock starts; the timed matmuls, then wait for them before it stops
    assert events == ["matmul", "sync", "clock", "matmul", "matmul", "matmul", "sync", "clock"]
    assert flops == 2 * 8**3 * 3 / 1.0  # the fake clock advanced by 1 between its two reads


def _model_config(tied: bool) -> ModelConfig:
    return ModelConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_flops_per_token_counts_matmuls_not_the_embedding_gather(tied):
    mc = _model_config(tied)
    model = LlamaForCausalLM(mc)
    # independent count: every 2-D weight is a matmul's, but the input embedding's table is only gathered from
    # (named once when tied: then it is also the head's weight and counts)
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and ("embed" not in n or tied))
    seq = 16
    attention = 12 * mc.num_hidden_layers * mc.num_attention_heads * mc.head_dim * seq
    assert metrics.flops_per_token(mc, seq) == 6 * matmul + attention
    assert matmul == mc.num_active_params() - (0 if tied else mc.vocab_size * mc.hidden_size) - 2 * 32 * 2 - 32


def test_mfu_is_achieved_over_all_devices_peak():
    assert metrics.mfu(2_000.0, 6e9, 1e12, devices=4) == pytest.approx(2_000 * 6e9 / 4e12)
    assert metrics.mfu(2_000.0, 6e9, 1e12) == pytest.approx(2_000 * 6e9 / 1e12)


def test_train_tf32_key_reaches_the_device_setup(monkeypatch):
    base = ["model.preset=tiny", "data.synthetic=true", "model.vocab_size=64", "train.device=cpu"]
    assert load_config(None, base).train.tf32 is True
    cfg = load_config(None, [*base, "train.tf32=false"])
    calls = []
    monkeypatch.setattr(distributed, "set_fp32_matmul_precision", lambda device, *, tf32: calls.append((device, tf32)))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_distributed(cfg) == torch.device("cpu")
    assert calls == [(torch.device("cpu"), False)]
    with pytest.raises(ConfigError, match="train.tf32"):
        load_config(None, [*base, "train.tf32=1"])
