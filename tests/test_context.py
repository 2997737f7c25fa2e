"""longreach.Context: one document encoded once, many questions; saved and loaded; and
``bench --questions-per-context``, which stores the shared encoding and each question apart."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from test_bench_store import _cell

import longreach as lr
from longreach import LongreachError
from longreach.bench import BenchConfig, ResultStore, run_bench
from longreach.prefill import advance, greedy, prefill
from longreach.tasks import PromptFormat, get_task
from longreach.tasks.questions import question_set

DOC = (
    "The pass key is 48213. Remember it. 48213 is the pass key. "
    + "The grass is green. The sky is blue. The sun is yellow. Here we go. " * 14
)
QUESTIONS = [
    "\n\nWhat is the pass key? The pass key is",
    "\n\nWhat colour is the sky? The sky is",
    "\n\nWhat is the pass key?",
]


@pytest.fixture(scope="module")
def lab():
    # fp32: a different chunking of the same tokens moves bf16 logits by up to 0.06 (measured
    # on the lab model at 4k), enough to flip a near tie; in fp32 by about 1e-6
    return lr.load("lab", dtype="fp32")


def _ids(tok, text: str, special: bool = False) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


def _fresh_answer(model, tok, doc_ids, q_ids, n, chunk, eos):
    """What one prefill of document + question, then greedy decoding, answers."""
    state = prefill(model, torch.tensor([doc_ids + q_ids]), chunk)
    return greedy(model, state, n, eos)[0].tolist()


def _count_fed_tokens(model):
    fed: list[int] = []

    def hook(module, args, kwargs):
        fed.append(int(kwargs["input_ids"].shape[1]))

    return fed, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("method", ["vanilla", "yarn:factor=4"])
def test_answers_equal_a_fresh_prefill_of_document_and_question(lab, method):
    model, tok = lab
    doc_ids = _ids(tok, DOC, special=True)
    ctx = lr.Context.encode(model, tok, DOC, method=method, chunk=100)
    assert (ctx.length, ctx.reuse) == (len(doc_ids), "crop")
    got = [ctx.ask_ids(_ids(tok, q), 10) for q in [*QUESTIONS, QUESTIONS[0]]]
    assert ctx.cache.get_seq_length() == len(doc_ids), "the cache is cropped back to the document"
    with lr.extend(model, method):
        want = [
            _fresh_answer(model, tok, doc_ids, _ids(tok, q), 10, 100, ctx.eos)
            for q in [*QUESTIONS, QUESTIONS[0]]
        ]
    assert got == want, f"expected the fresh prefill's greedy tokens {want}, got {got}"
    assert got[0] == got[3], "the same question asked again answers the same"
    text = ctx.ask(QUESTIONS[0], 10)
    assert text == tok.decode(want[0], skip_special_tokens=True)
    assert ctx.questions == 5


def test_n_questions_cost_one_encoding(lab):
    model, tok = lab
    doc_ids = _ids(tok, DOC, special=True)
    fed, handle = _count_fed_tokens(model)
    try:
        ctx = lr.Context.encode(model, tok, doc_ids, chunk=64)
        encoded = sum(fed)
        answers = [ctx.answer_ids(_ids(tok, q), 8, stop_at_eos=False) for q in QUESTIONS * 3]
    finally:
        handle.remove()
    assert encoded == len(doc_ids), f"the document is read once: {encoded} != {len(doc_ids)}"
    asked = sum(a.question_tokens + len(a.tokens) - 1 for a in answers)
    assert sum(fed) - encoded == asked, (
        f"9 questions feed only their own tokens and answers ({asked}), got {sum(fed) - encoded}"
    )
    assert max(fed[len(range(0, len(doc_ids), 64)) :]) < 30, (
        "no question call re-reads the document"
    )


def test_stop_strings_cut_the_answer(lab):
    model, tok = lab
    ctx = lr.Context.encode(model, tok, DOC)
    full = ctx.ask(QUESTIONS[1], 12, stop_at_eos=False)
    assert "." in full, f"expected a sentence end in {full!r}"
    cut = ctx.ask(QUESTIONS[1], 12, stop=".", stop_at_eos=False)
    assert cut == full[: full.index(".")], f"expected {full[: full.index('.')]!r}, got {cut!r}"


@pytest.mark.parametrize("method", ["vanilla", "yarn:factor=4"])
def test_a_saved_context_loads_and_answers_exactly(lab, tmp_path, method):
    model, tok = lab
    ctx = lr.Context.encode(model, tok, DOC, method=method, chunk=128)
    path = ctx.save(tmp_path / "doc.ctx")
    loaded = lr.Context.load(path, model, tok)
    q = _ids(tok, QUESTIONS[0])
    diff = (loaded.score_ids(q) - ctx.score_ids(q)).abs().max().item()
    assert diff == 0.0, f"expected identical logits after save/load, max |diff| {diff}"
    assert loaded.ask_ids(q, 10) == ctx.ask_ids(q, 10)
    assert (loaded.length, loaded.method) == (ctx.length, ctx.method)
    assert loaded.method == method.split(":")[0], "the spec names non-default parameters"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["longreach"])
    assert header["tokens"] == ctx.length
    assert header["method"] == ctx.method
    assert header["method_params"].get("factor") == (None if method == "vanilla" else 4)
    assert header["cache_type"] == "DynamicCache"
    assert header["longreach"] == lr.__version__
    assert len(header["model_fingerprint"]) == 16


def test_loading_under_another_model_or_method_is_refused_in_one_line(lab, tmp_path):
    model, tok = lab
    path = lr.Context.encode(model, tok, DOC).save(tmp_path / "doc.ctx")
    with pytest.raises(LongreachError) as wrong_method:
        lr.Context.load(path, model, tok, method="yarn:factor=4")
    message = str(wrong_method.value)
    assert "vanilla" in message and "yarn" in message and "\n" not in message
    other, other_tok = lr.load("lab", dtype="fp32")
    with torch.no_grad():
        other.lm_head.weight[0, 0] += 1.0
    with pytest.raises(LongreachError) as wrong_model:
        lr.Context.load(path, other, other_tok)
    message = str(wrong_model.value)
    assert message.count("fingerprint") == 2 and "\n" not in message, message
    with lr.extend(model, "yarn:factor=4"), pytest.raises(LongreachError, match="yarn.*applied"):
        lr.Context.load(path, model, tok)
    (tmp_path / "junk.ctx").write_bytes(b"not a context")
    with pytest.raises(LongreachError, match="not a saved longreach context"):
        lr.Context.load(tmp_path / "junk.ctx", model, tok)


@pytest.mark.parametrize(
    "method, cache_type",
    [
        ("streaming:window=64,sinks=4", "StreamingCache"),
        ("snapkv:budget=64", "EvictingCache"),
        ("infllm", "BlockMemoryCache"),
    ],
)
def test_uncroppable_caches_answer_from_a_copy(lab, method, cache_type):
    """Each question runs on a copy: the document's cache stays as encoded, and an answer is
    the one a single prefill of the document (same chunks) followed by the question gives."""
    model, tok = lab
    doc_ids = _ids(tok, DOC, special=True)
    ctx = lr.Context.encode(model, tok, doc_ids, method=method, chunk=64)
    assert (type(ctx.cache).__name__, ctx.reuse) == (cache_type, "copy")
    length_before = ctx.cache.get_seq_length()
    first = ctx.ask_ids(_ids(tok, QUESTIONS[0]), 8)
    ctx.ask_ids(_ids(tok, QUESTIONS[1]), 8)
    again = ctx.ask_ids(_ids(tok, QUESTIONS[0]), 8)
    assert ctx.cache.get_seq_length() == length_before
    with lr.extend(model, method) as handle:
        state = prefill(model, torch.tensor([doc_ids]), 64, cache=handle.new_cache())
        advance(model, state, torch.tensor([_ids(tok, QUESTIONS[0])]), 64)
        want = greedy(model, state, 8, ctx.eos)[0].tolist()
    assert first == again == want, f"expected {want}, got {first} then {again}"
    with pytest.raises(LongreachError, match=f"{cache_type} is not supported") as refused:
        ctx.save("unused.ctx")
    assert "\n" not in str(refused.value)


def test_readers_and_conflicting_methods_are_refused(lab):
    model, tok = lab
    with pytest.raises(LongreachError, match="infiniretri reads the document anew"):
        lr.Context.encode(model, tok, DOC, method="infiniretri")
    ctx = lr.Context.encode(model, tok, DOC)
    with lr.extend(model, "yarn:factor=4"), pytest.raises(LongreachError, match="remove it first"):
        ctx.ask(QUESTIONS[0], 4)
    with pytest.raises(LongreachError, match="empty"):
        ctx.ask_ids([], 4)


# --------------------------------------------------------------------------- the bench mode


@pytest.mark.parametrize("spec", ["passkey", "niah:haystack=synthetic", "kv-retrieval"])
def test_a_question_set_shares_one_document(lab, spec):
    _, tok = lab
    fmt = PromptFormat(tok)
    qs = question_set(get_task(spec), fmt, 1024, 0.2, 0, 3, 5)
    assert len(qs.samples) == 5 and len({s.expected[0] for s in qs.samples}) == 5
    for sample, ids in zip(qs.samples, qs.question_ids, strict=True):
        assert sample.input_ids == qs.document_ids + ids
        assert sample.input_ids == fmt.encode(sample.prompt), "the pair tokenizes as one prompt"
        assert sample.expected[0] in qs.document
        assert 900 < sample.n_tokens <= 1024, sample.n_tokens
    again = question_set(get_task(spec), fmt, 1024, 0.2, 0, 3, 5)
    assert again.document_ids == qs.document_ids, "generated deterministically"


def test_bench_encodes_each_context_once_and_stores_both_costs(lab, tmp_path):
    model, tok = lab
    db = tmp_path / "q.db"
    config = BenchConfig(
        model="lab", tasks=["passkey"], lengths=[512], samples=2, db=str(db),
        questions_per_context=3,
    )  # fmt: skip
    fed, handle = _count_fed_tokens(model)
    try:
        result = run_bench(config, model=model, tokenizer=tok)
    finally:
        handle.remove()
    assert (result.total, result.computed) == (6, 6)
    with ResultStore(db) as store:
        cells = store.cells()
    assert [(c.idx, c.question, c.context_questions) for c in cells] == [
        (i, q, 3) for i in range(2) for q in range(3)
    ]
    documents = [c.meta["document_tokens"] for c in cells]
    assert all(c.shared_prefix_tokens == d for c, d in zip(cells, documents, strict=True))
    assert sum(fed) == documents[0] + documents[3] + sum(
        c.context_tokens - c.shared_prefix_tokens + c.new_tokens - 1 for c in cells
    ), "each document is read once, each question and answer once"
    encodes = [c.context_encode_s for c in cells]
    assert all(e is not None and e > 0 for e in encodes[::3]), encodes
    assert all(e is None for i, e in enumerate(encodes) if i % 3), "stored once per context"
    assert all(c.prefill_s is not None and c.prefill_s > 0 for c in cells)
    assert len({tuple(c.expected) for c in cells}) == 6
    key = json.loads(cells[1].key)
    assert key[-2:] == [3, 1] and len(key) == 10
    rerun = run_bench(config, model=model, tokenizer=tok)
    assert (rerun.computed, rerun.skipped) == (0, 6), "a rerun recomputes nothing"
    plain = run_bench(
        BenchConfig(model="lab", tasks=["passkey"], lengths=[512], samples=1, db=str(db)),
        model=model, tokenizer=tok,
    )  # fmt: skip
    assert plain.computed == 1, "the ordinary cell has its own key"


def test_bench_refuses_tasks_without_questions_in_one_line(lab, tmp_path):
    model, tok = lab
    config = BenchConfig(
        model="lab", tasks=["vt"], lengths=[512], samples=1, db=str(tmp_path / "x.db"),
        questions_per_context=4,
    )  # fmt: skip
    with pytest.raises(LongreachError, match="vt does not") as refused:
        run_bench(config, model=model, tokenizer=tok)
    assert "\n" not in str(refused.value)
    with pytest.raises(LongreachError, match="at least 1"):
        run_bench(
            BenchConfig(model="lab", db=str(tmp_path / "y.db"), questions_per_context=0),
            model=model, tokenizer=tok,
        )  # fmt: skip


def test_a_database_without_the_question_columns_still_reads(tmp_path):
    db = tmp_path / "old.db"
    with ResultStore(db) as store:
        store.add(_cell(0), store.start_run("m", "fp", {}, {}))
        old_key = store.cells()[0].key
    conn = sqlite3.connect(db)
    for column in ("context_questions", "question", "context_encode_s"):
        conn.execute(f"ALTER TABLE cells DROP COLUMN {column}")
    conn.commit()
    conn.close()
    with ResultStore(db) as store:
        (cell,) = store.cells()
    assert (cell.context_questions, cell.question, cell.context_encode_s) == (None, None, None)
    assert cell.key == old_key and len(json.loads(old_key)) == 8


def test_the_cli_flag_runs_and_refuses_an_endpoint(tmp_path):
    from typer.testing import CliRunner

    from longreach.cli import app

    db = tmp_path / "cli.db"
    args = ["bench", "--model", "lab", "--task", "kv-retrieval", "--lengths", "1k"]
    args += ["--samples", "1", "--questions-per-context", "3", "--db", str(db)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "3 cells computed, 0 already in" in " ".join(result.output.split())
    with ResultStore(db) as store:
        assert [c.question for c in store.cells()] == [0, 1, 2]
    refused = CliRunner().invoke(
        app, [*args, "--endpoint", "http://127.0.0.1:9/v1", "--served-model", "lab"]
    )
    assert refused.exit_code == 2 and "Traceback" not in refused.output, refused.output
    assert "--questions-per-context runs in-process" in " ".join(refused.output.split())
