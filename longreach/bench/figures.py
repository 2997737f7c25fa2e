"""The report's figures: matplotlib's object API (no pyplot global state), so a report can be
made inside any program. Every score is a mean, as in the summary table; legends sit outside
the plots, and log axes label only 1, 2 and 5 of each decade.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

from longreach.bench.grid import format_length
from longreach.bench.store import Cell
from longreach.bench.summary import (
    Series,
    axis_position,
    median,
    per_token,
    prefill_median,
    series_of,
    task_name,
)


def figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def colors(series: list[Series]) -> dict[Series, str]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {s: cmap(i % 10) for i, s in enumerate(series)}


def length_axis(ax, lengths: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([format_length(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")


def trained_line(ax, trained: int | None, lengths: list[int]) -> None:
    if trained and lengths:
        ax.axvline(trained, color="0.3", linestyle="--", linewidth=1)
        ax.text(trained, 1.0, " trained length", transform=ax.get_xaxis_transform(),
                va="top", ha="left", fontsize=8, color="0.3")  # fmt: skip
        lo, hi = min(lengths + [trained]), max(lengths + [trained])
        ax.set_xlim(lo / 1.3, hi * 1.3)
        if trained not in lengths:
            ticks = sorted(lengths + [trained])
            ax.set_xticks(ticks)
            ax.set_xticklabels([format_length(n) for n in ticks])


def format_count(n: float) -> str:
    """A character or word count in short: 950, 1.5k, 20k, 1.2M."""
    for size, unit in ((1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def count_ticks(lo: float, hi: float) -> list[float]:
    """Ticks within [lo, hi] at 1, 2 and 5 of each decade; at 1 to 9 of it where fewer than
    two of those fall inside; at the two ends of a range narrower still."""
    decades = range(math.floor(math.log10(lo)), math.floor(math.log10(hi)) + 1)
    for leads in ((1, 2, 5), range(1, 10)):
        inside = [lead * 10.0**e for e in decades for lead in leads if lo <= lead * 10.0**e <= hi]
        if len(inside) >= 2:
            return inside
    return sorted({float(f"{lo:.2g}"), float(f"{hi:.2g}")})


def x_axis(ax, axis: str, lengths: list[int], trained: int | None,
           positions: list[float], ratio: float | None) -> None:  # fmt: skip
    """The length axis: requested tokens, or the mean characters or words of the contexts.

    On a characters or words axis the trained length (in tokens) is drawn at ``ratio``
    characters or words per token, measured over the cells, and marked as approximate.
    """
    if axis == "tokens":
        length_axis(ax, lengths)
        trained_line(ax, trained, lengths)
        return
    shown = [x for x in positions if x and x > 0]
    mark = trained * ratio if trained and ratio else None
    ends = shown + ([mark] if mark else [])
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xlabel(f"context length ({axis}, mean per point)")
    if not ends:
        return
    lo, hi = min(ends) / 1.3, max(ends) * 1.3
    ax.set_xlim(lo, hi)
    ticks = count_ticks(lo, hi)
    ax.set_xticks(ticks)
    ax.set_xticklabels([format_count(t) for t in ticks])
    if mark:
        ax.axvline(mark, color="0.3", linestyle="--", linewidth=1)
        ax.text(mark, 1.0, " ≈ trained length", transform=ax.get_xaxis_transform(),
                va="top", ha="left", fontsize=8, color="0.3")  # fmt: skip


def _cells_at(cells, series: Series, task: str | None = None) -> dict[int, list[Cell]]:
    """length -> the scored cells of ``series`` (on ``task``, if given)."""
    out: dict[int, list[Cell]] = defaultdict(list)
    for cell in cells:
        if series_of(cell) == series and (task is None or cell.task == task):
            if cell.score is not None:
                out[cell.length].append(cell)
    return out


def plain_log_ticks(axis) -> None:
    """Tick labels like 0.2, 5, 50 instead of 2×10⁻¹ on a log axis.

    Over a range of 3× or more only the ticks at 1, 2 and 5 of a decade are labelled:
    labelling every minor tick made 0.07, 0.08 and 0.09 overlap.
    """
    from matplotlib.ticker import FuncFormatter

    def label(value: float, _: object) -> str:
        if value <= 0:
            return ""
        lo, hi = sorted(axis.get_view_interval())
        lead = round(value / 10 ** math.floor(math.log10(value) + 1e-9), 6)
        if lo > 0 and hi / lo < 3 or lead in (1.0, 2.0, 5.0):
            return f"{value:g}"
        return ""

    axis.set_major_formatter(FuncFormatter(label))
    axis.set_minor_formatter(FuncFormatter(label))


def legend_outside(ax) -> None:
    """The legend right of the plot, where it cannot hide a point."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def accuracy_figure(rows, task, colors, show_format, lengths, trained, threshold,
                    axis="tokens", cells=(), title=None):  # fmt: skip
    """Mean accuracy vs length of every method on one task (the summary table's numbers).

    ``axis`` characters or words places each length at the mean count of its ``cells``.
    """
    fig = figure(7.4, 4.0)
    ax = fig.add_subplot()
    placed = []
    for row in rows:
        if row.task != task:
            continue
        at = _cells_at(cells, row.series, task) if axis != "tokens" else {}
        points = [(axis_position(at.get(n, []), n, axis), row.by_length[n][0])
                  for n in sorted(row.by_length)]  # fmt: skip
        points = [(x, y) for x, y in points if x is not None]
        placed += [x for x, _ in points]
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o",
                color=colors[row.series], label=row.series.label(show_format))  # fmt: skip
    ax.axhline(threshold, color="0.6", linestyle=":", linewidth=1)
    # The task's own characters (words) per token: tasks differ (digits, words, prose).
    ratio = per_token([c for c in cells if c.task == task], axis)
    x_axis(ax, axis, lengths, trained, placed, ratio)
    ax.set_ylim(-0.03, 1.05)
    ax.set_ylabel("accuracy (mean)")
    ax.set_title(title or task_name(task))
    legend_outside(ax)
    return fig


