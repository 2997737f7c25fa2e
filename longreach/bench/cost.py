"""Cost measurement: wall-clock time and peak memory of one cell.

Peak memory is the process's peak resident set size on CPU (Linux: ``VmHWM`` in
``/proc/self/status``, reset before each cell by writing ``5`` to ``/proc/self/clear_refs``;
elsewhere the process-lifetime ``ru_maxrss``, which cannot be reset, is recorded and labelled
as such) and ``torch.cuda.max_memory_allocated`` on CUDA (reset per cell). RSS includes the
weights and the Python process, so compare methods at one length, not absolute values
across machines.
"""

from __future__ import annotations

import resource
import sys
import time

import torch

RSS_PEAK = "rss_peak"
RU_MAXRSS = "ru_maxrss"
CUDA_MAX_ALLOCATED = "cuda_max_allocated"


def _read_hwm() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """``reset()`` before the work, ``peak()`` after it; ``kind`` says what was measured."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.kind = CUDA_MAX_ALLOCATED
        elif _read_hwm() is not None and _reset_hwm():
            self.kind = RSS_PEAK
        else:
            self.kind = RU_MAXRSS

    def reset(self) -> None:
        if self.kind == CUDA_MAX_ALLOCATED:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == RSS_PEAK:
            _reset_hwm()

    def peak(self) -> int:
        if self.kind == CUDA_MAX_ALLOCATED:
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == RSS_PEAK:
            value = _read_hwm()
            if value is not None:
                return value
        # ru_maxrss is KiB on Linux, bytes on macOS.
        scale = 1 if sys.platform == "darwin" else 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


class Timer:
    """A stopwatch that waits for queued CUDA work before reading the clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.device = device

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
