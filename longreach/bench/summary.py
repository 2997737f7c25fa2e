"""Aggregates over stored cells: mean scores per (method, task, length), effective length.

Effective context length (after RULER, Hsieh et al., 2024): the largest measured length L
such that the mean accuracy at L *and at every shorter measured length* is at least the
threshold. RULER uses a fixed score (Llama-2-7B's 4k average, 85.6%); the default here is
0.85. None means the method is below the threshold already at the shortest length measured.

Over RULER's tasks (``ruler_suite``) the rule is RULER's own: the average over the tasks run,
per length, and the longest length whose average beats 85.6% (settable); with it RULER's
length-weighted averages wAvg (inc) and wAvg (dec).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from longreach.bench.store import Cell
from longreach.errors import LongreachError

DEFAULT_THRESHOLD = 0.85


def check_threshold(threshold: float) -> None:
    """An accuracy threshold is a fraction in (0, 1]; raise a one-line error otherwise."""
    if not 0 < threshold <= 1:
        raise LongreachError(
            f"threshold {threshold:g} must lie in (0, 1]: it is a fraction of correct answers, "
            "e.g. 0.85."
        )


@dataclass(frozen=True)
class Series:
    """One line of a plot: a method under one prompt format on one model."""

    model: str
    model_fingerprint: str
    method: str
    prompt_format: str

    def label(self, show_format: bool) -> str:
        return f"{self.method} ({self.prompt_format})" if show_format else self.method


def series_of(cell: Cell) -> Series:
    return Series(cell.model, cell.model_fingerprint, cell.method, cell.prompt_format)


def task_name(spec: str) -> str:
    """``"niah:haystack=pg"`` -> ``"niah"``; a file task keeps its file name."""
    if spec.startswith("file:"):
        return spec.split(":")[1]
    return spec.split(":", 1)[0]


def mean_scores(cells: Iterable[Cell]) -> dict[tuple[Series, str, int], tuple[float, int]]:
    """(series, task spec, length) -> (mean score, number of cells)."""
    groups: dict[tuple[Series, str, int], list[float]] = defaultdict(list)
    for cell in cells:
        if cell.score is not None:
            groups[(series_of(cell), cell.task, cell.length)].append(cell.score)
    return {k: (statistics.fmean(v), len(v)) for k, v in groups.items()}


def depth_grid(cells: Iterable[Cell]) -> dict[tuple[Series, str], dict[tuple[float, int], float]]:
    """(series, task) -> {(depth, length): mean score} for tasks with a depth."""
    groups: dict[tuple[Series, str], dict[tuple[float, int], list[float]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for cell in cells:
        if cell.depth is not None and cell.score is not None and cell.metric == "accuracy":
            groups[(series_of(cell), cell.task)][(cell.depth, cell.length)].append(cell.score)
    return {
        key: {dl: statistics.fmean(v) for dl, v in grid.items()} for key, grid in groups.items()
    }


def effective_length(
    by_length: dict[int, float], threshold: float = DEFAULT_THRESHOLD
) -> int | None:
    """Largest length whose score, and every shorter length's score, is >= ``threshold``."""
    best = None
    for length in sorted(by_length):
        if by_length[length] + 1e-12 < threshold:
            break
        best = length
    return best


@dataclass
class SummaryRow:
    series: Series
    task: str
    metric: str
    by_length: dict[int, tuple[float, int]]
    effective: int | None


NOT_APPLICABLE = "not_applicable"  # a cell's meta status: the method does not apply to the task


