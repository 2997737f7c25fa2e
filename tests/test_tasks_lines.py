"""LongChat-Lines: the record's format, the asked line at its depth, sizing, determinism and
Giraffe's first-number scorer."""

from __future__ import annotations

import re

import pytest
from fixtures.tinylm import tiny_tokenizer

from longreach.tasks import PromptFormat, get_task
from longreach.tasks.scorers import first_number

LINE = re.compile(r"line ([a-z]+-[a-z]+): REGISTER_CONTENT is <(\d+)>\n")


@pytest.fixture(scope="module")
def raw():
    return PromptFormat(tiny_tokenizer(), chat=False)


@pytest.mark.parametrize("length", [1500, 4000])
def test_record_fills_length_and_holds_the_answer(raw, length):
    s = get_task("longchat-lines").generate(raw, length, 0.5, 0, 0)
    # one line is at most ~60 bytes (= tokens here)
    assert length - 70 <= s.n_tokens <= length, s.n_tokens
    lines = LINE.findall(s.prompt)
    assert len(lines) == s.meta["lines"] and len({i for i, _ in lines}) == len(lines)
    record = dict(lines)
    assert record[s.meta["line"]] == s.expected[0]
    assert all(1 <= int(v) <= 50000 for _, v in lines)
    assert s.prompt.startswith("Below is a record of lines I want you to remember.")
    assert s.prompt.endswith(
        f"Tell me what is the <REGISTER_CONTENT> in line {s.meta['line']}? I need the number. "
        f"Line <{s.meta['line']}>: <REGISTER_CONTENT> is"
    )


def test_asked_line_follows_depth(raw):
    task = get_task("longchat-lines")
    for depth in (0.0, 0.5, 1.0):
        s = task.generate(raw, 3000, depth, 0, 1)
        assert s.meta["line_index"] == round(depth * (s.meta["lines"] - 1))


def test_deterministic_per_seed(raw):
    task = get_task("longchat-lines")
    a, b = (task.generate(raw, 2000, 0.3, 5, 2) for _ in range(2))
    c = task.generate(raw, 2000, 0.3, 6, 2)
    assert a.prompt == b.prompt and a.expected == b.expected
    assert a.prompt != c.prompt


def test_first_number_scorer():
    assert first_number(" <4821> is the number", ["4821"]) == 1.0
    assert first_number(" 482 or 4821", ["4821"]) == 0.0, "only the first number counts"
    assert first_number(" 48210", ["4821"]) == 0.0
    assert first_number(" no idea", ["4821"]) == 0.0


def test_task_stops_after_the_first_number(raw):
    task = get_task("longchat-lines")
    s = task.generate(raw, 1500, 0.5, 0, 0)
    assert not task.is_complete(s, " <123")
    assert task.is_complete(s, " <123>")
    assert task.score(s, f" <{s.expected[0]}>") == 1.0
