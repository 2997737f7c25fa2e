"""The report's charts: legends never cover a point, log-axis labels never overlap, the
perplexity panels share one axis, and the charts plot the summary table's means."""

from __future__ import annotations

import statistics

import pytest
from test_report import results_db  # noqa: F401

from longreach.bench import figures as rp
from longreach.bench.store import ResultStore
from longreach.bench.summary import series_of, summarize


@pytest.fixture(scope="module")
def cells(results_db):  # noqa: F811
    with ResultStore(results_db, create=False) as store:
        return store.cells(include_prompt=False)


def _context(cells):
    series = list(dict.fromkeys(series_of(c) for c in cells))
    lengths = sorted({c.length for c in cells})
    return series, rp.colors(series), lengths


def _points_inside(ax, box) -> list:
    hits = []
    for line in ax.get_lines():
        for x, y in line.get_xydata():
            px, py = line.get_transform().transform((x, y))
            if box.x0 <= px <= box.x1 and box.y0 <= py <= box.y1:
                hits.append((line.get_label(), x, y))
    return hits


def _drawn(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def test_legends_cover_no_point(cells):
    series, colors, lengths = _context(cells)
    rows = summarize(cells)
    figures = [rp.accuracy_figure(rows, cells[0].task, colors, False, lengths, 512, 0.85)]
    figures.append(rp.cost_figure(cells, series, colors, False, lengths, 512))
    checked = 0
    for fig in figures:
        renderer = _drawn(fig)
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert legends, "each figure has a legend"
        for legend in legends:
            box = legend.get_window_extent(renderer)
            for ax in fig.axes:
                assert _points_inside(ax, box) == [], "the legend hides these points"
                checked += len(ax.get_lines())
    assert checked >= 6


def _shown(ax, labels):
    lo, hi = ax.get_ylim()
    return [t for t in labels if t.get_text() and lo <= t.get_position()[1] <= hi]


def _overlaps(shown, renderer) -> list[tuple[str, str]]:
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in shown]
    return [
        (a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1 :] if ba.overlaps(bb)
    ]


def test_log_axis_labels_do_not_overlap():
    fig = rp.figure()
    ax = fig.add_subplot()
    ax.plot([1, 2, 3, 4], [0.061, 0.2, 0.9, 2.4])  # 1.6 decades: minor ticks 0.07, 0.08, ...
    ax.set_yscale("log")
    rp.plain_log_ticks(ax.yaxis)
    renderer = _drawn(fig)
    labels = _shown(ax, ax.yaxis.get_majorticklabels() + ax.yaxis.get_minorticklabels())
    texts = sorted({t.get_text() for t in labels}, key=float)
    assert texts == ["0.1", "0.2", "0.5", "1", "2"], texts
    assert _overlaps(labels, renderer) == []
    narrow = rp.figure()
    ax2 = narrow.add_subplot()
    ax2.plot([1, 2], [58.0, 66.0])
    ax2.set_yscale("log")
    rp.plain_log_ticks(ax2.yaxis)
    _drawn(narrow)
    shown = [t.get_text() for t in _shown(ax2, ax2.yaxis.get_minorticklabels())]
    assert "60" in shown, f"a narrow range still gets a label: {shown}"


def test_perplexity_panels_share_one_axis_and_plot_the_table_means(cells):
    series, _, lengths = _context(cells)
    fig = rp.ppl_vs_accuracy(cells, series, False, lengths, 512, 0.85)
    twins = [ax for ax in fig.axes if ax.get_ylabel().startswith("perplexity")]
    assert len(twins) == 2
    assert twins[0].get_ylim() == pytest.approx(twins[1].get_ylim())
    assert twins[0].get_ylabel() == "perplexity (mean, log)"
    rows = {(r.series.method, r.task): r for r in summarize(cells)}
    for ax, s in zip(twins, series, strict=True):
        (line,) = ax.get_lines()
        table = rows[(s.method, "perplexity:haystack=pg,last=64")].by_length
        assert list(line.get_ydata()) == [table[n][0] for n in sorted(table)]
        raw = [c.score for c in cells if c.metric == "perplexity" and c.method == s.method]
        assert statistics.fmean(line.get_ydata()) == pytest.approx(statistics.fmean(raw)), (
            "the chart's values are the means of the stored cells"
        )
