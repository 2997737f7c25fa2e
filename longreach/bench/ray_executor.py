"""A bench grid on a Ray cluster: one actor per worker, each holding one loaded model.

``RayExecutor`` starts a local Ray cluster, or joins one at ``address``. Each worker is an
actor that opens its backend once (loads the model) and keeps it. Cells go only to workers
whose model has the cell's fingerprint, in short runs of consecutive cells (so consecutive
cells still share their common prefix), shorter as the queue drains so that workers finish
together. Workers return rows; the driver writes them.

Faults: a worker that dies (its process killed, its node lost) has the cells it held put
back at the head of the queue and is replaced by a fresh one. Those cells are then sent one
at a time, so a cell that kills its worker is found alone: once a cell has been in flight on
``max_attempts`` dead workers it is recorded as failed, with that error, and the run goes
on. An exception inside a cell is recorded at once (recomputing would raise it again).
A worker whose backend answers ``BackendDown`` (its endpoint stopped answering) is stopped and
not replaced; the cells it gave back go to the other workers of that model, under the same
bound of attempts.

Ray is an optional extra: ``pip install 'longreach[ray]'``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from longreach.bench.executors import (
    BackendDown,
    CellBackend,
    CellFailure,
    ModelFacts,
    Outcome,
    one_line,
)
from longreach.bench.plan import PlannedCell
from longreach.errors import LongreachError

log = logging.getLogger(__name__)

RAY_MISSING = (
    "--executor ray needs Ray, which is not installed: pip install 'longreach[ray]' "
    "(or run without --executor ray)."
)


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error that names the extra."""
    try:
        import ray
    except ImportError:
        raise LongreachError(RAY_MISSING) from None
    return ray


class _Worker:
    """The actor: a backend opened once in its own process."""

    def __init__(self, backend: CellBackend) -> None:
        self.backend = backend

    def open(self) -> tuple[ModelFacts, str, int]:
        return self.backend.open(), socket.gethostname(), os.getpid()

    def preflight(self, cells: Sequence[PlannedCell]) -> None:
        self.backend.preflight(cells)

    def run(self, cells: Sequence[PlannedCell]) -> list[Outcome]:
        return self.backend.run(cells)


@dataclass(eq=False)
class _Slot:
    number: int
    backend: int  # index into the backends given to start()
    actor: Any
    facts: ModelFacts | None = None
    fingerprint: str | None = None
    where: str = ""
    pid: int | None = None
    alive: bool = True
    cells: list[PlannedCell] = field(default_factory=list)  # in flight


