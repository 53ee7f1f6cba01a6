"""Run a function on several CPU processes joined by a gloo process group.

Usage from a test::

    def _check(rank, world_size, n):  # module level, so spawn can import it
        t = torch.tensor([float(rank + n)])
        dist.all_reduce(t)
        return t.item()

    results = run_distributed(_check, 2, 10)  # [21.0, 21.0], in rank order

Each rank writes its outcome (return value or traceback) to its own file in a temporary directory, so
nothing large travels through pipes and a crashed rank is still reported. Any failure, crash or hang
becomes one AssertionError in the parent that carries every failing rank's full traceback.
"""

import os
import pickle
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.distributed import free_port

# After the first rank fails, the others get this long to finish or fail on their own (their own
# traceback is often the useful one) before they are killed: they may be blocked in a collective.
FAILURE_GRACE_S = 3.0


def _write_outcome(path: Path, outcome: tuple) -> None:
    # Write then rename, so the parent never reads a half-written file.
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(outcome, f)
    os.replace(tmp, path)


def _worker(rank, world_size, port, timeout, out_dir, fn, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    if sys.platform.startswith("linux"):
        # Keep gloo on loopback even where the hostname resolves to an unreachable address.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    out_path = Path(out_dir) / f"rank{rank}.pkl"
    try:
        dist.init_process_group(
            backend="gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        result = fn(rank, world_size, *args)
        dist.destroy_process_group()
        outcome = ("ok", result)
    except BaseException:
        # The time of failure orders the report: the first rank to raise is usually the cause.
        outcome = ("error", traceback.format_exc(), time.time_ns())
        if dist.is_initialized():
            dist.destroy_process_group()
    try:
        _write_outcome(out_path, outcome)
    except BaseException:  # e.g. an unpicklable return value
        _write_outcome(out_path, ("error", traceback.format_exc(), time.time_ns()))
    if outcome[0] != "ok":
        sys.exit(1)


def _read_outcome(path: Path):
    if not path.exists():
        return None
    with open(path, "rb") as f:
        return pickle.load(f)


def run_distributed(fn, world_size: int, *args, timeout: float = 240) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned processes under a gloo process group.

    Args:
        fn: a module-level (picklable) function; its return value must be picklable.
        world_size: number of processes (ranks).
        *args: extra picklable arguments passed to every rank.
        timeout: seconds, from start, before ranks still running are killed and reported.

    Returns:
        The per-rank return values of `fn`, in rank order.

    Raises:
        AssertionError: if any rank raised (its full traceback is in the message), crashed, or hung.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="run_distributed_") as out_dir:
        out = Path(out_dir)
        procs = [
            ctx.Process(
                target=_worker,
                args=(rank, world_size, port, timeout, out_dir, fn, args),
                name=f"rank{rank}",
                daemon=True,
            )
            for rank in range(world_size)
        ]
        timed_out: set[int] = set()
        killed_after_failure: set[int] = set()
        try:
            for p in procs:
                p.start()
            deadline = time.monotonic() + timeout
            grace_deadline = None
            while True:
                alive = [p for p in procs if p.is_alive()]
                if not alive:
                    break
                if grace_deadline is None and any(p.exitcode not in (None, 0) for p in procs):
                    grace_deadline = time.monotonic() + FAILURE_GRACE_S
                now = time.monotonic()
                stop_at = deadline if grace_deadline is None else min(deadline, grace_deadline)
                if now >= stop_at:
                    victims = timed_out if now >= deadline else killed_after_failure
                    for rank, p in enumerate(procs):
                        if p.is_alive():
                            p.kill()
                            victims.add(rank)
                    break
                wait([p.sentinel for p in alive], timeout=min(stop_at - now, 0.5))
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(timeout=30)

        results, raised, other = [], [], []
        for rank, p in enumerate(procs):
            outcome = _read_outcome(out / f"rank{rank}.pkl")
            where = f"rank {rank} of {world_size}"
            if outcome is not None and outcome[0] == "ok":
                results.append(outcome[1])
            elif outcome is not None:
                raised.append((outcome[2], f"{where} raised:\n{outcome[1]}"))
            elif rank in timed_out:
                other.append(f"{where} timed out after {timeout} s and was killed")
            elif rank in killed_after_failure:
                other.append(f"{where} was still running {FAILURE_GRACE_S} s after another rank failed; killed")
            else:
                other.append(f"{where} exited with code {p.exitcode} without reporting a result")
        if raised or other:
            # The first rank to raise comes first: the others are usually only victims of it.
            messages = [msg for _, msg in sorted(raised)] + other
            raise AssertionError(f"run_distributed({fn.__name__}) failed:\n" + "\n".join(messages))
        return results


# A spawn is costly: a test module runs all its checks in one `run_distributed` call, grouped in sections whose
# results come back as {"<section>: <check>": True or "failed: ..."} per rank, and one test asserts each section.


def check(results: dict, name: str, ok: bool, detail: object = "") -> None:
    """Record one check: True, or "failed: <detail>"."""
    results[name] = True if ok else f"failed: {detail}"


def run_sections(sections: list[tuple[str, Callable[[dict], None]]]) -> dict:
    """Run each (section, fn(results)) into one dict of checks.

    A section that raises is recorded as "<section>: raised" with its traceback, and the next one runs (one
    failure does not hide the others).
    """
    results: dict = {}
    for section, fn in sections:
        try:
            fn(results)
        except Exception:
            results[f"{section}: raised"] = traceback.format_exc()
    return results


def assert_sections(rank_results: list[dict], *sections: str, reports: tuple[str, ...] = ()) -> None:
    """Every check of `sections` passed on every rank, and rank 0 ran at least one.

    Keys that contain one of `reports` ("worst" error figures, say) carry numbers for the report, not checks.
    """
    failures = [
        f"rank {r}: {k}: {v}"
        for r, res in enumerate(rank_results)
        for k, v in res.items()
        if k.split(":")[0] in sections and v is not True and not any(word in k for word in reports)
    ]
    ran = [k for k in rank_results[0] if k.split(":")[0] in sections]
    assert ran and not failures, "\n".join(failures) or f"no check of {sections} ran"
