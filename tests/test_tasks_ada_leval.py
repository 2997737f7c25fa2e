"""Ada-LEval's TSort and BestAnswer: sizing, determinism, the answer in the input, Ada-LEval's
parsers, and answers files with their one-line errors."""

from __future__ import annotations

import json
import re

import pytest
from fixtures.tinylm import tiny_tokenizer

from longreach.errors import LongreachError
from longreach.tasks import PromptFormat, get_task
from longreach.tasks.ada_leval import extract_designation, parse_permutation


@pytest.fixture(scope="module")
def raw():
    return PromptFormat(tiny_tokenizer(), chat=False)


@pytest.mark.parametrize("name,length", [("tsort", 3000), ("bestanswer", 1200)])
def test_sample_fits_length_and_is_deterministic(raw, name, length):
    task = get_task(name)
    a = task.generate(raw, length, None, 0, 1)
    b = task.generate(raw, length, None, 0, 1)
    c = task.generate(raw, length, None, 1, 1)
    budget = length - a.max_new_tokens
    # a unit: an answer (<= 400 bytes) or the essay's sentence end (<= 120 bytes)
    assert budget - 400 <= a.n_tokens <= budget, a.n_tokens
    assert a.prompt == b.prompt and a.expected == b.expected
    assert a.prompt != c.prompt


def test_tsort_segments_are_the_passage_shuffled(raw):
    s = get_task("tsort").generate(raw, 4000, None, 0, 0)
    order = json.loads(s.expected[0])
    assert sorted(order) == [1, 2, 3, 4] and order != [1, 2, 3, 4]
    shown = dict(re.findall(r"Segment (\d):\n(.*?)\n\n(?=Segment|Text after)", s.prompt, re.S))
    assert len(shown) == 4 and all(shown.values())
    before = s.prompt.split("Text before the passage:\n", 1)[1].split("\n\nSegment 1:", 1)[0]
    after = s.prompt.split("Text after the passage:\n", 1)[1].split("\n\nGive the segment", 1)[0]
    original = " ".join([before] + [shown[str(i)] for i in order] + [after])
    # Read in the answer's order, the segments give back the essay's text, word for word.
    from longreach.tasks.haystack import paul_graham_dir

    essays = " ".join(
        " ".join(p.read_text().split()) for p in sorted(paul_graham_dir().glob("*.txt"))
    )
    assert " ".join(original.split()) in essays
    assert s.prompt.endswith("e.g. [4, 3, 2, 1]. Answer:")


def test_tsort_parser_follows_ada_leval():
    assert parse_permutation(" [2, 1, 4, 3]", 4) == [2, 1, 4, 3]
    assert parse_permutation("Answer: [3,1,2,4]", 4) == [3, 1, 2, 4]
    assert parse_permutation(" the order is 2, 1, 4 and 3", 4) == [2, 1, 4, 3]
    assert parse_permutation(" 1 2 3 4 or 4 3 2 1", 4) is None, "two permutations: no answer"
    assert parse_permutation(" no idea", 4) is None
    task = get_task("tsort")
    sample = type("S", (), {"expected": ["[2, 1, 4, 3]"]})()
    assert task.score(sample, " [2, 1, 4, 3]") == 1.0
    assert task.score(sample, " [2, 1, 3, 4]") == 0.0
    assert task.score(sample, " [2, 1]") == 0.0


def test_bestanswer_lists_the_accepted_answer(raw):
    s = get_task("bestanswer").generate(raw, 1200, None, 0, 0)
    at = int(s.expected[0][1:])
    assert re.fullmatch(r"A\d+", s.expected[0])
    accepted = "Feed it, let it rise for an hour"
    assert re.search(rf"A{at}:\n\n{accepted}", s.prompt)
    assert s.prompt.count("\n\nA") >= s.meta["answers"] - 1
    assert s.prompt.endswith("only the designation of the MOST helpful answer.\nAnswer:")


def test_bestanswer_extraction_follows_ada_leval():
    assert extract_designation(" A3", 5) == "A3"
    assert extract_designation(" A2, not A4", 5) == "A4", "the highest designation found"
    assert extract_designation(" answer 2", 5) == "A2"
    assert extract_designation(" none", 5) is None


def _write(tmp_path, text):
    path = tmp_path / "answers.jsonl"
    path.write_text(text)
    return path


GOOD = {"question": "q?", "answers": ["good", "bad"], "accepted": 0}


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "has no rows"),
        ("{nope\n", "line 1 is not JSON"),
        ("[1]\n", "line 1 is not a JSON object"),
        (json.dumps({"question": "q", "answers": ["a"]}), "has no 'accepted'"),
        (json.dumps({**GOOD, "answers": []}), "'answers' must be a non-empty list"),
        (json.dumps({**GOOD, "accepted": 2}), "'accepted' must be the index"),
        (json.dumps({**GOOD, "accepted": True}), "'accepted' must be the index"),
    ],
)
def test_bad_answers_files_are_one_line_errors(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(LongreachError, match=message) as info:
        get_task(f"bestanswer:file={path}")
    assert "\n" not in str(info.value)


def test_too_short_and_too_long(raw):
    with pytest.raises(LongreachError, match="length 200 is too short for task 'bestanswer'"):
        get_task("bestanswer").generate(raw, 200, None, 0, 0)
    with pytest.raises(LongreachError, match="holds only 16 answers for this length"):
        get_task("bestanswer").generate(raw, 20000, None, 0, 0)
    with pytest.raises(LongreachError, match="tsort segments=12 is out of range"):
        get_task("tsort:segments=12")
