"""The report: PNG figures and one self-contained ``index.html`` (images inlined as data URIs).

For each model in the database:

- accuracy vs length per task, one line per method, the model's trained length marked and
  the effective-length threshold drawn;
- per task with depths, a depth × length heatmap per method (Kamradt's NIAH picture);
- the effective context length of each method on each task (rule in ``summary.py``);
- prefill time and peak memory vs length per method (cells that reused no cached prefix);
- perplexity next to retrieval accuracy for each method, on twin axes, because a method can
  keep perplexity flat while retrieval collapses;
- speed against score for each method run over several values of one parameter (a sweep:
  ``hip:k=8``, ``hip:k=16``, ...), a curve per task and length beside the other methods'
  points;
- a sortable, filterable table of every cell.

This module shapes the data; ``figures.py`` draws the figures and
``templates/report.html.j2`` (Jinja2, autoescaped) lays out the page.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longreach.bench import figures
from longreach.bench.grid import format_length
from longreach.bench.store import Cell, ResultStore
from longreach.bench.summary import (
    DEFAULT_THRESHOLD,
    Series,
    breakdown,
    check_counted,
    check_threshold,
    depth_grid,
    series_of,
    summarize,
    sweeps,
    task_title,
)
from longreach.errors import LongreachError


@dataclass
class Report:
    index: Path
    images: list[Path]
    cells: int


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60] or "x"


class _Writer:
    """Saves each figure as a PNG in the report folder and keeps its data URI for the page."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.images: list[Path] = []

    def save(self, fig, name: str, alt: str) -> dict[str, str]:
        path = self.out / f"{name}.png"
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        data = buffer.getvalue()
        path.write_bytes(data)
        self.images.append(path)
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        return {"name": path.name, "uri": uri, "alt": alt}


def write_report(
    db: str | Path, out: str | Path, threshold: float = DEFAULT_THRESHOLD, axis: str = "tokens"
) -> Report:
    """Render the report of every cell in ``db`` into the folder ``out``.

    ``axis``: the figures' length axis, ``tokens`` (the requested lengths), ``characters`` or
    ``words`` (each point at the mean count of its cells' contexts).
    """
    check_threshold(threshold)
    with ResultStore(db, create=False) as store:
        cells = store.cells(include_prompt=False)
        runs = store.runs()
    if not cells:
        raise LongreachError(
            f"{db} holds no finished cells yet; run `longreach bench --db {db}` first."
        )
    check_counted(cells, axis, str(db))
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LongreachError(
            f"cannot create the report folder {out} ({exc.strerror or exc})."
        ) from None
    writer = _Writer(out)
    by_model: dict[tuple[str, str], list[Cell]] = defaultdict(list)
    for cell in cells:
        by_model[(cell.model, cell.model_fingerprint)].append(cell)
    models = [
        _model_context(writer, model, fp, model_cells, threshold, axis)
        for (model, fp), model_cells in by_model.items()
    ]
    index = out / "index.html"
    index.write_text(_page(models, cells, runs, Path(db), threshold, axis), encoding="utf-8")
    return Report(index=index, images=writer.images, cells=len(cells))


# --------------------------------------------------------------------------- one model


def _model_context(
    writer: _Writer, model: str, fp: str, cells: list[Cell], threshold: float, axis: str
) -> dict[str, Any]:
    slug = _slug(f"{Path(model).name}-{fp[:6]}")
    trained = next((c.trained_length for c in cells if c.trained_length), None)
    series = list(dict.fromkeys(series_of(c) for c in cells))
    show_format = len({s.prompt_format for s in series}) > 1
    colors = figures.colors(series)
    rows = summarize(cells, threshold)
    lengths = sorted({c.length for c in cells})
    acc_tasks = list(dict.fromkeys(c.task for c in cells if c.metric == "accuracy"))
    ppl_tasks = list(dict.fromkeys(c.task for c in cells if c.metric == "perplexity"))

    accuracy = [
        writer.save(
            figures.accuracy_figure(
                rows, task, colors, show_format, lengths, trained, threshold, axis, cells,
                title=task_title(task, cells),
            ),
            f"{slug}-accuracy-{_slug(task)}",
            f"{task}: accuracy vs length" + ("" if axis == "tokens" else f" ({axis})"),
        )
        for task in acc_tasks
    ]  # fmt: skip
    by_property = breakdown(cells)
    properties = [
        writer.save(
            figures.breakdown_figure(by_property, task, key, series, colors, show_format),
            f"{slug}-{_slug(task)}-by-{_slug(key)}",
            f"{task}: accuracy vs number of {key}, a line per method and length",
        )
        for task, key in dict.fromkeys((r.task, r.key) for r in by_property)
    ]
    grids = depth_grid(cells)
    heatmaps = []
    for task in acc_tasks:
        task_series = [s for s in series if (s, task) in grids]
        if task_series:
            fig = figures.heatmaps(task, task_series, grids, show_format)
            heatmaps.append(
                writer.save(
                    fig, f"{slug}-heatmap-{_slug(task)}", f"{task}: score by depth and length"
                )
            )
    cost = figures.cost_figure(cells, series, colors, show_format, lengths, trained, axis)
    perplexity = None
    if ppl_tasks:
        fig = figures.ppl_vs_accuracy(cells, series, show_format, lengths, trained, threshold, axis)
        perplexity = writer.save(
            fig,
            f"{slug}-perplexity-vs-retrieval",
            "perplexity (right axis) and retrieval accuracy (left axis) per method",
        )
    by_task: dict[str, list] = defaultdict(list)
    for sweep in sweeps(cells):
        by_task[sweep.task].append(sweep)
    curves = [
        writer.save(
            figures.sweep_figure(task, task_sweeps, cells, show_format),
            f"{slug}-speed-vs-score-{_slug(task)}",
            f"{task}: score against prefill seconds as each swept parameter changes",
        )
        for task, task_sweeps in by_task.items()
    ]
    return {
        "slug": slug,
        "name": model,
        "sweeps": curves,
        "fingerprint": fp,
        "trained": trained if trained else "unknown",
        "effective": _effective(rows, acc_tasks, show_format, cells),
        "accuracy": accuracy,
        "breakdown": _breakdown_table(by_property, show_format),
        "breakdown_figures": properties,
        "heatmaps": heatmaps,
        "cost": None
        if cost is None
        else writer.save(cost, f"{slug}-cost", "prefill time and peak memory vs length"),
        "perplexity": perplexity,
    }


