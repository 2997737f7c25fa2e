"""RULER's 13 tasks: sizing to the length, determinism, templates, answers in the input, scorers,
QA files and their errors."""

from __future__ import annotations

import json
import pickle
import re
from collections import Counter

import pytest
from fixtures.tinylm import tiny_tokenizer

from longreach.errors import LongreachError
from longreach.tasks import RULER_NAMES, TASKS, PromptFormat, get_task
from longreach.tasks.ruler import DEPTHS, SHIPPED_QA, load_qa_file, zeta
from longreach.tasks.scorers import string_match_all, string_match_part


@pytest.fixture(scope="module")
def raw():
    return PromptFormat(tiny_tokenizer(), chat=False)


# Lengths in byte tokens (the tiny tokenizer: one token per byte). cwe at 9000 takes RULER's
# settings for 4096 tokens and more; the QA fixtures hold about 3.6k and 2.3k bytes of documents.
CASES = {
    "niah_single_1": 2000,
    "niah_single_2": 2000,
    "niah_single_3": 2000,
    "niah_multikey_1": 2000,
    "niah_multikey_2": 2000,
    "niah_multikey_3": 2500,
    "niah_multivalue": 2000,
    "niah_multiquery": 2000,
    "vt": 2000,
    "cwe": 9000,
    "fwe": 2000,
    "qa_1": 2500,
    "qa_2": 2000,
}
# The haystack comes in units: a noise line (89 bytes), a distractor needle (~100), a QA
# document (~300, up to 470 in qa_1), a list word; the essay ends at a sentence end (<=120).
UNIT = {"qa_1": 480, "qa_2": 480}
TOLERANCE = 130


def test_the_thirteen_tasks_are_registered():
    assert RULER_NAMES == (
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
        "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery",
        "vt", "cwe", "fwe", "qa_1", "qa_2",
    )  # fmt: skip
    assert set(RULER_NAMES) <= set(TASKS) and set(CASES) == set(RULER_NAMES)


@pytest.mark.parametrize("name", RULER_NAMES)
def test_sample_fits_length_with_its_generation_and_holds_the_answer(raw, name):
    length = CASES[name]
    task = get_task(name)
    sample = task.generate(raw, length, None, seed=0, index=1)
    gen = sample.max_new_tokens
    assert sample.input_ids == raw.encode(sample.prompt)
    # RULER's sizing: prompt tokens + tokens to generate <= length, within one haystack unit.
    budget = length - gen
    assert budget - UNIT.get(name, TOLERANCE) <= sample.n_tokens <= budget, (
        f"{name}: {sample.n_tokens} tokens, expected in "
        f"[{budget - UNIT.get(name, TOLERANCE)}, {budget}]"
    )
    assert sample.expected, f"{name}: no expected answer"
    for answer in sample.expected:
        assert answer.lower() in sample.prompt.lower(), f"{name}: {answer!r} is not in the input"
    assert sample.task == task.spec() and sample.depth is None


@pytest.mark.parametrize("name", RULER_NAMES)
def test_generation_is_deterministic_per_seed(raw, name):
    task = get_task(name)
    length = CASES[name]
    a = task.generate(raw, length, None, seed=3, index=0)
    b = task.generate(raw, length, None, seed=3, index=0)
    c = task.generate(raw, length, None, seed=4, index=0)
    assert a.prompt == b.prompt and a.expected == b.expected
    assert a.prompt != c.prompt, f"{name}: another seed must give another sample"


def test_tokens_to_generate_are_ruler_s():
    gens = {name: TASKS[name].max_new_tokens for name in RULER_NAMES}
    assert gens == {
        **{n: 128 for n in RULER_NAMES if n.startswith("niah")},
        "vt": 30,
        "cwe": 120,
        "fwe": 50,
        "qa_1": 32,
        "qa_2": 32,
    }


def test_ruler_depths():
    assert len(DEPTHS) == 40 and DEPTHS[:4] == (0, 3, 5, 8) and DEPTHS[-2:] == (97, 100)


# ---------------------------------------------------------------- templates


def test_single_needle_template_is_singular(raw):
    s = get_task("niah_single_1").generate(raw, 1500, None, 0, 0)
    value = s.expected[0]
    assert re.fullmatch(r"\d{7}", value)
    assert s.prompt.startswith(
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\nThe grass is green. The sky is blue."
    )
    key = s.meta["query"]
    assert re.fullmatch(r"[a-z]+-[a-z]+", key)
    assert f"\nOne of the special magic numbers for {key} is: {value}.\n" in s.prompt
    assert s.prompt.endswith(
        f"\nWhat is the special magic number for {key} mentioned in the provided text? "
        f"The special magic number for {key} mentioned in the provided text is"
    )


