"""M4LE's converter: packing short instances into long rows of a word length, the four modes,
the round trip through --task-file, and its one-line errors."""

from __future__ import annotations

import json
import re

import pytest
from fixtures.tinylm import tiny_tokenizer
from typer.testing import CliRunner

from longreach.cli import app
from longreach.errors import LongreachError
from longreach.tasks import FileTask, PromptFormat
from longreach.tasks.m4le import MODES, convert, read_short

TOPICS = ("sport", "weather", "music")


def _short(tmp_path, n=24):
    path = tmp_path / "short.jsonl"
    rows = []
    for i in range(n):
        fact = f"code{i:02d}"
        context = f"Story {i} tells of the village whose password is {fact}. " + "word " * 30
        rows.append(
            {
                "context": context.strip(),
                "input": f"What is the password of the village of story {i}?",
                "answers": [fact],
                "label": TOPICS[i % 3],
            }
        )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path, rows


@pytest.mark.parametrize("mode", MODES)
def test_rows_fit_their_word_length_and_hold_the_target(tmp_path, mode):
    path, short = _short(tmp_path)
    rows = list(convert(read_short(path, mode), [200, 600], mode, per_length=5))
    assert len(rows) == 10 and {r["length_words"] for r in rows} == {200, 600}
    for row in rows:
        text = row.get("context", row.get("input"))
        assert len(text.split()) <= row["length_words"] + 40, (
            "within the length (plus the question)"
        )
        assert row["instances"] >= 2
    again = list(convert(read_short(path, mode), [200, 600], mode, per_length=5))
    assert again == rows, "deterministic for the seed"
    assert list(convert(read_short(path, mode), [200], mode, seed=5, per_length=5)) != rows[:5]


def test_explicit_single_names_the_target_article(tmp_path):
    path, short = _short(tmp_path)
    (row,) = convert(read_short(path, "explicit-single"), [400], "explicit-single", per_length=1)
    k = int(re.match(r"Based on article (\d+), ", row["input"]).group(1))
    article = row["context"].split(f"Article {k}: ", 1)[1].split("\n\n")[0]
    assert row["answers"] == ["code00"] and "password is code00" in article
    semantic = next(convert(read_short(path, "semantic-single"), [400], "semantic-single"))
    assert "Article 1:" not in semantic["context"] and semantic["input"] == short[0]["input"]


def test_multi_modes_answer_ids_and_counts(tmp_path):
    path, short = _short(tmp_path)
    (ids,) = convert(read_short(path, "explicit-multi"), [400], "explicit-multi", per_length=1)
    found = re.findall(r"The article id ([0-9a-f]{6})\. Story (\d+) ", ids["input"])
    sport = [i for i, story in found if TOPICS[int(story) % 3] == "sport"]
    assert sorted(ids["outputs"]) == sorted(sport) and "related to 'sport'" in ids["input"]
    (count,) = convert(read_short(path, "semantic-multi"), [400], "semantic-multi", per_length=1)
    stories = [int(s) for s in re.findall(r"Story (\d+) tells", count["input"])]
    assert count["outputs"] == [str(sum(1 for s in stories if s % 3 == 0))]


def test_cli_round_trips_through_a_task_file(tmp_path):
    path, _ = _short(tmp_path)
    out = tmp_path / "long.jsonl"
    result = CliRunner().invoke(
        app, ["convert", "m4le", "--in", str(path), "--out", str(out), "--lengths", "300",
              "--mode", "explicit-single"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "24 long rows written" in result.output
    task = FileTask.load(out)
    sample = task.generate(PromptFormat(tiny_tokenizer(), chat=False), 4000, None, 0, 3)
    assert sample.expected[0] in sample.prompt and sample.meta["scorer"] == "qa_f1"
    multi = tmp_path / "multi.jsonl"
    CliRunner().invoke(
        app, ["convert", "m4le", "--in", str(path), "--out", str(multi), "--lengths", "300",
              "--mode", "explicit-multi"],
    )  # fmt: skip
    assert (
        FileTask.load(multi).scorer_for(json.loads(multi.read_text().splitlines()[0]))
        == "contains_all"
    )


@pytest.mark.parametrize(
    "content,mode,message",
    [
        ("", "explicit-single", "holds 0 instances"),
        ('{"context": "a"\n', "explicit-single", "line 1 is not JSON"),
        ('{"context": "a", "input": "q"}\n{"context": "b"}', "explicit-single", "has no 'answers'"),
        ('{"context": "a"}\n{"context": "b"}', "semantic-multi", "has no 'label'"),
    ],
)
def test_bad_short_files(tmp_path, content, mode, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(LongreachError, match=message):
        read_short(path, mode)


def test_length_that_holds_one_instance_and_unknown_mode(tmp_path):
    path, _ = _short(tmp_path)
    with pytest.raises(LongreachError, match="length 60 words holds only the target"):
        list(convert(read_short(path, "explicit-single"), [60], "explicit-single"))
    result = CliRunner().invoke(
        app, ["convert", "m4le", "--in", str(path), "--out", str(tmp_path / "o.jsonl"),
              "--mode", "global"],
    )  # fmt: skip
    assert result.exit_code == 2 and "unknown mode 'global'" in result.output
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("mode", MODES)
def test_shipped_fixture_converts_in_every_mode(mode):
    from pathlib import Path

    import longreach.tasks

    fixture = Path(longreach.tasks.__file__).parent / "data" / "m4le_short_tiny.jsonl"
    rows = list(convert(read_short(fixture, mode), [256, 512], mode))
    assert len(rows) == 24 and all(r["instances"] >= 2 for r in rows)