def heatmaps(task: str, task_series: list[Series], grids, show_format: bool):
    n = len(task_series)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = figure(4.2 * cols + 0.8, 3.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for i, s in enumerate(task_series):
        ax = axes[i // cols][i % cols]
        grid = grids[(s, task)]
        depths = sorted({d for d, _ in grid})
        lengths = sorted({n for _, n in grid})
        matrix = [[grid.get((d, n), float("nan")) for n in lengths] for d in depths]
        image = ax.imshow(matrix, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)))
        ax.set_xticklabels([format_length(n) for n in lengths])
        ax.set_yticks(range(len(depths)))
        ax.set_yticklabels([f"{d:.0%}" for d in depths])
        ax.set_xlabel("length")
        ax.set_ylabel("needle depth")
        ax.set_title(s.label(show_format), fontsize=10)
        for r, row in enumerate(matrix):
            for c, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=8)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="score")
    fig.suptitle(task_name(task))
    return fig


def cost_figure(cells, series, colors, show_format, lengths, trained, axis="tokens"):
    groups: dict[tuple[Series, int], list[Cell]] = defaultdict(list)
    for cell in cells:
        if cell.shared_prefix_tokens == 0 and cell.prefill_s is not None:
            groups[(series_of(cell), cell.length)].append(cell)
    if not groups:
        return None
    fig = figure(11, 3.8)
    ax_time, ax_mem = fig.subplots(1, 2)
    mem_kinds = {c.mem_kind for c in cells if c.mem_kind}
    placed = []
    for s in series:
        ns = sorted(n for (t, n) in groups if t == s)
        at = {n: axis_position(groups[(s, n)], n, axis) for n in ns}
        ns = [n for n in ns if at[n] is not None]
        if not ns:
            continue
        xs = [at[n] for n in ns]
        placed += xs
        label = s.label(show_format)
        ax_time.plot(xs, [median(c.prefill_s for c in groups[(s, n)]) for n in ns],
                     marker="o", color=colors[s], label=label)  # fmt: skip
        mem = [median(c.peak_mem_bytes for c in groups[(s, n)]) for n in ns]
        ax_mem.plot(xs, [m / 2**20 if m is not None else float("nan") for m in mem],
                    marker="o", color=colors[s], label=label)  # fmt: skip
    for ax in (ax_time, ax_mem):
        x_axis(ax, axis, lengths, trained, placed, per_token(cells, axis))
    legend_outside(ax_mem)
    ax_time.set_yscale("log")
    plain_log_ticks(ax_time.yaxis)
    ax_time.set_ylabel("prefill seconds (median)")
    ax_time.set_title("prefill time")
    kind = ", ".join(sorted(mem_kinds)) or "peak memory"
    ax_mem.set_ylabel(f"peak memory, MiB ({kind})")
    ax_mem.set_title("peak memory")
    return fig