def _breakdown_table(rows, show_format: bool) -> dict[str, Any] | None:
    """Accuracy per (method, task, property value) and length, e.g. long-icl's labels."""
    if not rows:
        return None
    lengths = sorted({n for r in rows for n in r.by_length})
    return {
        "lengths": [format_length(n) for n in lengths],
        "rows": [
            {
                "label": r.series.label(show_format),
                "task": r.task,
                "value": f"{r.value} {r.key}",
                "cells": [
                    f"{r.by_length[n][0]:.2f} (n={r.by_length[n][1]})" if n in r.by_length else "–"
                    for n in lengths
                ],
            }
            for r in rows
        ],
    }


def _effective(rows, tasks: list[str], show_format: bool, all_cells) -> dict[str, Any] | None:
    """The effective-length table: a row per method, a cell per retrieval task."""
    if not tasks:
        return None
    series: list[Series] = list(dict.fromkeys(r.series for r in rows))
    lookup = {(r.series, r.task): r for r in rows}
    table = []
    for s in series:
        cells = []
        for t in tasks:
            row = lookup.get((s, t))
            if row is None:
                cells.append({"cls": "", "text": "–"})
            elif row.effective is None:
                cells.append({"cls": "bad", "text": f"< {format_length(min(row.by_length))}"})
            else:
                mark = "≥ " if row.effective == max(row.by_length) else ""
                cells.append({"cls": "good", "text": mark + format_length(row.effective)})
        table.append({"label": s.label(show_format), "cells": cells})
    return {"tasks": [task_title(t, all_cells) for t in tasks], "rows": table}


# --------------------------------------------------------------------------- page

_COLUMNS = [
    ("model", "model"), ("method", "method"), ("task", "task"), ("prompt", "prompt_format"),
    ("length", "length"), ("depth", "depth"), ("seed", "seed"), ("#", "idx"),
    ("tokens", "context_tokens"), ("chars", "context_chars"), ("words", "context_words"),
    ("score", "score"), ("expected", "expected"),
    ("output", "output"), ("prefill s", "prefill_s"), ("decode tok/s", "decode_tok_s"),
    ("peak MiB", "peak_mem_bytes"), ("shared", "shared_prefix_tokens"),
]  # fmt: skip


def _cell_value(cell: Cell, attr: str) -> tuple[str, str]:
    """(text shown, sort key) of one table cell."""
    value = getattr(cell, attr)
    if attr == "model":
        value = Path(str(value)).name
    if attr == "expected":
        text = ", ".join(value)
        return text, text
    if value is None:
        return "", ""
    if attr == "peak_mem_bytes":
        return f"{value / 2**20:.0f}", str(value)
    if isinstance(value, float):
        shown = f"{value:.3f}" if attr in ("prefill_s", "score") else f"{value:.3g}"
        if attr == "depth":
            shown = f"{value:g}"
        return shown, repr(value)
    return str(value), str(value)


_NUMERIC = {
    "length", "depth", "seed", "idx", "context_tokens", "context_chars", "context_words",
    "score", "prefill_s",
    "decode_tok_s", "peak_mem_bytes", "shared_prefix_tokens",
}  # fmt: skip


def _cell_row(cell: Cell) -> list[tuple[str, str]]:
    row = []
    for _, attr in _COLUMNS:
        shown, key = _cell_value(cell, attr)
        if attr == "output" and len(shown) > 120:
            shown = shown[:117] + "…"
        row.append((shown, key))
    return row


def _page(
    models: list[dict[str, Any]],
    cells: list[Cell],
    runs: list[dict],
    db: Path,
    threshold: float,
    axis: str,
) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    versions = runs[-1]["versions"] if runs else {}
    return env.get_template("report.html.j2").render(
        n_cells=len(cells),
        db=str(db),
        n_models=len({c.model_fingerprint for c in cells}),
        n_runs=len(runs),
        generated=time.strftime("%Y-%m-%d %H:%M"),
        versions=", ".join(f"{k} {v}" for k, v in versions.items() if k != "platform"),
        threshold=f"{threshold:.0%}",
        axis=axis,
        models=models,
        columns=[(label, "num" if attr in _NUMERIC else "text") for label, attr in _COLUMNS],
        rows=[_cell_row(cell) for cell in cells],
        config_json=json.dumps([r["config"] for r in runs[-5:]], indent=1, default=str),
    )
