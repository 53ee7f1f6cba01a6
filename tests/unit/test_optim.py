"""ZeRO-Offload's optimizer switch (training.optim.build_optimizer(offload=...)), without DeepSpeed's C++ op.

`deepspeed.ops.adam` is replaced by a stand-in module: one whose DeepSpeedCPUAdam records its arguments (the switch
hands it torch AdamW's groups and hyperparameters), one whose op fails to build (the fallback warns, naming the
config, and AdamW steps). The op's numerics against torch's AdamW are tested under ZeRO-Offload in
tests/distributed/test_optimizer_state.py.
"""

import sys
import types

import pytest
import torch
from torch import nn

from configs.sections import OptimSection
from parallel.deepspeed_engine import offloads_optimizer
from training.optim import build_optimizer

OPT = OptimSection(lr=3e-3, beta1=0.8, beta2=0.9, eps=1e-7, weight_decay=0.2)
CONFIG = "configs/deepspeed/zero3_offload.json"


class _RecordingAdam(torch.optim.Optimizer):
    """Keeps what DeepSpeedCPUAdam was given; steps nothing."""

    def __init__(self, params, lr, betas, eps, adamw_mode):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0))
        self.adamw_mode = adamw_mode


class _UnbuildableAdam:
    """Fails as DeepSpeedCPUAdam does when its op does not build: a RuntimeError caused by the build's error."""

    def __init__(self, *args, **kwargs):
        try:
            raise OSError("ninja: command not found\nthe rest of the build log")
        except OSError as e:
            raise RuntimeError("DeepSpeedCPUAdam requires the cpu_adam op, which failed to build/load.") from e


def _with_adam(monkeypatch, cls) -> None:
    module = types.ModuleType("deepspeed.ops.adam")
    module.DeepSpeedCPUAdam = cls
    monkeypatch.setitem(sys.modules, "deepspeed.ops.adam", module)


def _model() -> nn.Module:
    return nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 3))


def test_offload_builds_deepspeed_cpu_adam_from_adamws_groups_and_hyperparameters(monkeypatch):
    _with_adam(monkeypatch, _RecordingAdam)
    model = _model()
    plain, _ = build_optimizer(model, OPT, max_steps=10)
    opt, sched = build_optimizer(model, OPT, max_steps=10, offload=CONFIG)
    assert isinstance(opt, _RecordingAdam) and opt.adamw_mode and sched.optimizer is opt
    keys = ("lr", "initial_lr", "betas", "eps", "weight_decay")
    want = [({id(p) for p in g["params"]}, {k: g[k] for k in keys}) for g in plain.param_groups]
    got = [({id(p) for p in g["params"]}, {k: g[k] for k in keys}) for g in opt.param_groups]
    assert got == want and [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]  # decay, no decay
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["eps"] == 1e-7


def test_offload_falls_back_to_adamw_with_a_warning_naming_the_config(monkeypatch):
    _with_adam(monkeypatch, _UnbuildableAdam)
    with pytest.warns(UserWarning) as caught:
        opt, _ = build_optimizer(_model(), OPT, max_steps=10, offload=CONFIG)
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 2
    (message,) = [str(w.message) for w in caught]
    assert message.startswith(f"{CONFIG} offloads the optimizer (zero_optimization.offload_optimizer)")
    assert "(OSError: ninja: command not found)" in message and "build log" not in message
    assert "DS_BUILD_CPU_ADAM=1" in message


def test_offloads_optimizer_reads_the_zero_section():
    assert offloads_optimizer({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}})
    assert offloads_optimizer({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}})
    assert not offloads_optimizer({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"}}})
    assert not offloads_optimizer({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}})
    assert not offloads_optimizer(None)
