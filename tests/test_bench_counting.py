"""Every cell records tokens, characters and words of its input; databases written before the
words column existed open, gain it where writable and read it as empty where not."""

from __future__ import annotations

import sqlite3

import pytest
from fixtures.tinylm import one_thread, tiny_lm, tiny_tokenizer  # noqa: F401
from test_bench_store import _cell
from test_bench_store_safety import unwritable

from longreach.bench import BenchConfig, ResultStore, run_bench
from longreach.tasks import PromptFormat, get_task


def _old_database(path):
    """A database as longreach wrote it before ``context_words``: the column dropped."""
    with ResultStore(path) as store:
        run = store.start_run("m", "fp", {}, {})
        store.add(_cell(0, context_chars=40), run)
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE cells DROP COLUMN context_words")
    conn.commit()
    conn.close()
    return path


def _columns(path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {row[1] for row in conn.execute("PRAGMA table_info(cells)")}
    finally:
        conn.close()


def test_sample_meta_counts_characters_and_words():
    fmt = PromptFormat(tiny_tokenizer(), chat=False)
    sample = get_task("niah_single_1").generate(fmt, 1000, None, 0, 0)
    context = sample.prompt.split("afterwards.\n", 1)[1].rsplit("\nWhat is", 1)[0]
    assert sample.meta["context_chars"] == len(context)
    assert sample.meta["context_words"] == len(context.split())


def test_old_database_gains_the_words_column(tmp_path):
    db = _old_database(tmp_path / "old.db")
    assert "context_words" not in _columns(db)
    with ResultStore(db) as store:
        (old,) = store.cells()
        assert (old.context_chars, old.context_words) == (40, None)
        store.add(_cell(1, context_chars=50, context_words=9), store.start_run("m", "fp", {}, {}))
        stored = {c.idx: (c.context_chars, c.context_words) for c in store.cells()}
    assert stored == {0: (40, None), 1: (50, 9)}
    assert "context_words" in _columns(db)


def test_read_only_old_database_reads_words_as_empty(tmp_path):
    db = _old_database(tmp_path / "ro.db")
    with unwritable(db):
        with ResultStore(db) as store:
            (cell,) = store.cells()
            assert cell.context_words is None and cell.context_chars == 40
    assert "context_words" not in _columns(db), "a read-only database is never changed"


@pytest.mark.usefixtures("one_thread")
def test_bench_cells_store_tokens_chars_and_words(tmp_path):
    config = BenchConfig(
        model="tiny", tasks=["passkey"], lengths=[300], depths=[0.5], samples=1,
        db=str(tmp_path / "runs.db"),
    )  # fmt: skip
    run_bench(config, model=tiny_lm(), tokenizer=tiny_tokenizer())
    with ResultStore(config.db) as store:
        (cell,) = store.cells()
    context = cell.prompt.split("there.\n\n", 1)[1].rsplit("\n\nWhat is the pass key?", 1)[0]
    assert cell.context_tokens == len(tiny_tokenizer()(cell.prompt)["input_ids"])
    assert (cell.context_chars, cell.context_words) == (len(context), len(context.split()))


def test_report_table_shows_chars_and_words_next_to_tokens(tmp_path):
    from longreach.bench.report import write_report

    db = tmp_path / "runs.db"
    with ResultStore(db) as store:
        store.add(
            _cell(0, context_chars=4321, context_words=777), store.start_run("m", "fp", {}, {})
        )
    page = write_report(db, tmp_path / "report").index.read_text()
    header = page.index(">tokens<")
    assert header < page.index(">chars<") < page.index(">words<"), "chars and words follow tokens"
    assert ">4321<" in page and ">777<" in page
