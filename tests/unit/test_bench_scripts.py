"""Every benchmark script under bench/ imports: a module it names that moved would otherwise fail only when a user
runs the benchmark (the scripts are not imported by anything else)."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_bench_script_imports(script):
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # runs its imports; `main` runs only under __main__
    assert callable(getattr(module, "main", None)), f"bench/{script} has no main()"
