"""Bench grids on a local Ray cluster (2 CPUs): rows equal the local runner's, workers die.

One Ray start is shared by the module (a start costs seconds); every executor in it joins
that cluster and leaves it running.
"""

from __future__ import annotations

import os
import signal
import sys

import pytest
from fixtures.tinylm import tiny_dir  # noqa: F401
from typer.testing import CliRunner

from longreach.bench import BenchConfig, ResultStore, run_bench
from longreach.bench.executors import ModelBackend, run_bench_on
from longreach.bench.plan import build_plan, canonical_method, load_tasks
from longreach.cli import app

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

GRID = dict(
    model="lab",
    methods=["vanilla", "self-extend:group=4,window=128"],
    tasks=["passkey", "perplexity:last=64"],
    lengths=[256, 512],
    depths=[0.2, 0.8],
    samples=2,
)
CELLS = 2 * (2 * 2 * 2 + 2 * 2)  # methods × (passkey: lengths × samples × depths + perplexity)


@pytest.fixture(scope="module")
def cluster():
    ray.init(
        num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, logging_level="ERROR"
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory):
    db = tmp_path_factory.mktemp("local") / "local.db"
    result = run_bench(BenchConfig(db=str(db), **GRID))
    assert result.computed == CELLS, (
        f"expected {CELLS} cells, the local run computed {result.computed}"
    )
    return _rows(db)


def _rows(db) -> dict[str, tuple]:
    """Per key: what must not depend on where a cell ran (score, token counts, output)."""
    with ResultStore(db, create=False) as store:
        return {c.key: (c.score, c.context_tokens, c.new_tokens, c.output) for c in store.cells()}


def _executor(**kw):
    from longreach.bench.ray_executor import RayExecutor

    return RayExecutor(workers=2, **kw)


def test_ray_rows_equal_local_rows_and_rerun_recomputes_nothing(cluster, local_rows, tmp_path):
    db = tmp_path / "ray.db"
    result = run_bench(BenchConfig(db=str(db), **GRID), executor=_executor())
    assert (result.total, result.computed, result.skipped, result.failed) == (CELLS, CELLS, 0, 0)
    rows = _rows(db)
    assert sorted(rows) == sorted(local_rows), "the Ray run stored other keys than the local run"
    differ = [k for k in rows if rows[k] != local_rows[k]]
    assert not differ, f"{len(differ)} cells differ from the local run, e.g. {differ[0]}"
    with ResultStore(db, create=False) as store:
        before = {c.key: (c.run_id, c.created_at) for c in store.cells()}

    again = run_bench(BenchConfig(db=str(db), **GRID), executor=_executor())
    assert (again.computed, again.skipped) == (0, CELLS), "the rerun recomputed cells"
    with ResultStore(db, create=False) as store:
        after = {c.key: (c.run_id, c.created_at) for c in store.cells()}
    assert after == before, "the rerun rewrote stored cells"