def test_multiquery_template_is_plural_and_lists_keys(raw):
    s = get_task("niah_multiquery").generate(raw, 2000, None, 0, 0)
    assert s.prompt.startswith("Some special magic numbers are hidden within the following text.")
    keys = s.meta["query"].replace(", and ", ", ").split(", ")
    assert len(keys) == 4 and len(s.expected) == 4
    for key, value in zip(keys, s.expected, strict=True):
        assert f"One of the special magic numbers for {key} is: {value}." in s.prompt
    assert s.prompt.endswith("mentioned in the provided text are")
    assert f"What are all the special magic numbers for {s.meta['query']} mentioned" in s.prompt


def test_multivalue_hides_four_values_of_one_key(raw):
    s = get_task("niah_multivalue").generate(raw, 2000, None, 0, 0)
    key = s.meta["query"]
    assert len(s.expected) == 4
    assert s.prompt.count(f"One of the special magic numbers for {key} is: ") == 4


def test_multikey_needle_haystack_has_distractors_with_other_keys(raw):
    s = get_task("niah_multikey_3").generate(raw, 3000, None, 0, 0)
    needles = re.findall(
        r"One of the special magic uuids for ([0-9a-f-]{36}) is: ([0-9a-f-]{36})\.", s.prompt
    )
    assert len(needles) > 10
    keys = Counter(k for k, _ in needles)
    assert keys[s.meta["query"]] == 1, "the asked key must be stated exactly once"
    assert dict(needles)[s.meta["query"]] == s.expected[0]


def test_multikey_1_has_four_keys_in_essays(raw):
    s = get_task("niah_multikey_1").generate(raw, 3000, None, 0, 0)
    assert (
        len(re.findall(r"One of the special magic numbers for [a-z]+-[a-z]+ is: \d{7}\.", s.prompt))
        == 4
    )
    assert "The grass is green" not in s.prompt  # an essay haystack


def test_variable_tracking_chain_and_example(raw):
    s = get_task("vt").generate(raw, 2500, None, 0, 0)
    first, *rest = s.expected
    assert len(s.expected) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in s.expected)
    value = re.search(rf"VAR {first} = (\d{{5}})\n", s.prompt).group(1)
    for prev, name in zip(s.expected, rest, strict=False):
        assert f"\nVAR {name} = VAR {prev}\n" in s.prompt
    # One solved example with 3-letter names comes first, then the real question.
    example = re.search(r"they are: ((?:[A-Z]{3} ){4}[A-Z]{3})\n\nMemorize", s.prompt)
    assert example is not None, "the solved example is missing"
    assert s.prompt.endswith(
        f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
        "Answer: According to the chain(s) of variable assignment in the text above, 5 variables "
        f"are assigned the value {value}, they are:"
    )


@pytest.mark.parametrize("length,freq", [(2000, (6, 1)), (9000, (30, 3))])
def test_common_words_counts(raw, length, freq):
    s = get_task("cwe").generate(raw, length, None, 0, 0)
    main = s.prompt.rsplit("Memorize the ones that appear most often.\n", 1)[1]
    listing = main.split("\nQuestion:")[0]
    counts = Counter(re.findall(r"\d+\. ([a-z]+)", listing))
    assert {counts[w] for w in s.expected} == {freq[0]}
    assert {c for w, c in counts.items() if w not in s.expected} == {freq[1]}
    assert s.prompt.endswith(
        "Question: What are the 10 most common words in the above list? Answer: The top 10 "
        "words that appear most often in the list are:"
    )
    # the solved example (its own words) precedes the list
    assert s.prompt.count("Below is a numbered list of words.") == 2


def test_frequent_words_follow_zipf(raw):
    s = get_task("fwe").generate(raw, 4000, None, 0, 0)
    text = s.prompt.split("coded words. ", 1)[1].split("\nQuestion:")[0]
    counts = Counter(text.split())
    ranked = [w for w, _ in counts.most_common(4)]
    assert ranked[0] == "..." and ranked[1:] == s.expected
    n = sum(counts.values())
    assert counts["..."] == pytest.approx(n / zeta(2.0), rel=0.05)
    assert abs(zeta(2.0) - 3.141592653589793**2 / 6) < 1e-9


def test_qa_prompt_and_documents(raw):
    s = get_task("qa_1").generate(raw, 2500, None, 0, 4)
    assert s.prompt.startswith(
        "Answer the question based on the given documents. Only give me the answer and do not "
        "output any other words.\n\nThe following are given documents.\n\nDocument 1:\n"
    )
    docs = re.findall(r"Document (\d+):\n", s.prompt)
    assert docs == [str(i + 1) for i in range(len(docs))] and len(docs) == s.meta["documents"]
    rows, _ = load_qa_file(str(SHIPPED_QA["squad"]))
    assert rows[4].documents[0] in s.prompt
    assert s.prompt.endswith(f"\n\nQuestion: {rows[4].question} Answer:")
    two = get_task("qa_2").generate(raw, 2000, None, 0, 0)
    hot, _ = load_qa_file(str(SHIPPED_QA["hotpotqa"]))
    assert all(d in two.prompt for d in hot[0].documents), "both gold documents"


# ---------------------------------------------------------------- scorers


