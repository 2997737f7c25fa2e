"""``bench --endpoint URL1 --endpoint URL2``: one grid shared by several servers of one model.

Each URL becomes an ``EndpointCellBackend``, the executors' ``CellBackend`` for a server: it
probes its server once (``open``) and runs cells with the request and scoring code of
``longreach.bench.endpoint``, ``--parallel`` of them at once. The backends run on an
executor: ``ThreadExecutor`` (this process, the default) or ``RayExecutor`` (one Ray worker
per URL, which then sends the requests). Cells are keyed as with one URL, so a grid run on
two servers stores the rows one server stores, and a rerun skips them.

Before anything runs, the driver probes every URL and refuses, in one line naming the URL,
a server whose model card, method, context length or tokenizer (its ``/tokenize`` ids for a
probe text) differ from the first URL's: rows must not depend on which server computed them.

A server that fails mid-run (no answer within ``--timeout`` after the usual retries, or a
5xx reply) gets no more cells; the cells it held run on the others, up to a bound of
attempts per cell. An error of one cell that is not the server's (a 400 refusal other than
a too-long prompt, say) is stored with that cell, and the run goes on. Only the driver
writes the database.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from longreach.bench.endpoint import (
    Connection,
    EndpointBackend,
    EndpointConfig,
    EndpointUnavailable,
    connect,
)
from longreach.bench.executors import (
    BackendDown,
    CellFailure,
    ExecutorResult,
    GridExecutor,
    ModelFacts,
    Outcome,
    failure_cell,
    one_line,
)
from longreach.bench.grid import BenchConfig
from longreach.bench.plan import PlannedCell, build_plan, library_versions, load_tasks
from longreach.bench.runner import ProgressEvent, ProgressFn
from longreach.bench.store import ResultStore
from longreach.errors import LongreachError

log = logging.getLogger(__name__)


class EndpointCellBackend:
    """The cells of one server: a ``CellBackend`` that holds a probed client once opened.

    Picklable before ``open`` (a Ray worker probes its server itself). Thread-safe:
    ``concurrency`` (``--parallel``) cells run at once, in threads of the executor or, for a
    list of cells, of ``run``.
    """

    def __init__(self, config: BenchConfig, endpoint: EndpointConfig) -> None:
        self.config = config
        self.endpoint = endpoint
        self.concurrency = endpoint.parallel
        self.label = endpoint.url
        self._cells: EndpointBackend | None = None
        self._facts: ModelFacts | None = None
        self._down: str | None = None  # why the server is out of service

    _OPENED = ("_cells", "_facts", "_down")

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._OPENED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cells = self._facts = self._down = None

    def open(self) -> ModelFacts:
        if self._facts is not None:
            return self._facts
        conn = connect(self.config, self.endpoint, load_tasks(self.config))
        self._cells = conn.backend(self.config, self.endpoint.served_model)
        self._facts = ModelFacts(
            self.endpoint.served_model, conn.fingerprint, conn.facts.trained_length
        )
        return self._facts

    def preflight(self, cells: Sequence[PlannedCell]) -> None:
        from longreach.bench import preflight

        self.open()
        assert self._cells is not None
        preflight.check_samples(self._cells.fmt, list(cells))

    def run(self, cells: Sequence[PlannedCell]) -> list[Outcome | BackendDown]:
        """Each cell finished, failed, or given back (``BackendDown``) once the server failed."""
        self.open()
        if self.concurrency == 1 or len(cells) <= 1:
            return [self._one(cell) for cell in cells]
        with ThreadPoolExecutor(min(self.concurrency, len(cells))) as pool:
            return list(pool.map(self._one, cells))

    def _one(self, planned: PlannedCell) -> Outcome | BackendDown:
        if self._down is not None:
            return BackendDown(planned.key, self._down)
        assert self._cells is not None
        try:
            return self._cells(planned)
        except EndpointUnavailable as exc:
            self._down = one_line(exc).rstrip(".")  # quoted inside other sentences
            log.warning("%s is out of service: %s", self.endpoint.url, self._down)
            return BackendDown(planned.key, self._down)
        except Exception as exc:  # noqa: BLE001 - recorded with the cell, the run goes on
            log.warning("%s failed: %s", planned.describe(), one_line(exc))
            return CellFailure(planned.key, one_line(exc))


def check_same_model(first: Connection, other: Connection) -> None:
    """One line naming ``other``'s URL when its rows could differ from ``first``'s."""
    a, b = first.facts, other.facts
    if a.method != b.method:
        differs = f"applies the method {b.method!r}, not {a.method!r}"
    elif a.max_model_len != b.max_model_len:
        differs = f"serves a context of {b.max_model_len} tokens, not {a.max_model_len}"
    elif a.trained_length != b.trained_length:
        differs = f"reports a trained length of {b.trained_length}, not {a.trained_length}"
    elif first.counting != other.counting:
        differs = f"counts tokens by {other.counting!r}, not {first.counting!r}"
    elif first.fingerprint != other.fingerprint:
        differs = "tokenizes a probe text differently"
    else:
        return
    raise LongreachError(
        f"--endpoint {other.client.url} does not serve the model of {first.client.url}: it "
        f"{differs}; every --endpoint must serve the same model."
    )


def run_endpoints_bench(
    config: BenchConfig,
    endpoints: Sequence[EndpointConfig],
    *,
    executor: GridExecutor | None = None,
    progress: ProgressFn | None = None,
) -> ExecutorResult:
    """Run every cell of ``config`` the database lacks on the servers at ``endpoints``.

    ``executor`` defaults to a ``ThreadExecutor``; the result counts cells that failed for
    good (stored with their error) in ``failed``.
    """
    from longreach.bench.thread_executor import ThreadExecutor

    started = time.perf_counter()
    config.validate()
    if not endpoints:
        raise LongreachError("give at least one --endpoint URL.")
    for endpoint in endpoints:
        endpoint.validate()
    served = endpoints[0].served_model
    if any(e.served_model != served for e in endpoints):
        raise LongreachError("every --endpoint must serve the same --served-model name.")
    urls = [e.url.rstrip("/") for e in endpoints]
    if len(set(urls)) < len(urls):
        again = next(u for u in urls if urls.count(u) > 1)
        raise LongreachError(f"--endpoint {again} is given twice; give each server once.")
    if [m for m in config.methods if m != "vanilla"]:
        raise LongreachError(
            "--method does not apply with --endpoint: the server applies its own method "
            "(start it with `longreach serve --method ...`)."
        )
    tasks = load_tasks(config)
    connections = [connect(config, e, tasks) for e in endpoints]
    first = connections[0]
    for other in connections[1:]:
        check_same_model(first, other)
    facts = ModelFacts(served, first.fingerprint, first.facts.trained_length)
    executor = executor if executor is not None else ThreadExecutor()
    store = ResultStore(config.db)
    try:
        plan = build_plan(config, [first.facts.method], tasks, first.fingerprint)
        done_keys = store.done_keys()
        todo = [c for c in plan if c.key not in done_keys]
        skipped = len(plan) - len(todo)
        emit = progress or (lambda event: None)
        emit(ProgressEvent("plan", len(plan), skipped, skipped))
        record = dict(
            config.to_dict(),
            methods=[first.facts.method],
            endpoint=first.client.url,
            endpoints=[c.client.url for c in connections],
            served_model=served,
            counting=first.counting,
            parallel=endpoints[0].parallel,
        )
        run_id = store.start_run(served, first.fingerprint, record, library_versions())
        counts = {"computed": 0, "failed": 0}
        stored: set[str] = set()

        def on_start(planned: PlannedCell, worker: str) -> None:
            description = f"{planned.describe()} ({worker})"
            emit(ProgressEvent("start", len(plan), skipped + len(stored), skipped, description))

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
                        f"a worker returned the cell {cell.key} for {planned.key}: its server "
                        "changed its model during the run."
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
            backends = [EndpointCellBackend(config, e) for e in endpoints]
            started_facts = executor.start(backends)
            for conn, got in zip(connections, started_facts, strict=True):
                if got.fingerprint != first.fingerprint:
                    raise LongreachError(
                        f"--endpoint {conn.client.url} answered differently from a worker than "
                        "from this process (another tokenizer or model); check the server."
                    )
            executor.preflight(first.fingerprint, todo)
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
            model=served,
            model_fingerprint=first.fingerprint,
            trained_length=first.facts.trained_length,
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
