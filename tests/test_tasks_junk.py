"""Inputs that used to run and measure nothing, or crash: empty or binary haystacks, task-file
rows without text or answers, an accuracy threshold outside (0, 1]."""

from __future__ import annotations

import json
import os

import pytest
from fixtures.tinylm import tiny_tokenizer
from typer.testing import CliRunner

from longreach.cli import app
from longreach.errors import LongreachError
from longreach.tasks import FileTask, PromptFormat, get_task
from longreach.tasks.haystack import HaystackSource, TokenizedHaystack, resolve_haystack


def _empty_haystacks(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n\t \n")
    folder = tmp_path / "emptydir"
    folder.mkdir()
    (folder / "a.txt").write_text("")
    (folder / "b.md").write_text("\n")
    return [tmp_path / "empty.txt", tmp_path / "blank.txt", folder]


@pytest.mark.parametrize("task", ["niah", "passkey", "perplexity"])
def test_empty_or_whitespace_haystack_is_one_line(tmp_path, task):
    for path in _empty_haystacks(tmp_path):
        with pytest.raises(LongreachError, match=r"holds no text \(its files are empty"):
            get_task(task, haystack=str(path))


def test_empty_haystack_is_refused_where_it_is_tokenized(tmp_path):
    # The path a task takes when its haystack was checked before the file was emptied.
    path = tmp_path / "later.txt"
    path.write_text("")
    with pytest.raises(LongreachError, match="holds no text"):
        TokenizedHaystack(HaystackSource(str(path)), tiny_tokenizer())


def test_empty_haystack_in_bench_is_one_line_before_the_model_loads(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    result = CliRunner().invoke(
        app,
        ["bench", "--model", "/never/loaded", "--task", "niah", "--haystack",
         str(tmp_path / "empty.txt"), "--db", str(tmp_path / "h.db")],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "holds no text" in result.output
    assert not (tmp_path / "h.db").exists()


def test_binary_haystack_is_refused(tmp_path):
    data = os.urandom(20_000)
    (tmp_path / "noise.txt").write_bytes(data)
    with pytest.raises(LongreachError, match=r"noise.txt is not UTF-8 text \(\d+ of \d+"):
        resolve_haystack(str(tmp_path / "noise.txt"))
    folder = tmp_path / "bindir"
    folder.mkdir()
    (folder / "a.txt").write_text("Some real text. " * 50)
    (folder / "b.txt").write_bytes(b"\x00\x01\x02" * 1000)
    with pytest.raises(LongreachError, match=r"b.txt is not UTF-8 text"):
        resolve_haystack(str(folder))
    # A stray replacement character in real text is fine.
    (tmp_path / "ok.txt").write_bytes(("Real text. " * 200).encode() + b"\xff")
    assert resolve_haystack(str(tmp_path / "ok.txt")).documents()[0].startswith("Real text.")


@pytest.mark.parametrize(
    "row,message",
    [
        ({"input": "q", "answers": ["a"], "context": None}, "'context' is null, not a string"),
        ({"input": 5, "answers": ["a"], "context": "c"}, "'input' is 5, not a string"),
        ({"input": "q", "outputs": []}, "'outputs' must be a non-empty list of strings (got [])"),
        ({"input": "q", "answers": []}, "'answers' must be a non-empty list of strings"),
        ({"input": "q", "answers": [None]}, "'answers' must be a non-empty list of strings"),
        ({"input": "q", "outputs": ["", " "]}, "every entry of 'outputs' is empty"),
    ],
)
def test_task_file_rows_without_text_or_answers_are_refused(tmp_path, row, message):
    path = tmp_path / "rows.jsonl"
    good = {"input": "question", "answers": ["yes"], "context": "text"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(LongreachError) as err:
        FileTask.load(path)
    assert f"task file {path} line 2: {message}" in str(err.value)


def test_task_file_answers_may_be_numbers_or_one_string(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        json.dumps({"input": "q", "answers": [1, 2]})
        + "\n"
        + json.dumps({"input": "q", "answers": "one"})
        + "\n"
    )
    task = FileTask.load(path)
    sample = task.generate(PromptFormat(tiny_tokenizer()), 4000, None, 0, 0)
    assert sample.expected == ["1", "2"]
    assert "None" not in sample.prompt


@pytest.mark.parametrize("threshold", ["2", "-1", "0"])
def test_bench_threshold_outside_zero_one_is_refused_like_report(tmp_path, threshold):
    bench = CliRunner().invoke(
        app,
        ["bench", "--model", "/never/loaded", "--threshold", threshold,
         "--db", str(tmp_path / "r.db")],
    )  # fmt: skip
    report = CliRunner().invoke(app, ["report", "--db", "x.db", "--threshold", threshold])
    for result in (bench, report):
        assert result.exit_code == 2, result.output
        assert f"error: threshold {float(threshold):g} must lie in (0, 1]" in result.output
