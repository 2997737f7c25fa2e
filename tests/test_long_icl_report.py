"""Long ICL's accuracy against the number of labels and the length: one row per label count
whatever the spec asked, in the bench's table, the report's table and its figure."""

from __future__ import annotations

import io

import pytest
from fixtures.tinylm import one_thread, tiny_lm, tiny_tokenizer  # noqa: F401
from rich.console import Console
from test_bench_store import _cell

from longreach.bench import BenchConfig, ResultStore, figures, run_bench
from longreach.bench.render import summary_table
from longreach.bench.report import write_report
from longreach.bench.runner import BenchResult
from longreach.bench.summary import breakdown, series_of, task_title

FOUR = "long-icl:file=tiny,labels=4"
ALL = "long-icl:file=tiny,labels=0"
ALL_NAMED = "long-icl:file=tiny,labels=24"
# (spec, labels in the cells' meta, length) -> the samples' scores
SCORES = {
    (FOUR, 4, 1200): [1.0, 1.0],
    (FOUR, 4, 2400): [1.0, 0.0],
    (ALL, 24, 3000): [1.0, 0.0],
    (ALL_NAMED, 24, 3000): [0.0, 0.0],  # the same 24 labels: one row with ALL
    (ALL, 24, 6000): [0.0, 0.0],
}


def _cells() -> list:
    out = []
    for (spec, labels, length), scores in SCORES.items():
        for idx, score in enumerate(scores):
            meta = {"labels": labels, "rounds": 1}
            out.append(
                _cell(idx, score, task=spec, length=length, depth=None, meta=meta, expected=["x"])
            )
    out.append(_cell(0, 1.0, length=1200))  # a passkey cell: no label count
    return out


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "runs.db"
    with ResultStore(path) as store:
        run = store.start_run("m", "fp", {}, {})
        for cell in _cells():
            store.add(cell, run)
    return path


def test_breakdown_per_labels_and_length():
    rows = breakdown(_cells())
    got = {(r.task, r.key, r.value): r.by_length for r in rows}
    assert got == {
        ("long-icl", "labels", 4): {1200: (1.0, 2), 2400: (0.5, 2)},
        ("long-icl", "labels", 24): {3000: (0.25, 4), 6000: (0.0, 2)},
    }
    assert [r.value for r in rows] == [4, 24], "rows in order of the label count"


def test_task_titles_name_the_label_count():
    cells = _cells()
    assert task_title(FOUR, cells) == "long-icl · 4 labels"
    assert task_title(ALL, cells) == "long-icl · 24 labels"
    assert task_title("passkey:haystack=synthetic", cells) == "passkey"


def test_bench_table_shows_labels(db):
    keys = frozenset(c.key for c in _cells())
    result = BenchResult(db, 1, "m", "fp", 1024, len(keys), 0, len(keys), 1.0, keys)
    console = Console(width=140, file=io.StringIO(), color_system=None)
    console.print(summary_table(result))
    text = console.file.getvalue()
    lines = {line.split("│")[2].strip(): line for line in text.splitlines() if "long-icl" in line}
    assert set(lines) == {"long-icl · 4 labels", "long-icl · 24 labels"}, text
    assert "100%" in lines["long-icl · 4 labels"] and "50%" in lines["long-icl · 4 labels"]


def test_report_table_and_figure(db, tmp_path):
    report = write_report(db, tmp_path / "out")
    page = report.index.read_text()
    assert "Accuracy by task property and length" in page
    row_4 = page[page.index("<td>4 labels</td>") :].split("</tr>")[0]
    assert "1.00 (n=2)</td><td>0.50 (n=2)</td><td>–</td><td>–" in row_4, row_4
    row_24 = page[page.index("<td>24 labels</td>") :].split("</tr>")[0]
    assert "–</td><td>–</td><td>0.25 (n=4)</td><td>0.00 (n=2)" in row_24, row_24
    assert any(p.name.endswith("long-icl-by-labels.png") for p in report.images)
    assert ">long-icl · 4 labels<" in page, "the effective-length table names the count"

    cells = _cells()
    series = [series_of(cells[0])]
    fig = figures.breakdown_figure(breakdown(cells), "long-icl", "labels", series,
                                   figures.colors(series), False)  # fmt: skip
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata()))
             for ln in fig.axes[0].get_lines()}  # fmt: skip
    assert lines == {
        "vanilla · 1200": ([4], [1.0]),
        "vanilla · 2400": ([4], [0.5]),
        "vanilla · 3000": ([24], [0.25]),
        "vanilla · 6000": ([24], [0.0]),
    }
    assert fig.axes[0].get_xlabel() == "number of labels"


@pytest.mark.usefixtures("one_thread")
def test_bench_cells_carry_the_label_count(tmp_path):
    config = BenchConfig(
        model="tiny", tasks=["long-icl:labels=4"], lengths=[1200], samples=1,
        db=str(tmp_path / "runs.db"),
    )  # fmt: skip
    run_bench(config, model=tiny_lm(), tokenizer=tiny_tokenizer())
    with ResultStore(config.db) as store:
        cells = store.cells()
    assert [(c.task, c.meta["labels"]) for c in cells] == [(FOUR, 4)]
    (row,) = breakdown(cells)
    assert (row.value, list(row.by_length)) == (4, [1200])
    assert row.by_length[1200] == (cells[0].score, 1)
