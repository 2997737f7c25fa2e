"""Speed against score: a method run over several values of one parameter is one curve."""

from __future__ import annotations

import pytest
from test_bench_store import _cell

from longreach.bench import figures
from longreach.bench.report import write_report
from longreach.bench.store import ResultStore
from longreach.bench.summary import sweeps

TASK = "passkey:haystack=synthetic"


def _cells() -> list:
    out = []
    # hip over k at two lengths ("hip" is the point at its default k), with a
    # second parameter held in one spec, and vanilla as a single reference point
    runs = {"hip:k=8": 0.25, "hip:k=16": 0.5, "hip": 0.75, "vanilla": 1.0, "hip:k=8,block=32": 0.1}
    for length in (1024, 2048):
        for method, score in runs.items():
            for idx in range(2):
                out.append(
                    _cell(idx, score=score, method=method, length=length,
                          prefill_s=score * length / 1000)
                )  # fmt: skip
    out.append(_cell(0, score=0.9, method="no-such-method:x=1", length=1024))
    return out


def test_sweeps_resolve_defaults_and_hold_the_other_parameters():
    found = sweeps(_cells())
    from longreach.methods.spec import build_method

    default_k = build_method("hip").k
    by_key = {(s.param, s.held, s.length): s for s in found}
    k_line = by_key[("k", (("block", str(build_method("hip").block)),), 1024)]
    assert [p.method for p in k_line.points] == sorted(
        ["hip:k=8", "hip:k=16", "hip"],
        key=lambda m: {"hip:k=8": 8, "hip:k=16": 16}.get(m, default_k),
    )
    assert [p.value for p in k_line.points] == sorted([8, 16, default_k])
    assert [p.score for p in k_line.points][:2] == [0.25, 0.5]
    assert k_line.points[0].seconds == pytest.approx(0.25 * 1024 / 1000)
    assert k_line.points[0].cells == 2
    # block varies too: at k=8 the two block values are a sweep over block
    block_line = by_key[("block", (("k", "8"),), 2048)]
    assert {p.method for p in block_line.points} == {"hip:k=8", "hip:k=8,block=32"}
    # vanilla has one spec and the unknown method cannot be resolved: no sweep for either
    assert {s.name for s in found} == {"hip"}
    assert {s.length for s in found} == {1024, 2048}


def test_the_report_draws_a_curve_per_task(tmp_path):
    cells = _cells()
    db = tmp_path / "runs.db"
    with ResultStore(db) as store:
        run = store.start_run("m", "fp", {}, {})
        for cell in cells:
            store.add(cell, run)
    report = write_report(db, tmp_path / "report")
    curves = [p for p in report.images if "speed-vs-score" in p.name]
    assert len(curves) == 1 and curves[0].stat().st_size > 1000
    html = report.index.read_text()
    assert "Speed against score" in html and "No parameter sweeps" not in html

    task_sweeps = [s for s in sweeps(cells) if s.task == TASK]
    fig = figures.sweep_figure(TASK, task_sweeps, cells, False)
    ax = fig.axes[0]
    curves_drawn = [line for line in ax.get_lines() if line.get_marker() == "o"]
    crosses = [line for line in ax.get_lines() if line.get_marker() == "x"]
    assert len(curves_drawn) == len([s for s in task_sweeps if s.length == 1024])
    assert [line.get_label() for line in crosses] == ["no-such-method:x=1", "vanilla"]
    labels = {t.get_text() for t in ax.texts}
    assert {"k=8", "k=16", "vanilla"} <= labels


def test_a_report_without_sweeps_says_how_to_make_one(tmp_path):
    db = tmp_path / "runs.db"
    with ResultStore(db) as store:
        run = store.start_run("m", "fp", {}, {})
        store.add(_cell(0, method="vanilla"), run)
    report = write_report(db, tmp_path / "report")
    assert "No parameter sweeps" in report.index.read_text()
    assert not [p for p in report.images if "speed-vs-score" in p.name]
