"""One model worker thread behind a bounded queue.

The model runs one request at a time (a CPU torch model gains nothing from interleaving
requests, and the engine's cache state is not shared between them). At most ``max_queue``
requests wait behind the running one; a request beyond that is refused at once (the server
answers 503 with ``Retry-After``) instead of waiting without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The bounded queue holds ``max_queue`` waiting requests already."""


class Worker:
    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._thread = threading.Thread(target=self._loop, name="longreach-model", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._running

    def submit(self, job: Callable[[], Any]) -> Future:
        """Queue ``job``; raises QueueFull when ``max_queue`` requests are already waiting."""
        future: Future = Future()
        with self._lock:
            if self._waiting + self._running > self.max_queue:
                raise QueueFull
            self._waiting += 1
        self._jobs.put((job, future))
        return future

    def _loop(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, future = item
            with self._lock:
                self._waiting -= 1
                self._running += 1
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(job())
                    except BaseException as exc:  # noqa: BLE001 - handed to the request
                        future.set_exception(exc)
            finally:
                with self._lock:
                    self._running -= 1

    def close(self) -> None:
        self._jobs.put(None)
