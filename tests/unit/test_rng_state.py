"""The RNG state a checkpoint keeps per rank (training.checkpoint.rng_state / set_rng_state): the CPU's and Python's
generators round-trip; CUDA's is saved and restored only where the process uses CUDA (spoofed on the CPU)."""

import random

import torch

from training.checkpoint import rng_state, set_rng_state


def test_cpu_and_python_generators_round_trip():
    state = rng_state()
    want = (torch.rand(3), random.random())
    torch.rand(5), random.random()
    set_rng_state(state)
    got = (torch.rand(3), random.random())
    assert torch.equal(got[0], want[0]) and got[1] == want[1]


def test_cuda_generator_only_where_this_process_uses_cuda(monkeypatch):
    touched = []

    def get_state():
        touched.append("get")  # on a GPU host this creates a CUDA context, on GPU 0 from every rank
        return torch.zeros(16, dtype=torch.uint8)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU host
    monkeypatch.setattr(torch.cuda, "get_rng_state", get_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: touched.append("set"))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # train.device=cpu
    state = rng_state()
    assert "cuda" not in state
    set_rng_state({**state, "cuda": torch.zeros(16, dtype=torch.uint8)})  # a GPU run's checkpoint resumed on the CPU
    assert touched == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # training on the GPU
    state = rng_state()
    set_rng_state(state)
    assert "cuda" in state and touched == ["get", "set"]
