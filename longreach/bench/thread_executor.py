"""A bench grid on threads of this process: the local executor for backends that wait on I/O.

``ThreadExecutor`` opens each backend here and drives it from ``concurrency`` threads, each
running one cell at a time: an endpoint backend (one per URL) then has that many requests in
flight. A backend with ``concurrency`` above 1 must be thread-safe; by default it is 1.

Faults: a backend that answers ``BackendDown`` (its server stopped answering) gets no more
cells, and the cells it gave back go to the other backends of the same model, first in the
queue. Once a cell has been given back by ``max_attempts`` backends it is recorded as failed,
with that error; when no backend of a model is left, the run stops with one line and the
cells not computed stay out of the database (a rerun computes them). Only the calling
thread hands outcomes on, so the driver alone writes the store.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from longreach.bench.executors import BackendDown, CellBackend, CellFailure, ModelFacts, Outcome
from longreach.bench.plan import PlannedCell
from longreach.errors import LongreachError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Slot:
    number: int
    backend: CellBackend
    facts: ModelFacts
    label: str
    concurrency: int
    busy: int = 0
    alive: bool = True


class ThreadExecutor:
    """Runs backends in this process; see the module docstring for scheduling and faults.

    Args:
        max_attempts: backends a cell may be given back by before it is recorded as failed.

    A backend's optional ``concurrency`` attribute (an int, default 1) is how many of its
    cells run at once, and its optional ``label`` names it in the progress bar.
    """

    device: str | None = None  # a model backend uses its model's default device
    threads: int = 0  # and torch's default threads

    def __init__(self, max_attempts: int = 3) -> None:
        if max_attempts < 1:
            raise LongreachError("max_attempts must be at least 1.")
        self.max_attempts = max_attempts
        self.lost = 0  # backends that went out of service (tests and logs)
        self._slots: list[_Slot] = []

    def start(self, backends: Sequence[CellBackend]) -> list[ModelFacts]:
        self._slots = []
        for number, backend in enumerate(backends):
            facts = backend.open()
            concurrency = int(getattr(backend, "concurrency", 1) or 1)
            label = str(getattr(backend, "label", "") or f"worker {number}")
            self._slots.append(_Slot(number, backend, facts, label, max(1, concurrency)))
        return [slot.facts for slot in self._slots]

    def preflight(self, fingerprint: str, cells: Sequence[PlannedCell]) -> None:
        for slot in self._slots:
            if slot.alive and slot.facts.fingerprint == fingerprint:
                slot.backend.preflight(cells)
                return
        raise LongreachError(f"no backend holds the model with fingerprint {fingerprint}.")

    def map(
        self,
        cells: Sequence[PlannedCell],
        on_start: Callable[[PlannedCell, str], None],
        on_outcome: Callable[[PlannedCell, Outcome], None],
    ) -> None:
        queues: dict[str, deque[PlannedCell]] = {}
        for cell in cells:
            queues.setdefault(cell.fingerprint, deque()).append(cell)
        unknown = set(queues) - {s.facts.fingerprint for s in self._slots if s.alive}
        if unknown:
            raise LongreachError(
                f"no backend holds the model with fingerprint {sorted(unknown)[0]}."
            )
        given_back: dict[str, int] = {}  # cell key -> backends that gave it back
        last_error = ""
        running: dict[Future, tuple[_Slot, PlannedCell]] = {}
        width = sum(s.concurrency for s in self._slots)
        pool = ThreadPoolExecutor(width, thread_name_prefix="longreach-cells")

        def dispatch() -> None:
            # round robin: one cell per backend per turn, until each is full or the queue empty
            while True:
                sent = False
                for slot in self._slots:
                    queue = queues.get(slot.facts.fingerprint)
                    if slot.alive and queue and slot.busy < slot.concurrency:
                        cell = queue.popleft()
                        slot.busy += 1
                        sent = True
                        on_start(cell, slot.label)
                        running[pool.submit(slot.backend.run, [cell])] = (slot, cell)
                if not sent:
                    return

        def gave_back(slot: _Slot, cell: PlannedCell, down: BackendDown) -> None:
            nonlocal last_error
            last_error = down.error
            if slot.alive:
                slot.alive = False
                self.lost += 1
                log.warning("%s is out of service: %s", slot.label, down.error)
            given_back[cell.key] = given_back.get(cell.key, 0) + 1
            if given_back[cell.key] >= self.max_attempts:
                error = f"{given_back[cell.key]} backends failed under it (last: {down.error})"
                on_outcome(cell, CellFailure(cell.key, error, given_back[cell.key]))
            else:
                queues[cell.fingerprint].appendleft(cell)

        try:
            dispatch()
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    slot, cell = running.pop(future)
                    slot.busy -= 1
                    outcomes = future.result()  # a backend that raises stops the run
                    if len(outcomes) != 1:
                        raise LongreachError(
                            f"a backend returned {len(outcomes)} results for 1 cell."
                        )
                    if isinstance(outcomes[0], BackendDown):
                        gave_back(slot, cell, outcomes[0])
                    else:
                        on_outcome(cell, outcomes[0])
                dispatch()
        finally:
            pool.shutdown(wait=not running, cancel_futures=True)
        left = sum(len(q) for q in queues.values())
        if left:
            raise LongreachError(
                f"every backend went out of service (last: {last_error}); {left} cells were "
                "not computed; finished cells are saved: run the command again."
            )

    def close(self) -> None:
        self._slots = []
