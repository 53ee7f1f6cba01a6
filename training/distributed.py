"""Process-group start-up for one rank: the group the launcher described, accelerate's DeepSpeed json, a free port."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from configs.schema import TrainConfig
from configs.sections import ConfigError, resolve_path


def init_distributed(cfg: TrainConfig) -> torch.device:
    """Join the process group the launcher described (nccl on CUDA, gloo on CPU) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but torch sees no CUDA device; use train.device=cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    # DeepSpeed needs a process group even for one process: make a world of one
    if (world > 1 or cfg.zero_stage() > 0) and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it
        os.environ.setdefault("WORLD_SIZE", "1")
        backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if want_cuda else "gloo")
        dist.init_process_group(backend, timeout=timedelta(minutes=cfg.parallel.timeout_minutes))
    return device


def adopt_accelerate_deepspeed_config(cfg: TrainConfig) -> None:
    """Under `accelerate launch` with DeepSpeed, use its json unless parallel.deepspeed_config names another."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return
    given = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not given:
        return
    ours = cfg.parallel.deepspeed_config
    if ours is None:
        cfg.parallel.deepspeed_config = given
    elif resolve_path(ours).resolve() != resolve_path(given).resolve():
        raise ConfigError(
            f"parallel.deepspeed_config={ours} but the accelerate config launches DeepSpeed with {given}; "
            f"make them the same (or drop parallel.deepspeed_config to use accelerate's)"
        )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT of a group started on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
