"""Running a bench grid on workers other than this process: the driver and the cell backend.

The driver (``run_bench_on``) plans the grid, skips the cells the database holds, hands the
rest to an executor and is the only writer of the results database: workers return rows.
An executor takes two things:

- a *backend*: a picklable object that, opened once inside a worker, holds what runs cells
  (``ModelBackend``: a loaded model and tokenizer) and turns a list of planned cells into
  finished cells or failures;
- the planned cells, each routed to a worker whose backend has the cell's model fingerprint.

``longreach.bench.ray_executor.RayExecutor`` runs backends as Ray actors. Another backend
(a client of an OpenAI-compatible endpoint, say) plugs into the same executor by providing
``open``, ``preflight`` and ``run`` (``longreach.bench.endpoint_backend``); its ``run`` may
answer ``BackendDown`` for cells it could not reach its server for.

A cell that fails for good is stored like any other cell, with ``score`` NULL, an empty
output and ``meta = {"error": ..., "attempts": ...}``: the run goes on, the summary and the
report leave it out of every mean, and a rerun skips it like a finished cell.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from longreach.bench.grid import BenchConfig
from longreach.bench.plan import ModelFacts, PlannedCell, build_plan, library_versions
from longreach.bench.runner import BenchResult, ProgressEvent, ProgressFn
from longreach.bench.store import Cell, ResultStore
from longreach.errors import LongreachError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CellFailure:
    """A cell that could not be computed: its key, the error in one line, the attempts made."""

    key: str
    error: str
    attempts: int = 1


Outcome = Cell | CellFailure


@dataclass(frozen=True)
class BackendDown:
    """A cell not computed because its backend itself went out of service (an endpoint that
    stopped answering): the executor sends that backend no more cells and runs this one on
    another worker, up to its attempt bound. Never handed to ``on_outcome``."""

    key: str
    error: str


class CellBackend(Protocol):
    """What runs cells inside a worker. Picklable before ``open``; ``open`` loads (once)."""

    def open(self) -> ModelFacts: ...

    def preflight(self, cells: Sequence[PlannedCell]) -> None: ...

    def run(self, cells: Sequence[PlannedCell]) -> list[Outcome | BackendDown]: ...


class GridExecutor(Protocol):
    """Starts workers holding backends, then maps planned cells onto them.

    ``device`` and ``threads`` are what a model backend should use inside each worker
    (``None``: the model's default device).
    """

    device: str | None
    threads: int

    def start(self, backends: Sequence[CellBackend]) -> list[ModelFacts]: ...

    def preflight(self, fingerprint: str, cells: Sequence[PlannedCell]) -> None: ...

    def map(
        self,
        cells: Sequence[PlannedCell],
        on_start: Callable[[PlannedCell, str], None],
        on_outcome: Callable[[PlannedCell, Outcome], None],
    ) -> None: ...

    def close(self) -> None: ...


def one_line(exc: BaseException) -> str:
    """``"RuntimeError: first line of the message"``; a LongreachError keeps its own sentence."""
    text = str(exc).strip().splitlines()
    first = text[0].strip() if text else ""
    if isinstance(exc, LongreachError):
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# --------------------------------------------------------------------------- the model backend


class _Collector:
    """Stands in for the store inside a worker: keeps the cells the runner finishes."""

    def __init__(self) -> None:
        self.cells: list[Cell] = []

    def add(self, cell: Cell, run_id: int) -> bool:
        self.cells.append(cell)
        return True


def _ignore(event: ProgressEvent) -> None:
    pass


class ModelBackend:
    """Cells computed by the in-process runner on a model that this worker loads once.

    The method stays applied between calls while consecutive cells share it, and the
    cells of one call go through the runner's own loop, so consecutive cells share their
    common prefix exactly as in a local run.
    """

    def __init__(self, config: BenchConfig, device: str | None = None, threads: int = 1) -> None:
        self.config = config
        self.device = device if device is not None else config.device
        self.threads = threads
        self._model: Any = None
        self._tokenizer: Any = None
        self._facts: ModelFacts | None = None
        self._method: str | None = None
        self._stack = ExitStack()

    _LOADED = ("_model", "_tokenizer", "_facts", "_method", "_stack")

    def __getstate__(self) -> dict[str, Any]:
        # Only the recipe travels to a worker, never a loaded model.
        return {k: v for k, v in self.__dict__.items() if k not in self._LOADED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._model = self._tokenizer = self._facts = self._method = None
        self._stack = ExitStack()

    def open(self) -> ModelFacts:
        if self._facts is not None:
            return self._facts
        import torch

        from longreach.bench.plan import model_facts
        from longreach.models import load

        if self.threads:
            torch.set_num_threads(self.threads)
        self._model, self._tokenizer = load(
            self.config.model, dtype=self.config.dtype, device=self.device
        )
        self._facts = model_facts(self._model, self._tokenizer, self.config.model)
        return self._facts

    def _format(self) -> Any:
        from longreach.tasks import PromptFormat

        return PromptFormat(self._tokenizer, chat=self.config.chat)

    def preflight(self, cells: Sequence[PlannedCell]) -> None:
        self.open()
        from longreach.bench import preflight

        preflight.check_cells(self._model, self._tokenizer, self.config, list(cells))

    def _use_method(self, method: str) -> None:
        if method == self._method:
            return
        from longreach.bench.runner import apply_method

        self._stack.close()
        self._method = None
        self._stack = ExitStack()
        self._stack.enter_context(apply_method(self._model, method))
        self._method = method

    def run(self, cells: Sequence[PlannedCell]) -> list[Outcome]:
        """Each cell finished or failed, in order; an error in one cell does not stop the rest."""
        import torch

        from longreach.bench.runner import RunContext, run_cells

        facts = self.open()
        fmt = self._format()
        out: list[Outcome] = []
        pending = list(cells)
        while pending:
            method = pending[0].method
            n = next((i for i, c in enumerate(pending) if c.method != method), len(pending))
            group, pending = pending[:n], pending[n:]
            self._use_method(method)
            while group:
                collector = _Collector()
                ctx = RunContext(self._model, self._tokenizer, fmt, self.config, facts, collector)
                try:
                    with torch.inference_mode():
                        run_cells(ctx, method, group)
                    out += collector.cells
                    group = []
                except Exception as exc:  # noqa: BLE001 - recorded with the cell, the run goes on
                    out += collector.cells
                    failed = group[len(collector.cells)]
                    log.warning("%s failed: %s", failed.describe(), one_line(exc))
                    out.append(CellFailure(failed.key, one_line(exc)))
                    group = group[len(collector.cells) + 1 :]
        return out


# --------------------------------------------------------------------------- the driver


@dataclass
class ExecutorResult(BenchResult):
    """A bench result computed by an executor; ``failed`` cells are stored with their error."""

    failed: int = 0


def failure_cell(planned: PlannedCell, facts: ModelFacts, failure: CellFailure) -> Cell:
    """The stored row of a cell that failed for good: no score, the error in ``meta``."""
    return planned.cell(
        facts, None, score=None, output="",
        meta={"error": failure.error, "attempts": failure.attempts},
    )  # fmt: skip


def run_bench_on(
    executor: GridExecutor,
    config: BenchConfig,
    progress: ProgressFn | None = None,
    backend: CellBackend | None = None,
) -> ExecutorResult:
    """``run_bench`` with the cells computed by ``executor``'s workers; this process writes.

    Resume is the local runner's: every cell whose key the database holds is skipped.
    ``backend`` defaults to a ``ModelBackend`` that loads ``config.model`` in each worker.
    """
    started = time.perf_counter()
    from longreach.bench import preflight

    methods, tasks = preflight.check_config(config)
    emit = progress or _ignore
    store = ResultStore(config.db)
    try:
        if backend is None:
            backend = ModelBackend(config, config.device or executor.device, executor.threads)
        facts = executor.start([backend])[0]
        tasks = preflight.fit_tasks(tasks, facts.trained_length)
        plan = build_plan(config, methods, tasks, facts.fingerprint)
        done = store.done_keys()
        todo = [c for c in plan if c.key not in done]
        skipped = len(plan) - len(todo)
        emit(ProgressEvent("plan", len(plan), skipped, skipped))
        run_id = store.start_run(
            facts.name, facts.fingerprint, dict(config.to_dict(), methods=methods),
            library_versions(),
        )  # fmt: skip
        if todo:
            executor.preflight(facts.fingerprint, todo)
        counts = {"computed": 0, "failed": 0}
        stored: set[str] = set()

        def on_start(planned: PlannedCell, worker: str) -> None:
            emit(
                ProgressEvent(
                    "start",
                    len(plan),
                    skipped + len(stored),
                    skipped,
                    f"{planned.describe()} ({worker})",
                )  # fmt: skip
            )

        def on_outcome(planned: PlannedCell, outcome: Outcome) -> None:
            if planned.key in stored:
                return  # never written twice, whatever an executor delivers
            if isinstance(outcome, CellFailure):
                cell = failure_cell(planned, facts, outcome)
                counts["failed"] += 1
            else:
                cell = outcome
                if cell.key != planned.key:
                    raise LongreachError(
                        f"a worker returned the cell {cell.key} for {planned.key}; its model "
                        "differs from the driver's: give every node the same model files."
                    )
                counts["computed"] += 1
            store.add(cell, run_id)
            stored.add(planned.key)
            emit(
                ProgressEvent(
                    "done", len(plan), skipped + len(stored), skipped, planned.describe(), cell
                )
            )

        if todo:
            executor.map(todo, on_start, on_outcome)
        missing = [c for c in todo if c.key not in stored]
        if missing:
            raise LongreachError(
                f"the executor returned no result for {len(missing)} cells (first: "
                f"{missing[0].describe()}); finished cells are saved: run the command again."
            )
        return ExecutorResult(
            db=Path(config.db),
            run_id=run_id,
            model=facts.name,
            model_fingerprint=facts.fingerprint,
            trained_length=facts.trained_length,
            total=len(plan),
            skipped=skipped,
            computed=counts["computed"],
            seconds=time.perf_counter() - started,
            keys=frozenset(c.key for c in plan),
            failed=counts["failed"],
        )
    finally:
        store.close()
        executor.close()