def ppl_vs_accuracy(cells, series, show_format, lengths, trained, threshold, axis="tokens"):
    acc: dict[tuple[Series, int], list[float]] = defaultdict(list)
    ppl: dict[tuple[Series, int], list[float]] = defaultdict(list)
    grouped: dict[tuple[bool, Series, int], list[Cell]] = defaultdict(list)
    for cell in cells:
        if cell.score is None:
            continue
        is_ppl = cell.metric == "perplexity"
        target = ppl if is_ppl else acc
        target[(series_of(cell), cell.length)].append(cell.score)
        grouped[(is_ppl, series_of(cell), cell.length)].append(cell)

    def at(is_ppl: bool, s: Series, ns: list[int]) -> tuple[list[int], list[float]]:
        xs = {n: axis_position(grouped[(is_ppl, s, n)], n, axis) for n in ns}
        kept = [n for n in ns if xs[n] is not None]
        return kept, [xs[n] for n in kept]

    ratio = per_token(cells, axis)
    shown = [s for s in series if any(k[0] == s for k in ppl)]
    # Means, as in the summary table, and one perplexity range for every panel: a flat line
    # must look flat next to a steep one.
    ppl_mean = {k: statistics.fmean(v) for k, v in ppl.items() if k[0] in shown}
    lo, hi = min(ppl_mean.values()), max(ppl_mean.values())
    cols = min(len(shown), 3)
    rows = math.ceil(len(shown) / cols)
    fig = figure(4.6 * cols, 3.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, s in enumerate(shown):
        ax = axes[i // cols][i % cols]
        ns_acc, xs_acc = at(False, s, sorted(n for (t, n) in acc if t == s))
        if xs_acc:
            ax.plot(xs_acc, [sum(acc[(s, n)]) / len(acc[(s, n)]) for n in ns_acc],
                    marker="o", color="tab:blue", label="retrieval accuracy")  # fmt: skip
        ax.set_ylim(-0.03, 1.05)
        ax.set_ylabel("retrieval accuracy", color="tab:blue")
        ax.axhline(threshold, color="0.7", linestyle=":", linewidth=1)
        ns_ppl, xs_ppl = at(True, s, sorted(n for (t, n) in ppl if t == s))
        x_axis(ax, axis, lengths, trained, xs_acc + xs_ppl, ratio)
        twin = ax.twinx()
        twin.plot(xs_ppl, [ppl_mean[(s, n)] for n in ns_ppl], marker="s",
                  color="tab:red", label="perplexity")  # fmt: skip
        twin.set_yscale("log")
        twin.set_ylim(lo / 1.15, hi * 1.15)
        plain_log_ticks(twin.yaxis)
        twin.set_ylabel("perplexity (mean, log)", color="tab:red")
        ax.set_title(s.label(show_format), fontsize=10)
    for j in range(len(shown), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    return fig


def breakdown_figure(rows, task, key, series, colors, show_format):
    """Mean accuracy against a task's property (long-icl: the number of labels): a line per
    method and length, the method's colour, a marker and dash per length."""
    fig = figure(7.4, 4.0)
    ax = fig.add_subplot()
    mine = [r for r in rows if r.task == task and r.key == key]
    values = sorted({r.value for r in mine}, key=lambda v: (str(type(v)), v))
    numeric = all(isinstance(v, int | float) for v in values)
    place = {v: (v if numeric else i) for i, v in enumerate(values)}
    lengths = sorted({n for r in mine for n in r.by_length})
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P"]
    for s in series:
        for j, n in enumerate(lengths):
            points = sorted(
                (place[r.value], r.by_length[n][0])
                for r in mine
                if r.series == s and n in r.by_length
            )
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points],
                        color=colors[s], linestyle=styles[j % len(styles)],
                        marker=markers[j % len(markers)],
                        label=f"{s.label(show_format)} · {format_length(n)}")  # fmt: skip
    ax.set_xticks([place[v] for v in values])
    ax.set_xticklabels([str(v) for v in values])
    ax.set_xlabel(f"number of {key}" if numeric else key)
    ax.set_ylim(-0.03, 1.05)
    ax.set_ylabel("accuracy (mean)")
    ax.set_title(f"{task}: accuracy by {key}")
    legend_outside(ax)
    return fig


def sweep_figure(task, task_sweeps, cells, show_format):
    """Score against prefill seconds, a panel per length: each sweep is a line through its
    parameter's values (each point labelled), other methods at the same task and length
    single crosses, so a sparse method's curve sits next to the dense point it approximates."""
    lengths = sorted({s.length for s in task_sweeps})
    swept = {p.method for s in task_sweeps for p in s.points}
    metric = task_sweeps[0].metric
    others: dict[tuple[str, int], list[Cell]] = defaultdict(list)
    for cell in cells:
        if (cell.task == task and cell.length in lengths and cell.score is not None
                and cell.method not in swept):  # fmt: skip
            others[(series_of(cell).label(show_format), cell.length)].append(cell)
    cols = min(len(lengths), 3)
    rows = math.ceil(len(lengths) / cols)
    fig = figure(4.8 * cols + 2.4, 3.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    palette = {}
    for s in task_sweeps:
        palette.setdefault(s.label(show_format), f"C{len(palette) % 10}")
    for i, length in enumerate(lengths):
        ax = axes[i // cols][i % cols]
        for s in (s for s in task_sweeps if s.length == length):
            points = [p for p in s.points if p.seconds is not None]
            if not points:
                continue
            color = palette[s.label(show_format)]
            xs, ys = [p.seconds for p in points], [p.score for p in points]
            ax.plot(xs, ys, marker="o", color=color, label=s.label(show_format))
            for p in points:
                ax.annotate(f"{s.param}={p.value}", (p.seconds, p.score), fontsize=7,
                            xytext=(3, 3), textcoords="offset points", color=color)  # fmt: skip
        for (label, n), group in sorted(others.items()):
            seconds = prefill_median(group) if n == length else None
            if seconds is None:
                continue
            score = statistics.fmean(c.score for c in group)
            ax.plot([seconds], [score], marker="x", linestyle="none", markersize=9,
                    color="0.25", label=label)  # fmt: skip
            ax.annotate(label, (seconds, score), fontsize=7, xytext=(3, -9),
                        textcoords="offset points", color="0.25")  # fmt: skip
        ax.set_xscale("log")
        ax.margins(x=0.2)  # room for the point labels
        plain_log_ticks(ax.xaxis)
        ax.set_xlabel("prefill seconds (median per cell)")
        if metric == "perplexity":
            ax.set_yscale("log")
            plain_log_ticks(ax.yaxis)
            ax.set_ylabel("perplexity (mean, lower is better)")
        else:
            ax.set_ylim(-0.03, 1.05)
            ax.set_ylabel("accuracy (mean)")
        ax.set_title(f"{format_length(length)} tokens", fontsize=10)
        legend_outside(ax)
    for j in range(len(lengths), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    fig.suptitle(
        f"{task_name(task)}: speed against {'perplexity' if metric == 'perplexity' else 'accuracy'}"
    )
    return fig