def summarize(cells: list[Cell], threshold: float = DEFAULT_THRESHOLD) -> list[SummaryRow]:
    """One row per (series, task): mean score at each length and the effective length."""
    metric_of = {cell.task: cell.metric for cell in cells}
    rows: dict[tuple[Series, str], dict[int, tuple[float, int]]] = defaultdict(dict)
    for (series, task, length), value in mean_scores(cells).items():
        rows[(series, task)][length] = value
    out = []
    for (series, task), by_length in rows.items():
        metric = metric_of[task]
        eff = (
            effective_length({k: v[0] for k, v in by_length.items()}, threshold)
            if metric == "accuracy"
            else None
        )
        out.append(SummaryRow(series, task, metric, dict(sorted(by_length.items())), eff))
    # Cells a method cannot compute (a reader on perplexity) get a row that says so.
    for cell in cells:
        key = (series_of(cell), cell.task)
        if key not in rows and (cell.meta or {}).get("status") == NOT_APPLICABLE:
            rows[key] = {}
            out.append(SummaryRow(key[0], cell.task, NOT_APPLICABLE, {}, None))
    order = {s: i for i, s in enumerate(dict.fromkeys(series_of(c) for c in cells))}
    tasks = {t: i for i, t in enumerate(dict.fromkeys(c.task for c in cells))}
    out.sort(key=lambda r: (r.series.model, order[r.series], tasks[r.task]))
    return out


