"""The bench's terminal output at 80 columns: every method stays identifiable, every count and
ETA stays visible, and a column that does not apply says "-"."""

from __future__ import annotations

import io
import re

from rich.console import Console
from test_bench_store import _cell

from longreach.bench.render import bench_with_progress, summary_table
from longreach.bench.runner import BenchResult, ProgressEvent
from longreach.bench.store import ResultStore

METHODS = [
    "self-extend:group=4,window=128",
    "self-extend:group=8,window=128",
    "yarn:factor=4,original_max=256",
    "lm-infinite",
]


def _result(tmp_path) -> BenchResult:
    db = tmp_path / "runs.db"
    keys = []
    with ResultStore(db) as store:
        run = store.start_run("lab", "fp", {}, {})
        for method in METHODS:
            for length in (256, 512, 1024, 2048):
                for task, metric, score in (
                    ("passkey:haystack=synthetic", "accuracy", 1.0 if length <= 512 else 0.0),
                    ("perplexity:haystack=pg,last=64", "perplexity", 60.0),
                ):
                    cell = _cell(
                        method=method, task=task, metric=metric, score=score, length=length,
                        depth=None if metric == "perplexity" else 0.5,
                    )  # fmt: skip
                    store.add(cell, run)
                    keys.append(cell.key)
    return BenchResult(db, 1, "lab", "fp", 256, len(keys), 0, len(keys), 1.0, frozenset(keys))


def _render(renderable, width: int = 80) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None, force_terminal=True)
    console.print(renderable)
    return console.file.getvalue()


def _method_cells(text: str) -> list[str]:
    """The method column's text per table row, continuation lines joined."""
    rows: list[str] = []
    for line in text.splitlines():
        parts = line.split("│")
        if len(parts) < 4 or parts[1].strip() == "method":
            continue
        method, task = parts[1].strip(), parts[2].strip()
        if task:
            rows.append(method)
        elif rows and method:
            rows[-1] += method
    return rows


def test_summary_at_80_columns_keeps_every_method_whole(tmp_path):
    text = _render(summary_table(_result(tmp_path)))
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text, text
    labels = _method_cells(text)
    assert labels == [m for m in METHODS for _ in range(2)], text
    for line in text.splitlines():
        if "perplexity" in line and "│" in line:
            assert line.rstrip("│ ").endswith("-"), f"effective column of a perplexity row: {line}"
    assert re.search(r"│ +512 │", text), "the effective length of the passkey rows"
    assert "n=" not in text and "accuracy over 1 sample per cell" in text, text


def test_progress_at_80_columns_keeps_count_and_eta(tmp_path, monkeypatch):
    import longreach.bench.render as render

    def fake_run(config, progress=None, **kwargs):
        progress(ProgressEvent("plan", 40, 0, 0))
        long = "self-extend:group=4,window=128 · passkey · 256 · depth 0.5 · #0"
        progress(ProgressEvent("start", 40, 17, 0, long))
        return "done"

    monkeypatch.setattr(render, "run_bench", fake_run)
    out = io.StringIO()
    console = Console(width=80, file=out, color_system=None, force_terminal=True)
    assert bench_with_progress(object.__new__(render.BenchConfig), console) == "done"
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue()).replace("\r", "\n")
    last = [ln for ln in plain.splitlines() if "cells" in ln][-1]
    assert "17/40 cells" in last and re.search(r"ETA -?[\d:-]+", last), last
    assert len(last.rstrip()) <= 80