class RayExecutor:
    """Runs cells on Ray actors; see the module docstring for scheduling and faults.

    Args:
        address: an existing cluster (``ray start --head`` prints it); None starts a local one.
        workers: number of actors; default: as many as the cluster's CPUs (or GPUs) hold.
        gpus_per_worker: GPUs each actor reserves (fractions share a GPU); 0 runs on CPUs.
        cpus_per_worker: CPUs each actor reserves; it is also each worker's torch threads.
        max_attempts: workers a cell may see die under it before it is recorded as failed.
        max_chunk: most consecutive cells sent in one call.
    """

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        gpus_per_worker: float = 0.0,
        cpus_per_worker: int = 1,
        max_attempts: int = 3,
        max_chunk: int = 4,
    ) -> None:
        if workers is not None and workers < 1:
            raise LongreachError(f"--workers {workers} must be at least 1.")
        if gpus_per_worker < 0:
            raise LongreachError(f"--gpus-per-worker {gpus_per_worker:g} must be 0 or more.")
        if cpus_per_worker < 1:
            raise LongreachError(f"{cpus_per_worker} CPUs per worker: give at least 1.")
        if max_attempts < 1 or max_chunk < 1:
            raise LongreachError("max_attempts and max_chunk must be at least 1.")
        self.address = address
        self.workers = workers
        self.gpus_per_worker = float(gpus_per_worker)
        self.cpus_per_worker = int(cpus_per_worker)
        self.max_attempts = max_attempts
        self.max_chunk = max_chunk
        self.device: str | None = "cuda" if self.gpus_per_worker > 0 else "cpu"
        self.threads = self.cpus_per_worker
        self.deaths = 0  # worker deaths seen (tests and logs)
        self.lost = 0  # workers stopped because their backend went out of service
        self._ray: Any = None
        self._owns_ray = False
        self._backends: list[CellBackend] = []
        self._slots: list[_Slot] = []
        self._known: dict[int, ModelFacts] = {}  # backend index -> facts of its first worker
        self._loading: dict[Any, _Slot] = {}  # ObjectRef of open() -> its slot
        self._start_failures: dict[int, int] = {}
        self._actor_class: Any = None

    # ---- cluster

    def _connect(self) -> Any:
        ray = import_ray()
        if not ray.is_initialized():
            try:
                ray.init(
                    address=self.address,
                    # a local cluster listens on the loopback address only
                    **({} if self.address else {"_node_ip_address": "127.0.0.1"}),
                    include_dashboard=False,
                    log_to_driver=False,  # workers' output would break the progress bar
                    logging_level=logging.ERROR,
                )
            except Exception as exc:  # noqa: BLE001 - Ray raises several types here
                where = (
                    f"join the Ray cluster at {self.address}"
                    if self.address
                    else "start a local Ray cluster"
                )
                hint = (
                    "check the address that `ray start --head` printed"
                    if self.address
                    else "check `ray status`"
                )
                raise LongreachError(f"cannot {where} ({one_line(exc)}); {hint}.") from None
            self._owns_ray = True
        self._ray = ray
        return ray

    def _size(self, n_backends: int) -> int:
        resources = self._ray.cluster_resources()
        if self.gpus_per_worker > 0:
            kind, have, each = "GPUs", float(resources.get("GPU", 0)), self.gpus_per_worker
        else:
            kind, have, each = "CPUs", float(resources.get("CPU", 0)), float(self.cpus_per_worker)
        fits = int(have // each + 1e-9)
        n = self.workers if self.workers is not None else fits
        if fits < 1 or n > fits:
            message = (
                f"{n or 1} workers × {each:g} {kind[:-1]} do not fit the Ray cluster's "
                f"{have:g} {kind}; ask for fewer --workers"
                + (" or a smaller --gpus-per-worker." if kind == "GPUs" else ".")
            )
            if self.address is None or fits < 1:
                raise LongreachError(message)
            log.warning("%s Waiting for the cluster to grow.", message)
        if n < n_backends:
            raise LongreachError(
                f"{n} workers cannot serve {n_backends} backends (one model or endpoint URL "
                "each needs a worker of its own); give --workers at least that many."
            )
        return n

    def _new_slot(self, number: int, backend: int) -> _Slot:
        actor = self._actor_class.options(
            num_cpus=self.cpus_per_worker,
            num_gpus=self.gpus_per_worker,
            max_restarts=0,
            max_task_retries=0,
        ).remote(self._backends[backend])
        return _Slot(number, backend, actor)

    def start(self, backends: Sequence[CellBackend]) -> list[ModelFacts]:
        """Start the workers, split evenly between ``backends``; return each backend's facts.

        It returns as soon as one worker per backend has loaded: the others go on loading
        and join in ``map`` (a rerun with nothing to compute waits for one load, not all).
        """
        ray = self._connect()
        self._backends = list(backends)
        self._known, self._start_failures = {}, {}
        self._actor_class = ray.remote(_Worker)
        n = self._size(len(self._backends))
        self._slots = [self._new_slot(i, i % len(self._backends)) for i in range(n)]
        self._loading = {slot.actor.open.remote(): slot for slot in self._slots}
        while len(self._known) < len(self._backends):
            if not self._loading:
                raise LongreachError("no Ray worker could load the model; see `ray status`.")
            ready, _ = ray.wait(list(self._loading), num_returns=1)
            slot = self._loading.pop(ready[0])
            replacement = self._opened(slot, ready[0])
            if replacement is not None:
                self._loading[replacement.actor.open.remote()] = replacement
        return [self._known[i] for i in range(len(self._backends))]

    def _opened(self, slot: _Slot, ref: Any) -> _Slot | None:
        """Record a worker's start; a replacement slot when it died while loading."""
        ray = self._ray
        try:
            facts, host, pid = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            return self._lost_at_start(slot, exc)
        except ray.exceptions.RayTaskError as exc:
            raise _unwrap(exc) from None
        slot.facts, slot.fingerprint = facts, facts.fingerprint
        slot.where, slot.pid = f"{host}:{pid}", pid
        known = self._known.setdefault(slot.backend, facts)
        if facts != known:
            raise _mismatch(known, facts, slot.where)
        return None

    def _lost_at_start(self, slot: _Slot, exc: BaseException) -> _Slot | None:
        self._bury(slot)
        failures = self._start_failures.get(slot.backend, 0) + 1
        self._start_failures[slot.backend] = failures
        log.warning("a Ray worker died while loading its model: %s", one_line(exc))
        if failures >= self.max_attempts:
            if any(s.alive and s.backend == slot.backend for s in self._slots):
                return None  # the others carry on
            raise LongreachError(
                f"Ray workers died {failures} times while loading the model ({one_line(exc)}); "
                "check the memory each worker has, or ask for fewer --workers."
            )
        replacement = self._new_slot(len(self._slots), slot.backend)
        self._slots.append(replacement)
        return replacement

    def _bury(self, slot: _Slot) -> None:
        slot.alive = False
        try:
            self._ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (all on this host for a local cluster)."""
        return [s.pid for s in self._slots if s.alive and s.pid is not None]

    # ---- work

    def preflight(self, fingerprint: str, cells: Sequence[PlannedCell]) -> None:
        """Check the grid's samples on one worker (another one if that worker dies)."""
        ray = self._ray
        for slot in [s for s in self._slots if s.alive and s.fingerprint == fingerprint]:
            try:
                ray.get(slot.actor.preflight.remote(list(cells)))
                return
            except ray.exceptions.RayActorError as exc:
                self.deaths += 1
                self._bury(slot)
                log.warning("Ray worker %s died in the preflight: %s", slot.where, one_line(exc))
            except ray.exceptions.RayTaskError as exc:
                raise _unwrap(exc) from None
        raise LongreachError("every Ray worker died before the first cell; run the command again.")

    def map(
        self,
        cells: Sequence[PlannedCell],
        on_start: Callable[[PlannedCell, str], None],
        on_outcome: Callable[[PlannedCell, Outcome], None],
    ) -> None:
        ray = self._ray
        queues: dict[str, deque[PlannedCell]] = {}
        for cell in cells:
            queues.setdefault(cell.fingerprint, deque()).append(cell)
        unknown = set(queues) - {s.fingerprint for s in self._slots if s.alive}
        if unknown:
            raise LongreachError(
                f"no worker holds the model with fingerprint {sorted(unknown)[0]}."
            )
        deaths: dict[str, int] = {}  # cell key -> workers that died (or lost their server) under it
        last_down = ""
        running: dict[Any, _Slot] = {}  # ObjectRef of run() -> its slot
        starting, self._loading = self._loading, {}  # ObjectRef of open() -> its slot

        def take(slot: _Slot) -> list[PlannedCell]:
            queue = queues.get(slot.fingerprint or "")
            if not queue:
                return []
            if queue[0].key in deaths:
                return [queue.popleft()]  # a suspect runs alone
            # workers still loading count: they join soon, and a first chunk sized for one
            # worker would leave them idle at the end
            holders = sum(1 for s in self._slots if s.alive and s.backend == slot.backend)
            size = max(1, min(self.max_chunk, len(queue) // (2 * max(1, holders))))
            chunk = [queue.popleft()]
            while (
                queue
                and len(chunk) < size
                and queue[0].method == chunk[0].method
                and queue[0].key not in deaths
            ):
                chunk.append(queue.popleft())
            return chunk

        def dispatch() -> None:
            busy = set(running.values()) | set(starting.values())
            for slot in self._slots:
                if slot.alive and slot.pid is not None and slot not in busy:
                    chunk = take(slot)
                    if chunk:
                        slot.cells = chunk
                        on_start(chunk[0], f"worker {slot.number}")
                        running[slot.actor.run.remote(chunk)] = slot

        def lost(slot: _Slot, exc: BaseException) -> None:
            self.deaths += 1
            self._bury(slot)
            queue = queues[slot.fingerprint or ""]
            log.warning(
                "Ray worker %d (%s) died with %d cells in flight: %s",
                slot.number, slot.where, len(slot.cells), one_line(exc),
            )  # fmt: skip
            for cell in reversed(slot.cells):
                deaths[cell.key] = deaths.get(cell.key, 0) + 1
                if deaths[cell.key] >= self.max_attempts:
                    error = (
                        f"its Ray worker died {deaths[cell.key]} times while computing it "
                        f"(last: {one_line(exc)})"
                    )
                    on_outcome(cell, CellFailure(cell.key, error, deaths[cell.key]))
                else:
                    queue.appendleft(cell)
            slot.cells = []
            replacement = self._new_slot(len(self._slots), slot.backend)
            self._slots.append(replacement)
            starting[replacement.actor.open.remote()] = replacement

        def given_back(slot: _Slot, cells: list[tuple[PlannedCell, BackendDown]]) -> None:
            nonlocal last_down
            self.lost += 1
            self._bury(slot)
            last_down = cells[-1][1].error
            log.warning(
                "Ray worker %d (%s) lost its server: %s", slot.number, slot.where, last_down
            )
            for cell, down in reversed(cells):
                deaths[cell.key] = deaths.get(cell.key, 0) + 1
                if deaths[cell.key] >= self.max_attempts:
                    error = f"{deaths[cell.key]} workers failed under it (last: {down.error})"
                    on_outcome(cell, CellFailure(cell.key, error, deaths[cell.key]))
                else:
                    queues[cell.fingerprint].appendleft(cell)

        dispatch()
        while running or starting:
            ready, _ = ray.wait([*running, *starting], num_returns=1)
            ref = ready[0]
            if ref in starting:
                slot = starting.pop(ref)
                again = self._opened(slot, ref)
                if again is not None:
                    starting[again.actor.open.remote()] = again
            else:
                slot = running.pop(ref)
                try:
                    outcomes = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    lost(slot, exc)
                except ray.exceptions.RayTaskError as exc:
                    raise _unwrap(exc) from None
                else:
                    chunk, slot.cells = slot.cells, []
                    if len(outcomes) != len(chunk):
                        raise LongreachError(
                            f"a Ray worker returned {len(outcomes)} results for {len(chunk)} cells."
                        )
                    down = []
                    for planned, outcome in zip(chunk, outcomes, strict=True):
                        if isinstance(outcome, BackendDown):
                            down.append((planned, outcome))
                        else:
                            on_outcome(planned, outcome)
                    if down:
                        given_back(slot, down)
            dispatch()
        left = sum(len(q) for q in queues.values())
        if left:
            why = (
                f"every Ray worker died or lost its server (last: {last_down})"
                if last_down
                else "every Ray worker died and none could be restarted"
            )
            raise LongreachError(
                f"{why}; {left} cells were not computed; finished cells are saved: run the "
                "command again."
            )

    def close(self) -> None:
        """Stop the workers, and the cluster when this executor started it."""
        if self._ray is None:
            return
        for slot in self._slots:
            if slot.alive:
                self._bury(slot)
        self._slots = []
        if self._owns_ray:
            self._ray.shutdown()
            self._owns_ray = False


def _unwrap(exc: Any) -> LongreachError:
    """A worker's exception as the driver's one-line error."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, LongreachError):
        return LongreachError(str(cause))
    return LongreachError(
        f"a Ray worker failed: {one_line(cause or exc)}; finished cells are saved."
    )


def _mismatch(first: ModelFacts, other: ModelFacts, where: str) -> LongreachError:
    return LongreachError(
        f"the Ray worker on {where} loaded a different model ({other.name}, fingerprint "
        f"{other.fingerprint}) than the first ({first.name}, {first.fingerprint}): give every "
        "node the same model files, and pass --dtype so that every node uses the same type."
    )