def median(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


# ---- RULER's suite average

RULER_THRESHOLD = 0.856  # Llama-2-7B's 4k average over RULER's 13 tasks (Hsieh et al., 2024)


@dataclass
class SuiteRow:
    """A series' average over the RULER tasks it ran, at the lengths where all of them ran.

    ``effective``: the longest of those lengths whose average beats the threshold (RULER's
    effective length; unlike a single task's, a shorter length may fall below it).
    ``wavg_inc`` / ``wavg_dec``: RULER's averages over the lengths with weights 1..n growing
    (inc) or shrinking (dec) with the length.
    """

    series: Series
    tasks: list[str]
    by_length: dict[int, float]
    effective: int | None
    wavg_inc: float | None
    wavg_dec: float | None


def weighted_averages(by_length: dict[int, float]) -> tuple[float | None, float | None]:
    """RULER's wAvg (inc) and wAvg (dec): weights 1..n by length rank, and n..1."""
    scores = [by_length[n] for n in sorted(by_length)]
    if not scores:
        return None, None
    weights = range(1, len(scores) + 1)
    total = sum(weights)
    inc = sum(w * s for w, s in zip(weights, scores, strict=True)) / total
    dec = sum(w * s for w, s in zip(weights, reversed(scores), strict=True)) / total
    return inc, dec


def suite_effective_length(by_length: dict[int, float], threshold: float) -> int | None:
    """The longest length whose average is above ``threshold`` (None when none is)."""
    passed = [n for n, score in by_length.items() if score > threshold + 1e-12]
    return max(passed) if passed else None


def ruler_suite(rows: list[SummaryRow], threshold: float = RULER_THRESHOLD) -> list[SuiteRow]:
    """One suite row per series that ran RULER tasks (see ``SuiteRow``)."""
    from longreach.tasks.ruler import RULER_NAMES

    per_series: dict[Series, list[SummaryRow]] = defaultdict(list)
    for row in rows:
        if row.metric == "accuracy" and task_name(row.task) in RULER_NAMES:
            per_series[row.series].append(row)
    out = []
    for series, task_rows in per_series.items():
        common = set.intersection(*(set(r.by_length) for r in task_rows))
        by_length = {
            n: statistics.fmean(r.by_length[n][0] for r in task_rows) for n in sorted(common)
        }
        inc, dec = weighted_averages(by_length)
        out.append(
            SuiteRow(
                series,
                [task_name(r.task) for r in task_rows],
                by_length,
                suite_effective_length(by_length, threshold),
                inc,
                dec,
            )
        )
    return out


# ---- the x axis: tokens, characters or words

# Token counts differ between tokenizers (Needle Threading, Roberts et al., 2024): the report
# can place each length at the mean characters or words of its cells' contexts instead.
AXES = {"tokens": "context_tokens", "characters": "context_chars", "words": "context_words"}


def check_axis(axis: str) -> None:
    """``axis`` is one of AXES; raise a one-line error otherwise."""
    if axis not in AXES:
        raise LongreachError(
            f"x axis {axis!r} is not one of {', '.join(AXES)}; e.g. --x characters."
        )


def axis_position(cells: Iterable[Cell], length: int, axis: str) -> float | None:
    """Where a group of cells of one requested ``length`` sits on the ``axis``.

    tokens: the requested length itself (the grid's own value); characters or words: the mean
    count of the cells' contexts, or None when none of them recorded it (an older database).
    """
    if axis == "tokens":
        return float(length)
    counts = [getattr(c, AXES[axis]) for c in cells]
    kept = [n for n in counts if n is not None]
    return statistics.fmean(kept) if kept else None


def per_token(cells: Iterable[Cell], axis: str) -> float | None:
    """Characters (or words) per token over the cells that recorded both: the ratio that
    places a token length (the trained length) on a characters or words axis."""
    if axis == "tokens":
        return 1.0
    pairs = [(getattr(c, AXES[axis]), c.context_tokens) for c in cells]
    counted = [(n, t) for n, t in pairs if n is not None and t]
    if not counted:
        return None
    return sum(n for n, _ in counted) / sum(t for _, t in counted)


def check_counted(cells: list[Cell], axis: str, where: str) -> None:
    """An axis of characters or words needs cells that recorded them; one-line error if none."""
    check_axis(axis)
    if axis != "tokens" and all(getattr(c, AXES[axis]) is None for c in cells):
        raise LongreachError(
            f"{where} holds no {axis} counts (its cells were written before longreach counted "
            f"them); rerun the benchmark into a new file or use --x tokens."
        )


# ---- tasks also reported by a property of their samples (long-icl: the number of labels)


def reported_by(spec: str) -> str | None:
    """The sample property (a ``meta`` key) a task's results are also reported by, if any:
    its ``reported_by`` trait (long-icl: ``"labels"``)."""
    from longreach.tasks import TASKS

    if spec.startswith("file:"):
        return None
    task = TASKS.get(task_name(spec))
    return None if task is None else task.reported_by


def _value_text(key: str, values: Iterable[Any]) -> str:
    shown = sorted(set(values), key=lambda v: (str(type(v)), v))
    return f"{'/'.join(str(v) for v in shown)} {key}"


def task_title(spec: str, cells: Iterable[Cell]) -> str:
    """A task's name as tables show it: ``long-icl · 24 labels`` for a task reported by a
    property, else its name (``task_name``)."""
    key = reported_by(spec)
    name = task_name(spec)
    if key is None:
        return name
    values = [c.meta[key] for c in cells if c.task == spec and key in (c.meta or {})]
    return f"{name} · {_value_text(key, values)}" if values else name


@dataclass
class BreakdownRow:
    """Mean accuracy of a series on a task at one value of its property (``key``), by length."""

    series: Series
    task: str
    key: str
    value: Any
    by_length: dict[int, tuple[float, int]]


def breakdown(cells: Iterable[Cell]) -> list[BreakdownRow]:
    """One row per (series, task, property value) of the tasks that declare ``reported_by``:
    long-icl's accuracy per number of labels and per length, whatever the specs asked
    (``labels=0`` and ``labels=24`` of a 24-label file are one row)."""
    groups: dict[tuple[Series, str, str, Any], dict[int, list[float]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for cell in cells:
        key = reported_by(cell.task)
        if key is None or cell.score is None or cell.metric != "accuracy":
            continue
        if key in (cell.meta or {}):
            group = (series_of(cell), task_name(cell.task), key, cell.meta[key])
            groups[group][cell.length].append(cell.score)
    rows = [
        BreakdownRow(s, t, k, v, {n: (statistics.fmean(x), len(x)) for n, x in sorted(by.items())})
        for (s, t, k, v), by in groups.items()
    ]
    rows.sort(key=lambda r: (r.series.model, r.series.method, r.task, str(type(r.value)), r.value))
    return rows


# --------------------------------------------------------------------------- parameter sweeps


@dataclass(frozen=True)
class SweepPoint:
    value: Any  # the swept parameter's value
    method: str  # the cells' method spec
    score: float  # mean score of the cells
    seconds: float | None  # median prefill seconds of the cells that reused no cached prefix
    cells: int


@dataclass(frozen=True)
class Sweep:
    """One method's cells over one parameter, the others held: a speed/accuracy curve."""

    model: str
    model_fingerprint: str
    prompt_format: str
    name: str  # the method's name
    param: str
    held: tuple[tuple[str, str], ...]  # the other parameters that differ between its specs
    task: str
    metric: str
    length: int
    points: tuple[SweepPoint, ...]  # in the parameter's order

    def label(self, show_format: bool) -> str:
        held = ",".join(f"{k}={v}" for k, v in self.held)
        text = f"{self.name} over {self.param}" + (f" ({held})" if held else "")
        return f"{text} ({self.prompt_format})" if show_format else text


def _resolved(spec: str, memo: dict[str, tuple[str, dict[str, Any]] | None]):
    """(name, every parameter's value, defaults filled in) of a method spec; None if unknown."""
    if spec not in memo:
        from longreach.methods.spec import build_method  # the methods load lazily

        try:
            method = build_method(spec)
            memo[spec] = (method.name, method.params())
        except (LongreachError, TypeError, ValueError):
            memo[spec] = None
    return memo[spec]


def _order(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def prefill_median(cells: Iterable[Cell]) -> float | None:
    """Median prefill seconds of the cells that reused no cached prefix (None if none)."""
    return median(c.prefill_s for c in cells if not c.shared_prefix_tokens)


def sweeps(cells: Iterable[Cell]) -> list[Sweep]:
    """Every set of a method's specs that differ in one parameter only, per task and length.

    A spec's parameters are resolved with their defaults (``hip`` and ``hip:k=64`` are
    the same method when 64 is the default), so a bench run over ``--method hip:k=8
    --method hip:k=16 --method hip:k=32`` makes one sweep over ``k`` per task and length.
    With two parameters varied, each value of one holds a sweep over the other.
    """
    memo: dict[str, tuple[str, dict[str, Any]] | None] = {}
    groups: dict[tuple, list[Cell]] = defaultdict(list)
    for cell in cells:
        if cell.score is not None:
            key = (cell.model, cell.model_fingerprint, cell.prompt_format, cell.task,
                   cell.metric, cell.length, cell.method)  # fmt: skip
            groups[key].append(cell)
    by_method: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
    for key in groups:
        resolved = _resolved(key[-1], memo)
        if resolved is not None:
            name, params = resolved
            by_method[(*key[:-1], name)][key[-1]] = params
    out = []
    for key, specs in by_method.items():
        if len(specs) < 2:
            continue
        names = sorted({p for params in specs.values() for p in params})
        varied = [p for p in names if len({repr(v.get(p)) for v in specs.values()}) > 1]
        for param in varied:
            lines: dict[tuple, list[str]] = defaultdict(list)
            for spec, params in specs.items():
                held = tuple((p, repr(params.get(p))) for p in varied if p != param)
                lines[held].append(spec)
            for members in lines.values():
                if len({repr(specs[s].get(param)) for s in members}) < 2:
                    continue
                points = []
                for spec in sorted(members, key=lambda s: _order(specs[s].get(param))):
                    group = groups[(*key[:-1], spec)]
                    points.append(SweepPoint(
                        specs[spec].get(param), spec, statistics.fmean(c.score for c in group),
                        prefill_median(group), len(group),
                    ))  # fmt: skip
                model, fp, fmt, task, metric, length, name = key
                held = specs[members[0]]
                shown = tuple((p, str(held.get(p))) for p in varied if p != param)
                out.append(
                    Sweep(model, fp, fmt, name, param, shown, task, metric, length, tuple(points))
                )
    return out
