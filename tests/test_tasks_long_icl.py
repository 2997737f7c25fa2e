"""Long in-context learning: rounds of one demonstration per label fill the length, the test
item is never its own demonstration, labels can be limited, exact-match scoring, file errors."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from fixtures.tinylm import tiny_tokenizer

from longreach.errors import LongreachError
from longreach.tasks import PromptFormat, get_task

DEMO = re.compile(r"text: (.*)\nlabel: (\w+)\n")


@pytest.fixture(scope="module")
def raw():
    return PromptFormat(tiny_tokenizer(), chat=False)


@pytest.mark.parametrize("length,rounds", [(3000, 1), (6000, 3)])
def test_whole_rounds_fill_the_length(raw, length, rounds):
    s = get_task("long-icl").generate(raw, length, None, 0, 5)
    one_round = 2000  # 24 demonstrations of about 80 bytes
    budget = length - s.max_new_tokens
    assert budget - one_round <= s.n_tokens <= budget, s.n_tokens
    assert s.meta["rounds"] == rounds and s.meta["labels"] == 24
    demos = DEMO.findall(s.prompt)
    assert len(demos) == 24 * rounds
    assert set(Counter(label for _, label in demos).values()) == {rounds}, "one per label per round"
    test = s.prompt.rsplit("text: ", 1)[1]
    assert s.prompt.endswith("label:") and test.split("\n")[0] not in [t for t, _ in demos]
    assert s.expected[0] in {label for _, label in demos}


def test_deterministic_and_labels_limit(raw):
    task = get_task("long-icl:labels=4")
    a, b = (task.generate(raw, 1200, None, 0, 2) for _ in range(2))
    assert a.prompt == b.prompt
    assert a.meta["labels"] == 4 and len({lab for _, lab in DEMO.findall(a.prompt)}) == 4
    assert task.spec() == "long-icl:file=tiny,labels=4"
    with pytest.raises(LongreachError, match="labels=30 is out of range"):
        get_task("long-icl:labels=30")


def test_exact_match_on_the_first_line(raw):
    task = get_task("long-icl")
    s = task.generate(raw, 3000, None, 0, 0)
    assert task.score(s, f" {s.expected[0].upper()}\ntext: more") == 1.0
    assert task.score(s, f" {s.expected[0]}_extra") == 0.0
    assert task.score(s, "") == 0.0


def test_too_short_and_too_long(raw):
    with pytest.raises(LongreachError, match="not one round of 24 demonstrations fits"):
        get_task("long-icl").generate(raw, 1000, None, 0, 0)
    with pytest.raises(LongreachError, match="holds only 5 rounds"):
        get_task("long-icl").generate(raw, 20000, None, 0, 0)


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "fewer than two labels"),
        ('{"text": "a", "label": "x"}\n', "fewer than two labels"),
        ("{bad\n", "line 1 is not JSON"),
        (
            '{"text": "a"}\n',
            "line 1 needs a non-empty string 'text' and a non-empty string 'label'",
        ),
    ],
)
def test_bad_labelled_files(tmp_path, content, message):
    path = tmp_path / "l.jsonl"
    path.write_text(content)
    with pytest.raises(LongreachError, match=message):
        get_task(f"long-icl:file={path}")


def test_user_file_named_by_content(raw, tmp_path):
    rows = [{"text": f"item {i}", "label": f"l{i % 3}"} for i in range(30)]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = get_task(f"long-icl:file={path}")
    assert re.fullmatch(r"long-icl:file=mine\.jsonl@[0-9a-f]{10},labels=0", task.spec())
    assert task.generate(raw, 600, None, 0, 1).expected == ["l1"]
