"""The report's length axis: tokens (the requested lengths), characters or words (each point at
the mean count of its cells' contexts, the trained length at the cells' count per token)."""

from __future__ import annotations

import pytest
from test_bench_store import _cell
from typer.testing import CliRunner

from longreach.bench import figures
from longreach.bench.report import write_report
from longreach.bench.store import ResultStore
from longreach.bench.summary import axis_position, per_token, series_of, summarize
from longreach.cli import app
from longreach.errors import LongreachError

TASK = "passkey:haystack=synthetic"
# length -> (chars, words) of the two samples' contexts: 3.0 and 3.5 characters per token
COUNTS = {1024: ((3000, 500), (3100, 520)), 2048: ((7000, 1100), (7200, 1140))}


def _cells(method: str = "vanilla", chars: bool = True) -> list:
    out = []
    for length, samples in COUNTS.items():
        for idx, (n_chars, n_words) in enumerate(samples):
            out.append(
                _cell(
                    idx,
                    score=1.0 if length == 1024 else 0.5,
                    method=method,
                    length=length,
                    context_tokens=length - 24,
                    context_chars=n_chars if chars else None,
                    context_words=n_words if chars else None,
                    trained_length=1024,
                    prefill_s=length / 1000,
                    peak_mem_bytes=length * 2**20,
                )
            )
    return out


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "runs.db"
    with ResultStore(path) as store:
        run = store.start_run("m", "fp", {}, {})
        for cell in _cells("vanilla") + _cells("yarn:factor=4"):
            store.add(cell, run)
    return path


def _lines(ax) -> list:
    return [line for line in ax.get_lines() if line.get_marker() == "o"]


def test_axis_position_and_per_token():
    cells = _cells()
    at_1k = [c for c in cells if c.length == 1024]
    assert axis_position(at_1k, 1024, "tokens") == 1024.0
    assert axis_position(at_1k, 1024, "characters") == 3050.0
    assert axis_position(at_1k, 1024, "words") == 510.0
    assert axis_position(_cells(chars=False), 1024, "characters") is None
    tokens = 2 * (1024 - 24) + 2 * (2048 - 24)
    assert per_token(cells, "characters") == pytest.approx((3000 + 3100 + 7000 + 7200) / tokens)
    assert per_token(cells, "tokens") == 1.0
    assert per_token(_cells(chars=False), "words") is None


@pytest.mark.parametrize(
    "axis,xs", [("tokens", [1024, 2048]), ("characters", [3050, 7100]), ("words", [510, 1120])]
)
def test_accuracy_figure_places_points_on_the_axis(axis, xs):
    own = _cells()
    # another task with ten characters per token: it must not move this task's trained line
    other = [_cell(i, task="niah", length=1024, context_chars=10240, context_words=2000)
             for i in range(2)]  # fmt: skip
    cells = own + other
    rows = summarize(cells)
    colors = figures.colors([series_of(cells[0])])
    fig = figures.accuracy_figure(rows, TASK, colors, False, [1024, 2048], 1024, 0.85, axis, cells)
    ax = fig.axes[0]
    (line,) = _lines(ax)
    assert list(line.get_xdata()) == pytest.approx(xs)
    assert list(line.get_ydata()) == [1.0, 0.5], "the same means as the table"
    unit = "tokens" if axis == "tokens" else f"{axis}, mean per point"
    assert ax.get_xlabel() == f"context length ({unit})"
    (trained,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert trained.get_xdata()[0] == pytest.approx(1024 * per_token(own, axis)), "own ratio"
    labels = [t.get_text() for t in ax.get_xticklabels()]
    if axis == "characters":
        assert labels == ["3k", "4k", "5k", "6k", "7k", "8k", "9k"], "one 1-2-5 tick: 1 to 9"
    if axis == "words":
        assert labels == ["500", "1k"]


def test_count_ticks_and_format():
    assert figures.count_ticks(900, 60000) == [1000, 2000, 5000, 10000, 20000, 50000]
    assert figures.count_ticks(2300, 9200) == [3000, 4000, 5000, 6000, 7000, 8000, 9000]
    assert figures.count_ticks(14100, 15800) == [14000, 16000], "a narrow range: its ends"
    assert [figures.format_count(n) for n in (950, 1500, 20000, 1.25e6)] == [
        "950",
        "1.5k",
        "20k",
        "1.25M",
    ]


def test_cost_figure_uses_the_axis():
    cells = _cells()
    fig = figures.cost_figure(cells, [series_of(cells[0])], {series_of(cells[0]): "k"}, False,
                              [1024, 2048], 1024, "words")  # fmt: skip
    for ax in fig.axes:
        (line,) = _lines(ax)
        assert list(line.get_xdata()) == pytest.approx([510, 1120])
        assert ax.get_xlabel() == "context length (words, mean per point)"


def test_report_with_characters_axis(db, tmp_path):
    report = write_report(db, tmp_path / "out", axis="characters")
    page = report.index.read_text()
    assert "the mean characters of its cells" in page
    assert "Accuracy vs length (characters)" in page
    names = [p.stem.split("-")[2] for p in report.images]
    assert names == ["accuracy", "heatmap", "cost"], names
    tokens_page = write_report(db, tmp_path / "tok").index.read_text()
    assert "mean characters" not in tokens_page


def test_axis_errors(db, tmp_path):
    with pytest.raises(LongreachError, match="x axis 'bytes' is not one of tokens, characters"):
        write_report(db, tmp_path / "out", axis="bytes")
    old = tmp_path / "old.db"
    with ResultStore(old) as store:
        run = store.start_run("m", "fp", {}, {})
        for cell in _cells(chars=False):
            store.add(cell, run)
    with pytest.raises(LongreachError, match="holds no words counts"):
        write_report(old, tmp_path / "out", axis="words")
    assert write_report(old, tmp_path / "tok").cells == 4, "tokens needs no counts"


def test_report_cli_x_option(db, tmp_path):
    ok = CliRunner().invoke(app, ["report", "--db", str(db), "--out", str(tmp_path / "r"),
                                  "--x", "words"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert "mean words" in (tmp_path / "r" / "index.html").read_text()
    bad = CliRunner().invoke(app, ["report", "--db", str(db), "--out", str(tmp_path / "r"),
                                   "--x", "bytes"])  # fmt: skip
    assert bad.exit_code == 2 and "Traceback" not in bad.output, bad.output
    assert "error: x axis 'bytes' is not one of tokens, characters, words" in " ".join(
        bad.output.split()
    )


def test_perplexity_figure_uses_the_axis():
    cells = _cells()
    for length, chars in ((1024, 4000), (2048, 8400)):
        cells.append(
            _cell(
                0,
                score=20.0,
                task="perplexity:haystack=pg,last=64",
                metric="perplexity",
                depth=None,
                length=length,
                context_tokens=length,
                context_chars=chars,
                context_words=chars // 6,
                trained_length=1024,
            )
        )
    series = [series_of(cells[0])]
    fig = figures.ppl_vs_accuracy(cells, series, False, [1024, 2048], 1024, 0.85, "characters")
    acc_ax, twin = fig.axes
    (acc,) = _lines(acc_ax)
    (ppl,) = [line for line in twin.get_lines() if line.get_marker() == "s"]
    assert list(acc.get_xdata()) == pytest.approx([3050, 7100]), "retrieval cells' characters"
    assert list(ppl.get_xdata()) == pytest.approx([4000, 8400]), "perplexity cells' characters"
    assert acc_ax.get_xlabel() == "context length (characters, mean per point)"
