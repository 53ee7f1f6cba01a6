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
    set_fp32_matmul_precision(device, tf32=cfg.train.tf32)
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


def set_fp32_matmul_precision(device: torch.device, *, tf32: bool) -> None:
    """On CUDA, run fp32 matmuls and convolutions on TF32 tensor cores, or with tf32=False in exact IEEE fp32.

    TF32 rounds the inputs of an fp32 product to 10 mantissa bits and accumulates in fp32: about 7x the fp32
    rate of an H100 (494.7 against 66.9 TFLOP/s dense) for train.dtype=fp32 and any fp32 matmul outside bf16
    autocast. Other devices are left alone: these flags are CUDA's, and torch's global
    set_float32_matmul_precision would also change the CPU's (oneDNN) fp32 matmuls.
    """
    if device.type != "cuda":
        return
    # the allow_tf32 setters keep torch's legacy flag and its fp32_precision in step, so code reading either
    # (accelerate, inductor, training.metrics.tf32_enabled) agrees; setting fp32_precision alone leaves a read
    # of allow_tf32 raising that the two APIs were mixed
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


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