def test_string_match_all_and_part():
    refs = ["1234567", "Alpha-Beta", "XYZ"]
    assert string_match_all("the numbers are 1234567 and alpha-beta", refs) == pytest.approx(2 / 3)
    assert string_match_all("1234567 ALPHA-BETA xyz", refs) == 1.0
    assert string_match_all("nothing", refs) == 0.0
    assert string_match_all("12345678", ["1234567"]) == 1.0  # substring, as RULER's
    assert string_match_part("it is xyz", refs) == 1.0
    assert string_match_part("it is none", refs) == 0.0
    assert string_match_part("The Cello.", ["the cello", "cello"]) == 1.0


def test_task_scores_and_stops_when_the_score_is_one(raw):
    task = get_task("niah_multivalue")
    s = task.generate(raw, 2000, None, 0, 0)
    half = " " + ", ".join(s.expected[:2])
    assert task.score(s, half) == 0.5
    assert not task.is_complete(s, half + "\n")  # more values may follow on later lines
    assert task.is_complete(s, " " + " ".join(s.expected))
    qa = get_task("qa_2")
    q = qa.generate(raw, 2000, None, 0, 0)
    assert q.expected == ["the Ostra", "Ostra"]
    assert qa.score(q, " The OSTRA, I think") == 1.0 and qa.score(q, " the Rhine") == 0.0


# ---------------------------------------------------------------- errors


def test_length_too_short_is_one_line(raw):
    with pytest.raises(
        LongreachError,
        match=r"length 300 is too short for task 'niah_single_1'.* at least \d+ tokens",
    ):
        get_task("niah_single_1").generate(raw, 300, None, 0, 0)


def test_qa_file_too_small_for_the_length(raw):
    with pytest.raises(
        LongreachError, match=r"QA file qa_hotpot_tiny.jsonl holds only 12 documents"
    ):
        get_task("qa_2").generate(raw, 20000, None, 0, 0)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = {"question": "q?", "answers": ["a"], "documents": ["doc with a"]}


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "has no rows"),
        ("\n\n", "has no rows"),
        ('{"question": "q"\n', "line 1 is not JSON"),
        (json.dumps(GOOD) + "\n[1, 2]\n", "line 2 is not a JSON object"),
        (json.dumps({"question": "q", "answers": ["a"]}), "has no 'documents'"),
        (json.dumps({"documents": ["d"]}), "has no 'question', 'answers'"),
        (json.dumps({**GOOD, "answers": []}), "'answers' is empty"),
        (json.dumps({**GOOD, "answers": "a"}), "'answers' must be a list of non-empty strings"),
        (json.dumps({**GOOD, "documents": ["", "x"]}), "'documents' must be a list"),
        (json.dumps({**GOOD, "question": ""}), "'question' must be a non-empty string"),
    ],
)
def test_bad_qa_files_are_one_line_errors(tmp_path, content, message):
    path = _write(tmp_path, "bad.jsonl", content)
    with pytest.raises(LongreachError, match=message) as info:
        get_task(f"qa_1:file={path}")
    assert "\n" not in str(info.value)


def test_missing_qa_file_is_an_error(tmp_path):
    with pytest.raises(LongreachError, match="cannot read QA file"):
        get_task(f"qa_1:file={tmp_path / 'none.jsonl'}")


def test_user_qa_file_is_named_by_content(raw, tmp_path):
    rows = [dict(GOOD, question=f"q{i}?", documents=[f"document {i} with a"]) for i in range(30)]
    path = _write(tmp_path, "mine.jsonl", "\n".join(json.dumps(r) for r in rows))
    task = get_task(f"qa_1:file={path}")
    assert re.fullmatch(r"qa_1:file=mine\.jsonl@[0-9a-f]{10}", task.spec())
    s = task.generate(raw, 900, None, 0, 2)
    assert "document 2 with a" in s.prompt and s.expected == ["a"]


def test_fixtures_hold_their_answers():
    for spec in SHIPPED_QA:
        rows, _ = load_qa_file(str(SHIPPED_QA[spec]))
        for row in rows:
            text = " ".join(row.documents).lower()
            assert any(a.lower() in text for a in row.answers), row.question
        assert len(rows) == {"squad": 12, "hotpotqa": 6}[spec]


def test_needle_tasks_have_ruler_s_parameters():
    table = {
        name: (cls.haystack_kind, cls.key_type, cls.value_type, cls.num_k, cls.num_v, cls.num_q)
        for name, cls in TASKS.items()
        if name.startswith("niah_")
    }
    assert table == {
        "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
        "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
        "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
        "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
        "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
        "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
        "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
        "niah_multiquery": ("essay", "words", "numbers", 1, 1, 4),
    }


@pytest.mark.parametrize("name", RULER_NAMES)
def test_tasks_pickle_for_remote_workers(name):
    task = get_task(name)
    again = pickle.loads(pickle.dumps(task))
    assert again == task and again.spec() == task.spec()
