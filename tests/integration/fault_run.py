"""pretrain_llama.py with one injected fault, for tests/integration/test_fault_matrix.py.

    LLAMA_FAULT=PHASE:STEP:RANK python tests/integration/fault_run.py [pretrain_llama.py arguments]

PHASE is where rank RANK fails while computing (or saving, or evaluating) optimizer step STEP (1-based):
    forward, backward, optimizer   SIGKILL in the first micro-batch's forward or backward (a pipeline stage's, under
                                   pipeline parallelism), or in the engine's step
    checkpoint                     SIGKILL after this rank wrote its model shards into step-STEP.tmp
    enospc                         the checkpoint writer raises OSError(ENOSPC) after this rank wrote its shards
    eval_sigterm                   SIGTERM to itself as the eval of step STEP starts (as a scheduler would send)
Without LLAMA_FAULT this is pretrain_llama.py, less two start-up costs that no case looks at (about 1.5 s of each
process on a 2-core machine): the timed CPU matmul behind `mfu` and the loss_curve.png plot. The patches live here,
not in the trainer: production code has no test hooks.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain_llama import main  # noqa: E402
from training import loop  # noqa: E402
from training.loop import Trainer  # noqa: E402
from training.metrics import MetricsLogger  # noqa: E402

PHASES = ("forward", "backward", "optimizer", "checkpoint", "enospc", "eval_sigterm")


def _die(phase: str, step: int) -> None:
    print(f"fault_run: SIGKILL in {phase} of step {step}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def install(phase: str, step: int, rank: int) -> None:
    """Patch Trainer so that rank `rank` fails in `phase` of optimizer step `step`."""
    if phase not in PHASES:
        raise SystemExit(f"LLAMA_FAULT: phase {phase!r} is not one of {PHASES}")
    init = Trainer.__init__

    def patched_init(self: Trainer, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        if self.state.rank != rank:
            return
        engine = self.engine
        backward, opt_step = engine.backward, engine.step

        def faulty_backward(loss):
            if phase == "backward" and self.step + 1 == step:
                _die(phase, step)
            return backward(loss)

        def faulty_step():
            if phase == "optimizer" and self.step + 1 == step:
                _die(phase, step)
            return opt_step()

        engine.backward, engine.step = faulty_backward, faulty_step
        for stage in [] if self.pipeline is None else self.pipeline.stages:  # pp: the schedule calls the stages
            stage.forward = faulty_stage_forward(self, stage.forward)

    def faulty_stage_forward(self: Trainer, stage_forward):
        def run(*args, **kwargs):
            if phase == "forward" and self.step + 1 == step:
                _die(phase, step)
            out = stage_forward(*args, **kwargs)
            if phase == "backward" and self.step + 1 == step and out.requires_grad:
                out.register_hook(lambda grad: _die(phase, step))
            return out

        return run

    forward, write_weights, evaluate = Trainer._forward, Trainer.write_weights, Trainer.evaluate

    def faulty_forward(self: Trainer, batch):
        if phase == "forward" and self.state.rank == rank and self.model.training and self.step + 1 == step:
            _die(phase, step)
        return forward(self, batch)

    def faulty_write_weights(self: Trainer, directory: Path) -> None:
        write_weights(self, directory)  # the shards are written; the rest of the checkpoint is not
        if self.state.rank == rank and self.step == step:
            if phase == "checkpoint":
                _die(phase, step)
            if phase == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / f"rank-{rank:05d}.pt"))

    def faulty_evaluate(self: Trainer):
        if phase == "eval_sigterm" and self.state.rank == rank and self.step == step:
            print(f"fault_run: SIGTERM in the eval of step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag: the eval runs to its end
        return evaluate(self)

    Trainer.__init__ = patched_init
    Trainer._forward, Trainer.write_weights, Trainer.evaluate = faulty_forward, faulty_write_weights, faulty_evaluate


def skip_startup_costs() -> None:
    """No timed matmul for the peak FLOPs (mfu is not compared) and no plot: the matrix runs about 40 processes."""
    loop.peak_flops = lambda device, dtype: 1e12
    MetricsLogger.plot = lambda self, out: None


if __name__ == "__main__":
    skip_startup_costs()
    fault = os.environ.get("LLAMA_FAULT")
    if fault:
        name, at_step, at_rank = fault.split(":")
        install(name, int(at_step), int(at_rank))
    main(sys.argv[1:])
