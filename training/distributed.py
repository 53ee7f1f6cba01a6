"""Process groups for one rank: start-up, and the reductions behind the step's decisions.

Start-up joins the group the launcher described (accelerate's DeepSpeed json adopted, a free port for one process)
and sets the process's allocator and matmul precision;
`step_values` and `any_rank` reduce what every rank must decide alike (skip a step, stop on bad token ids or a
signal).
"""

from __future__ import annotations

import ctypes
import os
import platform
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from configs.schema import TrainConfig
from configs.sections import ConfigError, resolve_path
from parallel.state import ParallelState
from parallel.token_ids import DeferredTokenIdChecks


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
    if device.type == "cpu" and cfg.train.keep_host_memory:
        keep_host_memory()
    # DeepSpeed needs a process group even for one process: make a world of one
    if (world > 1 or cfg.zero_stage() > 0) and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it
        os.environ.setdefault("WORLD_SIZE", "1")
        backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if want_cuda else "gloo")
        check_backend(backend, device, cfg)
        dist.init_process_group(backend, timeout=timedelta(minutes=cfg.parallel.timeout_minutes))
    return device


def check_backend(backend: str, device: torch.device, cfg: TrainConfig) -> None:
    """Refuse a parallel.backend that cannot move this run's tensors, before the first collective would fail.

    NCCL takes CUDA tensors only. gloo sends and receives CPU tensors only (torch.distributed's table of backends;
    its collectives take CUDA tensors through host copies): no pipeline stages' or ring attention's point-to-point
    on CUDA.
    """
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(
            f"parallel.backend=nccl moves CUDA tensors only, and this run trains on the CPU (train.device="
            f"{cfg.train.device}): use parallel.backend=gloo (or auto)"
        )
    p = cfg.parallel
    p2p = [f"parallel.pp={p.pp}"] if p.pp > 1 else []
    if p.cp > 1 and p.cp_attention == "ring":
        p2p.append(f"parallel.cp={p.cp} with parallel.cp_attention=ring")
    if backend == "gloo" and device.type == "cuda" and p2p:
        raise ConfigError(
            f"parallel.backend=gloo sends and receives CPU tensors only, and {' and '.join(p2p)} send CUDA tensors "
            f"point to point: use parallel.backend=nccl (or auto)"
        )


def auto_dtype(device: torch.device) -> torch.dtype:
    """The dtype of train.dtype=auto and generate.py's default: bf16 on a CUDA GPU with bf16 tensor cores, else fp32.

    bf16 tensor cores: compute capability 8.0 or newer (A100, H100, ...). `torch.cuda.is_bf16_supported()` alone
    also says yes where CUDA only emulates bf16 (V100, T4): matmuls without tensor cores, and FlexAttention's bf16
    kernels need sm80. The CPU stays fp32 (bf16 there: train.dtype=bf16).
    """
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float32


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


def keep_host_memory() -> bool:
    """Keep memory that tensors free mapped in the process (glibc): a step's large tensors reuse it, no page faults.

    torch's CPU tensors come from malloc, and glibc serves blocks over its mmap threshold (32 MiB at most) with
    fresh mappings that it unmaps on free; every byte of the next step's tensor then faults a zeroed page in again
    (about 0.2 ms per MiB on the 2-core VMs, against 0.03 ms to rewrite memory already mapped). Training allocates
    the same large tensors every step (the (N, vocab) logits, activations), so this costs a bf16 step on 2 Xeon
    cores about 13% (bench/README.md). With mmap off (M_MMAP_MAX 0) and trimming off (M_TRIM_THRESHOLD at its
    maximum) freed blocks stay in the heap for the next allocation. Costs and limits: the process keeps the highest
    host memory it ever used (checkpoint saves and loads, evaluation included) until it exits; threads other than
    the main one still map blocks over 64 MiB afresh (glibc's secondary arenas); forked DataLoader workers inherit
    the setting; under an LD_PRELOADed allocator (jemalloc, tcmalloc) the call changes nothing. Returns whether both
    settings took (False on another libc).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    took = [libc.mallopt(m_mmap_max, 0), libc.mallopt(m_trim_threshold, 2**31 - 1)]  # both, whatever the first gave
    return all(took)


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


def step_values(
    loss: torch.Tensor,
    nonfinite: torch.Tensor,
    tokens: int,
    metrics: dict[str, torch.Tensor],
    state: ParallelState,
    ids: DeferredTokenIdChecks,
) -> tuple[bool, float, int, dict[str, float]]:
    """(a loss was non-finite on any rank, the mean loss over dp, tokens over dp, the metrics' means over dp).

    One read of the device, which also reads the step's token-id checks (`ids`) and raises their TokenIdError,
    on every rank when any rank's ids were bad. The flags are maxima over all ranks, so that every rank skips the step
    (or stops) together; loss, tokens and metrics are summed over the data-parallel group (fp64: exact token counts).
    Built without host-to-device copies.
    """
    bad_ids, ranges = ids.values(loss.device)
    flags = torch.cat([nonfinite.to(torch.float64).reshape(1), bad_ids])  # (2,)
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    count = torch.full((), float(tokens), dtype=torch.float64, device=loss.device)  # a fill, not a copy
    sums = torch.stack([loss.detach().to(torch.float64), count, *(v.to(torch.float64) for v in metrics.values())])
    if state.dp_size > 1:
        dist.all_reduce(sums, group=state.dp_group)
    bad, any_bad_ids, loss_sum, token_sum, *values = torch.cat([flags, sums, ranges]).tolist()
    values, ranges_read = values[: len(metrics)], values[len(metrics) :]
    ids.raise_if_bad(ranges_read, anywhere=any_bad_ids > 0)
    means = {k: v / state.dp_size for k, v in zip(metrics, values, strict=True)}
    return bad > 0, loss_sum / state.dp_size, int(token_sum), means


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is true on any rank (collective over the world; a signal may reach one rank only).

    One read of the device where there are several processes, none for one. The flag is filled on the device, not
    copied there: a copy from pageable memory would first wait for the device's queued work, a second wait.
    """
    if not dist.is_initialized():
        return flag
    t = torch.full((1,), float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
