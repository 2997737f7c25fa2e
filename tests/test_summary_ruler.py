"""The RULER suite: the average over the RULER tasks run, its effective length (RULER's rule
and threshold), the length-weighted averages, and its row in the bench's final table."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from test_bench_store import _cell

from longreach.bench.render import summary_table
from longreach.bench.runner import BenchResult
from longreach.bench.store import ResultStore
from longreach.bench.summary import (
    RULER_THRESHOLD,
    ruler_suite,
    suite_effective_length,
    summarize,
    weighted_averages,
)
from longreach.errors import LongreachError

# RULER's own table (Hsieh et al., 2024, Table 3), GPT-4 at 4k..128k: avg 91.6, wAvg (inc)
# 89.0, wAvg (dec) 94.1.
GPT4 = dict(zip((4, 8, 16, 32, 64, 128), (96.6, 96.3, 95.2, 93.2, 87.0, 81.2), strict=True))


def test_weighted_averages_match_ruler_table():
    inc, dec = weighted_averages(GPT4)
    assert round(inc, 1) == 89.0 and round(dec, 1) == 94.1
    assert weighted_averages({}) == (None, None)


def test_suite_effective_length_is_the_longest_length_above_threshold():
    scores = {4096: 0.90, 8192: 0.80, 16384: 0.87, 32768: 0.50}
    assert suite_effective_length(scores, RULER_THRESHOLD) == 16384
    assert suite_effective_length(scores, 0.95) is None
    assert suite_effective_length({4096: 0.856}, 0.856) is None, "beats, not equals"
    assert RULER_THRESHOLD == 0.856


# (task, length) -> the scores of its two samples
SCORES = {
    ("niah_single_1", 1024): (1.0, 1.0),
    ("niah_single_1", 2048): (1.0, 0.0),
    ("vt", 1024): (1.0, 0.5),
    ("vt", 2048): (0.0, 0.0),
    ("qa_1:file=squad", 1024): (1.0, 1.0),
    ("qa_1:file=squad", 2048): (1.0, 1.0),
    ("passkey:haystack=synthetic", 1024): (0.0, 0.0),  # not a RULER task
    ("passkey:haystack=synthetic", 2048): (0.0, 0.0),
}


def _cells(method="vanilla"):
    return [
        _cell(idx=i, score=s, task=task, length=length, depth=None, method=method)
        for (task, length), pair in SCORES.items()
        for i, s in enumerate(pair)
    ]


def test_suite_averages_only_ruler_tasks():
    (suite,) = ruler_suite(summarize(_cells()))
    assert suite.tasks == ["niah_single_1", "vt", "qa_1"]
    assert suite.by_length[1024] == pytest.approx((1.0 + 0.75 + 1.0) / 3)
    assert suite.by_length[2048] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert suite.effective == 1024
    assert suite.wavg_inc == pytest.approx((1 * 11 / 12 + 2 * 0.5) / 3)
    assert suite.wavg_dec == pytest.approx((2 * 11 / 12 + 1 * 0.5) / 3)
    # a lower threshold reaches the longest length
    (low,) = ruler_suite(summarize(_cells()), threshold=0.4)
    assert low.effective == 2048


def test_suite_uses_lengths_every_task_ran():
    cells = [c for c in _cells() if not (c.task == "vt" and c.length == 2048)]
    (suite,) = ruler_suite(summarize(cells))
    assert sorted(suite.by_length) == [1024]


def _result(tmp_path, cells) -> BenchResult:
    keys = []
    with ResultStore(tmp_path / "runs.db") as store:
        run = store.start_run("m", "fp", {}, {})
        for cell in cells:
            store.add(cell, run)
            keys.append(cell.key)
    return BenchResult(
        tmp_path / "runs.db", 1, "m", "fp", 1024, len(keys), 0, len(keys), 1.0, frozenset(keys)
    )


def _render(table) -> str:
    console = Console(width=120, file=io.StringIO(), color_system=None, force_terminal=True)
    console.print(table)
    return console.file.getvalue()


def test_final_table_has_a_ruler_row_per_method(tmp_path):
    result = _result(tmp_path, _cells("vanilla") + _cells("yarn:factor=4"))
    text = _render(summary_table(result))
    rows = [line for line in text.splitlines() if "RULER avg (3/13)" in line]
    assert len(rows) == 2, text
    for line in rows:
        assert "92%" in line and "50%" in line, line  # 11/12 and 1/2
        assert line.rstrip("│ ").endswith("1k"), f"effective length 1k: {line}"
    flat = " ".join(text.split())
    assert "wAvg inc/dec: vanilla 64%/78%" in flat and "above 85.6%" in flat, text
    low = _render(summary_table(result, ruler_threshold=0.4))
    assert any("RULER avg" in ln and ln.rstrip("│ ").endswith("≥ 2k") for ln in low.splitlines())


def test_no_ruler_row_without_two_ruler_tasks(tmp_path):
    cells = [c for c in _cells() if c.task in ("niah_single_1", "passkey:haystack=synthetic")]
    text = _render(summary_table(_result(tmp_path, cells)))
    assert "RULER avg" not in text and "wAvg" not in text


def test_ruler_threshold_out_of_range(tmp_path):
    with pytest.raises(LongreachError, match="threshold 85.6 must lie in"):
        summary_table(_result(tmp_path, _cells()), ruler_threshold=85.6)
