"""The benchmark harness: grid -> runner -> SQLite store -> report.

``run_bench(BenchConfig(...))`` fills a results database; ``ResultStore(path)`` reads it;
``write_report(db, out_dir)`` renders the report.
"""

from __future__ import annotations

from longreach.bench.grid import BenchConfig, parse_depths, parse_lengths
from longreach.bench.report import Report, write_report
from longreach.bench.runner import BenchResult, ProgressEvent, run_bench
from longreach.bench.store import Cell, ResultStore

__all__ = [
    "BenchConfig",
    "BenchResult",
    "Cell",
    "ProgressEvent",
    "Report",
    "ResultStore",
    "parse_depths",
    "parse_lengths",
    "run_bench",
    "write_report",
]
