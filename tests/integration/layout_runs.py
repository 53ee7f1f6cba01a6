"""Run several training scenarios in one process (or one torchrun world): layout tests, DPO tests, run_worlds.

    python tests/integration/layout_runs.py SCENARIOS.json                        # one process
    python -m torch.distributed.run --nproc_per_node 2 tests/integration/layout_runs.py SCENARIOS.json

SCENARIOS.json is a list of {"out": dir, "overrides": [...], "seed_from": checkpoint dir or null,
"expect_error": text or null, "trainer": "dpo" or absent, "config": yaml or absent, "stdout": path or absent}. Each
runs `Trainer(load_config(config, SYNTHETIC + overrides)).run()` in turn, or with "trainer": "dpo" dpo.py's DPOTrainer
on the overrides alone (the process group and the imports are shared: launching once instead of once per run keeps
the suite fast). With `seed_from`, that step directory is copied into `out` first (as `latest`), so the run
resumes from it. Each data rank records the rows it trained on (out/rows-dpN.json: a digest per row, in the order
handed out); a scenario whose Trainer raises writes the message to out/error.txt (and must have expected it). With
"stdout", each rank writes what it prints during the scenario to that path + ".rankN" (train_utils.run_worlds).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from configs.schema import load_config  # noqa: E402
from tests.integration.train_utils import SYNTHETIC  # noqa: E402
from training.loop import Trainer  # noqa: E402


def digest(input_ids: Any, targets: Any) -> str:
    """A row's identity: its input ids and its last target (the whole window of seq_len + 1 tokens; of a pair: both)."""
    ids = [*input_ids.reshape(-1).tolist(), int(targets.reshape(-1)[-1])]
    return hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:16]


class RecordingLoader:
    """The trainer's loader, recording a digest of every row it hands out."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.rows = loader, []

    def __iter__(self) -> Any:
        for batch in self.loader:
            self.rows += [digest(i, t) for i, t in zip(batch["input_ids"], batch["targets"], strict=True)]
            yield batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def run(scenario: dict[str, Any]) -> None:
    """One scenario: seed its directory, train, record the rows (or the expected error)."""
    import torch.distributed as dist

    out = Path(scenario["out"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and scenario.get("seed_from"):
        src = Path(scenario["seed_from"])
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        shutil.copytree(src, out / src.name)
        (out / "latest").write_text(src.name + "\n")
    if dist.is_initialized():
        dist.barrier()
    trainer_cls, base = Trainer, SYNTHETIC
    if scenario.get("trainer") == "dpo":
        from dpo import DPOTrainer

        trainer_cls, base = DPOTrainer, []
    cfg = load_config(scenario.get("config"), [*base, f"checkpoint.dir={out}", *scenario["overrides"]])
    try:
        trainer = trainer_cls(cfg)
    except Exception as e:  # a refusal: the test reads the message
        if not scenario.get("expect_error"):
            raise
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "error.txt").write_text(f"{type(e).__name__}: {e}")
        return
    trainer.loader = recorder = RecordingLoader(trainer.loader)
    trainer.run()
    s = trainer.state
    if s.tp_rank == 0 and s.cp_rank == 0 and s.pp_rank == 0:
        record = {"dp_rank": s.dp_rank, "grad_accum": trainer.grad_accum, "rows": recorder.rows}
        (out / f"rows-dp{s.dp_rank}.json").write_text(json.dumps(record))


class ScenarioStdout(io.TextIOBase):
    """sys.stdout for the whole launch: text goes to the running scenario's file, else to the real stdout.

    One object throughout, so that a logger which kept sys.stdout (DeepSpeed's handler, made at its first import)
    follows the scenarios instead of writing to a closed file.
    """

    def __init__(self, real: Any) -> None:
        self.real, self.file = real, None

    def write(self, text: str) -> int:
        """Write to the scenario's file, or the real stdout between scenarios."""
        return (self.file or self.real).write(text)

    def flush(self) -> None:
        """Flush where the text goes."""
        (self.file or self.real).flush()

    def fileno(self) -> int:
        """The file descriptor of where the text goes."""
        return (self.file or self.real).fileno()

    @property
    def encoding(self) -> str:
        """The real stdout's encoding."""
        return self.real.encoding


def main() -> None:
    """Run every scenario of the json file given (each rank's stdout into the scenario's "stdout" file, if named)."""
    sys.stdout = stdout = ScenarioStdout(sys.stdout)
    for scenario in json.loads(Path(sys.argv[1]).read_text()):
        if not scenario.get("stdout"):
            run(scenario)
            continue
        with open(f"{scenario['stdout']}.rank{os.environ.get('RANK', '0')}", "w") as stdout.file:
            try:
                run(scenario)
            finally:
                stdout.file = None


if __name__ == "__main__":
    main()
