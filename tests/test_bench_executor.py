"""The executor seam without Ray: the driver, failed cells, the CLI's --executor checks."""

from __future__ import annotations

import io
import sys

import pytest
from rich.console import Console
from typer.testing import CliRunner

from longreach.bench import BenchConfig, ResultStore, run_bench
from longreach.bench.executors import ModelBackend
from longreach.bench.plan import build_plan
from longreach.bench.render import bench_with_progress
from longreach.cli import app
from longreach.tasks import get_task

GRID = dict(model="lab", tasks=["passkey"], lengths=[256, 512], depths=[0.5], samples=2)


class _HookedBackend(ModelBackend):
    """The lab model with a forward hook that fails on inputs over 300 tokens."""

    def open(self):
        facts = super().open()

        def fail_long(module, args, kwargs):
            ids = kwargs.get("input_ids")
            if ids is not None and ids.shape[-1] > 300:
                raise RuntimeError("injected failure on a long input")

        self._model.register_forward_pre_hook(fail_long, with_kwargs=True)
        return facts


class _InProcess:
    """The smallest executor: one backend (``backend`` if given), opened here, cells in order."""

    device = "cpu"
    threads = 1

    def __init__(self, backend=None) -> None:
        self.backend = backend

    def start(self, backends):
        self.backend = self.backend or backends[0]
        return [self.backend.open()]

    def preflight(self, fingerprint, cells):
        self.backend.preflight(cells)

    def map(self, cells, on_start, on_outcome):
        for cell in cells:
            on_start(cell, "here")
            (outcome,) = self.backend.run([cell])
            on_outcome(cell, outcome)

    def close(self):
        pass


def test_failed_cells_are_recorded_with_their_error_and_the_run_goes_on(tmp_path):
    config = BenchConfig(db=str(tmp_path / "runs.db"), **GRID)
    backend = _HookedBackend(config, "cpu", 1)
    plan = build_plan(config, ["vanilla"], [get_task("passkey")], backend.open().fingerprint)
    outcomes = backend.run(plan)
    kinds = [type(o).__name__ for o in outcomes]
    assert kinds == ["Cell", "Cell", "CellFailure", "CellFailure"], kinds

    out = Console(width=200, record=True, file=io.StringIO())
    result = bench_with_progress(config, out, executor=_InProcess(_HookedBackend(config)))
    text = out.export_text()
    assert (result.computed, result.failed, result.skipped) == (2, 2, 0)
    assert text.count("failed: RuntimeError: injected failure on a long input") == 2, text
    with ResultStore(config.db, create=False) as store:
        cells = sorted(store.cells(), key=lambda c: (c.length, c.idx))
    assert [c.score is None for c in cells] == [False, False, True, True]
    assert cells[2].meta == {
        "error": "RuntimeError: injected failure on a long input",
        "attempts": 1,
    }

    again = run_bench(config, executor=_InProcess())
    assert (again.computed, again.skipped) == (0, 4), "a rerun recomputed a recorded cell"


def test_executor_ray_without_ray_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    args = ["bench", "--model", "lab", "--lengths", "256", "--db", str(tmp_path / "r.db")]
    result = CliRunner().invoke(app, [*args, "--executor", "ray"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install 'longreach[ray]'" in lines[0], result.output
    assert not (tmp_path / "r.db").exists(), "the failed command left a database behind"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--workers", "2"], "--workers needs --executor ray."),
        (["--ray-address", "10.0.0.1:6379"], "--ray-address needs --executor ray."),
        (["--executor", "dask"], "unknown --executor 'dask'; use local or ray."),
    ],
)
def test_executor_options_are_checked(tmp_path, extra, message):
    args = ["bench", "--model", "lab", "--lengths", "256", "--db", str(tmp_path / "r.db")]
    result = CliRunner().invoke(app, [*args, *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