def test_cli_ray_run_and_rerun(cluster, tmp_path):
    db = tmp_path / "cli.db"
    args = ["bench", "--model", "lab", "--method", "vanilla", "--task", "passkey"]
    args += ["--lengths", "256", "--samples", "4", "--db", str(db)]
    args += ["--executor", "ray", "--workers", "1"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "4 cells computed, 0 already in" in first.output, first.output
    assert "passkey" in first.output and "256" in first.output, first.output
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "0 cells computed, 4 already in" in second.output, second.output


def test_sigkill_a_worker_mid_run_every_cell_stored_once(cluster, local_rows, tmp_path):
    db = tmp_path / "killed.db"
    executor = _executor()
    killed: list[int] = []
    stored: list[str] = []

    def on_event(event):
        if event.kind == "done":
            stored.append(event.cell.key)
            if event.done == 5 and not killed:
                pid = executor.worker_pids()[0]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    result = run_bench(BenchConfig(db=str(db), **GRID), progress=on_event, executor=executor)
    assert killed, "the test never killed a worker"
    assert executor.deaths == 1, f"expected 1 worker death, the executor saw {executor.deaths}"
    assert (result.computed, result.failed) == (CELLS, 0)
    assert len(stored) == len(set(stored)) == CELLS, "a cell was delivered twice or lost"
    assert _rows(db) == local_rows, "after the kill the stored rows differ from the local run"


class _PoisonBackend(ModelBackend):
    """Kills its own worker process whenever it is handed one chosen cell."""

    def __init__(self, config, poison: str) -> None:
        super().__init__(config, "cpu", 1)
        self.poison = poison

    def run(self, cells):
        if any(c.key == self.poison for c in cells):
            os._exit(1)
        return super().run(cells)


def test_a_cell_that_kills_every_worker_is_recorded_with_its_error(cluster, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = BenchConfig(
        db=str(tmp_path / "poison.db"), **dict(GRID, tasks=["passkey"], lengths=[256])
    )
    executor = _executor(max_attempts=2)
    probe = ModelBackend(config, "cpu", 1)
    facts = probe.open()
    methods = [canonical_method(m) for m in config.methods]
    plan = build_plan(config, methods, load_tasks(config), facts.fingerprint)
    poison = plan[3].key

    result = run_bench_on(executor, config, backend=_PoisonBackend(config, poison))
    assert (result.total, result.computed, result.failed) == (len(plan), len(plan) - 1, 1)
    assert executor.deaths == 2, f"expected 2 deaths (max_attempts=2), saw {executor.deaths}"
    with ResultStore(config.db, create=False) as store:
        cells = {c.key: c for c in store.cells()}
    assert len(cells) == len(plan)
    bad = cells[poison]
    assert bad.score is None and bad.meta["attempts"] == 2, bad.meta
    assert bad.meta["error"].startswith("its Ray worker died 2 times while computing it"), bad.meta
    assert all(c.score is not None for k, c in cells.items() if k != poison)

    again = run_bench_on(_executor(), config)
    assert (again.computed, again.skipped) == (0, len(plan)), "the failed cell was recomputed"


def test_cells_go_only_to_workers_holding_their_model(cluster, tmp_path, tiny_dir):  # noqa: F811
    lab = BenchConfig(db=str(tmp_path / "x.db"), **dict(GRID, tasks=["passkey"], lengths=[256]))
    tiny = BenchConfig(**{**lab.to_dict(), "model": str(tiny_dir)})
    executor = _executor()
    try:
        facts = executor.start([ModelBackend(lab, "cpu"), ModelBackend(tiny, "cpu")])
        assert facts[0].fingerprint != facts[1].fingerprint
        plans = [
            build_plan(
                cfg, [canonical_method(m) for m in cfg.methods], load_tasks(cfg), f.fingerprint
            )
            for cfg, f in zip((lab, tiny), facts, strict=True)
        ]
        # interleaved, so a scheduler that ignored the model would mix them up
        cells = [c for pair in zip(*plans, strict=True) for c in pair]
        ran_on: dict[str, set[str]] = {}
        results = {}

        def on_start(planned, worker):
            ran_on.setdefault(planned.fingerprint, set()).add(worker)

        def on_outcome(planned, outcome):
            results[planned.key] = outcome

        executor.map(cells, on_start, on_outcome)
    finally:
        executor.close()
    assert sorted(results) == sorted(c.key for c in cells)
    assert all(results[c.key].key == c.key for c in cells), "a cell ran on the other model"
    assert [len(w) for w in ran_on.values()] == [1, 1], ran_on
    assert ran_on[facts[0].fingerprint] != ran_on[facts[1].fingerprint], ran_on


def test_more_workers_than_the_cluster_holds_is_one_line(cluster, tmp_path):
    from longreach.bench.ray_executor import RayExecutor
    from longreach.errors import LongreachError

    config = BenchConfig(db=str(tmp_path / "x.db"), **GRID)
    with pytest.raises(LongreachError) as info:
        RayExecutor(workers=5).start([ModelBackend(config, "cpu")])
    assert str(info.value) == (
        "5 workers × 1 CPU do not fit the Ray cluster's 2 CPUs; ask for fewer --workers."
    )
