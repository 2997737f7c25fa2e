"""Scorers: small named functions from (model output, expected answers) to a score in [0, 1].

- ``number_match``: the expected number is one of the digit runs in the output (passkey, NIAH).
- ``first_number``: the first digit run of the output is the expected number (LongChat-Lines).
- ``fraction_numbers``: share of expected numbers among the output's digit runs (multi-needle).
- ``contains``: any expected string occurs in the output, case-insensitively (LongBench's
  classification/retrieval "contains" and RULER's ``string_match_part``).
- ``contains_all``: share of expected strings that occur in the output (RULER's
  ``string_match_all``: variable tracking, multi-value needles).
- ``string_match_all`` / ``string_match_part``: RULER's own names, exactly its definitions:
  the mean (all) or the maximum (part) over the references of "the reference, lower-cased, is
  a substring of the lower-cased output".
- ``words_all``: like ``contains_all`` but whole words only, so "ABCDE" is not found in "ABCDEF".
- ``qa_f1``: LongBench's token F1 of normalized answers (lower case, no punctuation, no
  articles), the maximum over the reference answers (SQuAD's rule).
"""

from __future__ import annotations

import re
import string
from collections import Counter

_DIGITS = re.compile(r"\d+")


def number_match(output: str, expected: list[str]) -> float:
    runs = set(_DIGITS.findall(output))
    return 1.0 if expected and expected[0] in runs else 0.0


def fraction_numbers(output: str, expected: list[str]) -> float:
    if not expected:
        return 0.0
    runs = set(_DIGITS.findall(output))
    return sum(1.0 for e in expected if e in runs) / len(expected)


def first_number(output: str, expected: list[str]) -> float:
    """Giraffe's LongChat-Lines rule: the first digit run of the output is the expected number."""
    first = _DIGITS.search(output)
    return 1.0 if expected and first is not None and first.group() == expected[0] else 0.0


def contains(output: str, expected: list[str]) -> float:
    low = output.lower()
    return 1.0 if any(e.lower() in low for e in expected if e) else 0.0


def contains_all(output: str, expected: list[str]) -> float:
    if not expected:
        return 0.0
    low = output.lower()
    return sum(1.0 for e in expected if e.lower() in low) / len(expected)


# RULER's names for the same two rules (its evaluate.py scores niah/vt/cwe/fwe and qa so).
string_match_all = contains_all
string_match_part = contains


def words_all(output: str, expected: list[str]) -> float:
    if not expected:
        return 0.0
    words = set(re.findall(r"\w+", output.lower()))
    return sum(1.0 for e in expected if e.lower() in words) / len(expected)


def normalize_answer(text: str) -> str:
    """LongBench / SQuAD normalization: lower case, drop punctuation and articles, squeeze spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1(prediction: str, reference: str) -> float:
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred)
    recall = same / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_f1(output: str, expected: list[str]) -> float:
    # LongBench scores only the first line of a QA prediction.
    first = output.lstrip("\n").split("\n")[0]
    return max((f1(first, ref) for ref in expected), default=0.0)


SCORERS = {
    "number": number_match,
    "numbers": fraction_numbers,
    "first_number": first_number,
    "contains": contains,
    "contains_all": contains_all,
    "words_all": words_all,
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "qa_f1": qa_f1,
}
