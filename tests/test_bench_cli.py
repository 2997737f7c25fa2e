"""The bench, report, export and tasks commands: a tiny end-to-end run and one-line errors."""

from __future__ import annotations

import json

import pytest
from fixtures.tinylm import one_thread, tiny_dir  # noqa: F401
from typer.testing import CliRunner

from longreach.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def _one_line_error(result, message: str) -> None:
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert f"error: {message}" in text, text


def test_bench_report_export_end_to_end(tmp_path, tiny_dir):  # noqa: F811
    db = tmp_path / "runs.db"
    args = ["bench", "--model", str(tiny_dir), "--task", "passkey", "--task", "perplexity:last=32"]
    args += ["--lengths", "300,400", "--depths", "0.5", "--samples", "1", "--db", str(db)]
    result = _run(*args)
    assert result.exit_code == 0, result.output
    assert "4 cells computed, 0 already in" in result.output
    assert "longreach report --db" in result.output
    assert "effective" in result.output and "passkey" in result.output

    again = _run(*args)
    assert "0 cells computed, 4 already in" in again.output

    report = _run("report", "--db", str(db), "--out", str(tmp_path / "report"))
    assert report.exit_code == 0, report.output
    assert (tmp_path / "report" / "index.html").is_file()

    out = tmp_path / "cells.jsonl"
    exported = _run("export", "--db", str(db), "--out", str(out))
    assert exported.exit_code == 0 and "4 cells written" in exported.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["task"].split(":")[0] for r in rows} == {"passkey", "perplexity"}


def test_tasks_lists_every_task():
    result = _run("tasks")
    assert result.exit_code == 0
    for name in ("passkey", "niah", "multi-needle", "threading", "variable-tracking", "perplexity"):
        assert name in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--task", "needles"], "unknown task 'needles'; choose from passkey, niah"),
        (["--lengths", "2k,abc"], "malformed length 'abc'"),
        (["--depths", "0.5,1.2"], "depth 1.2 is outside [0, 1]"),
        (["--haystack", "/no/such/dir"], "haystack '/no/such/dir' is neither 'pg', 'synthetic'"),
        (["--task-file", "/no/such.jsonl"], "cannot read task file /no/such.jsonl"),
        (["--samples", "0"], "--samples 0 must be at least 1"),
    ],
)
def test_bad_bench_input_is_one_line(tmp_path, args, message):
    result = _run("bench", "--model", "/never/loaded", "--db", str(tmp_path / "r.db"), *args)
    _one_line_error(result, message)


def test_length_the_task_cannot_fit(tmp_path, tiny_dir):  # noqa: F811
    result = _run(
        "bench", "--model", str(tiny_dir), "--lengths", "64", "--db", str(tmp_path / "r.db")
    )
    _one_line_error(result, "length 64 is too short for task 'passkey")


def test_corrupt_database_is_one_line(tmp_path):
    db = tmp_path / "notes.db"
    db.write_text("not a database")
    result = _run("bench", "--model", "/never/loaded", "--db", str(db))
    _one_line_error(result, f"{db} is not a SQLite database")
    report = _run("report", "--db", str(db), "--out", str(tmp_path / "r"))
    _one_line_error(report, f"{db} is not a SQLite database")
    assert db.read_text() == "not a database"


def test_demo_on_a_tiny_model(tmp_path, tiny_dir):  # noqa: F811
    result = _run("demo", "--model", str(tiny_dir), "--out", str(tmp_path / "demo"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "report" / "index.html").is_file()
    assert (tmp_path / "demo" / "demo.db").is_file()
    text = " ".join(result.output.split())
    assert "yarn:factor=4" in text and "effective" in text and "report:" in text


def test_demo_plans(tmp_path):
    from longreach.bench.demo import DEMO_MODEL, PLANS, demo_config

    assert DEMO_MODEL in PLANS
    lab = demo_config(tmp_path, "lab", 256)
    assert lab.lengths == [256, 512, 1024, 2048] and lab.db == str(tmp_path / "demo.db")
    smol = demo_config(tmp_path, "smollm2-135m", 8192)
    assert smol.lengths == [1024, 2048] and not smol.chat


def test_demo_measures_the_memory_method_and_the_readers_far_past_the_trained_length(tmp_path):
    from longreach.bench.demo import demo_configs

    reach = {c.methods[0]: c for c in demo_configs(tmp_path, "lab", 256)[1:]}
    assert reach["infllm"].lengths == [8192]
    for reader in ("infiniretri", "xl3m"):  # 32x and 128x the lab model's 256 tokens
        assert reach[reader].lengths == [8192, 32768] and reach[reader].tasks == ["passkey"]
        assert reach[reader].samples == 1 and len(reach[reader].depths) == 3
    assert {c.db for c in reach.values()} == {str(tmp_path / "demo.db")}
