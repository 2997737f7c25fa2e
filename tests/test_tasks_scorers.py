"""Scorers and answer-completion rules: exact values on hand-made outputs."""

from __future__ import annotations

import pytest

from longreach.tasks import get_task
from longreach.tasks.base import Sample
from longreach.tasks.scorers import (
    contains,
    contains_all,
    fraction_numbers,
    normalize_answer,
    number_match,
    qa_f1,
    words_all,
)


def _sample(expected: list[str]) -> Sample:
    return Sample("t", 10, 0.5, 0, 0, "raw", "", [], expected, 10)


def test_number_match_needs_the_whole_number():
    assert number_match(" 12345.", ["12345"]) == 1.0
    assert number_match(" 123456", ["12345"]) == 0.0
    assert number_match(" the key is 1234 5", ["12345"]) == 0.0
    assert number_match("", ["12345"]) == 0.0


def test_fraction_numbers():
    assert (
        fraction_numbers("1111111, 2222222 and 9", ["1111111", "2222222", "3333333", "4444444"])
        == 0.5
    )


def test_contains_and_contains_all():
    assert contains("The value is ABC-def", ["abc-DEF"]) == 1.0
    assert contains("nothing", ["abc", "def"]) == 0.0
    assert contains_all("x y", ["x", "z"]) == 0.5


def test_words_all_matches_whole_words():
    assert words_all("ABCDE, FGHIJ", ["ABCDE", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)
    assert words_all("ABCDEF", ["ABCDE"]) == 0.0


def test_qa_f1_longbench_rule():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert qa_f1("Tomas Varga", ["Tomas Varga"]) == 1.0
    # precision 1/2, recall 1/1 -> F1 2/3; the max over references is taken
    assert qa_f1("Varga built", ["nobody", "Varga"]) == pytest.approx(2 / 3)
    assert qa_f1("\nVarga\nand more", ["Varga"]) == 1.0  # only the first line counts


def test_completion_rules():
    passkey = get_task("passkey")
    s = _sample(["12345"])
    assert not passkey.is_complete(s, " 123")
    assert passkey.is_complete(s, " 12345.")
    assert passkey.is_complete(s, " no number\n")
    multi = get_task("multi-needle:k=2")
    assert not multi.is_complete(s, " 1111111, 22")
    assert multi.is_complete(s, " 1111111, 2222222,")
    assert not multi.is_complete(s, ":\n")  # a list may follow on the next lines
    assert not multi.is_complete(s, " 1111111\n")
    kv = get_task("kv-retrieval")
    assert kv.is_complete(s, ' "0b5e2c3a-1f6d-4d8e-9a7b-3c2d1e0f9a8b"')
    assert not kv.is_complete(s, ' "0b5e2c3a-1f6d')
    vt = get_task("variable-tracking")
    assert vt.is_complete(_sample(["ABCDE", "FGHIJ"]), " ABCDE, FGHIJ")
    assert not vt.is_complete(_sample(["ABCDE", "FGHIJ"]), " ABCDE,")
