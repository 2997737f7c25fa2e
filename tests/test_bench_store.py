"""The SQLite results store: keys, resume, refusing foreign or corrupt files untouched, export."""

from __future__ import annotations

import csv
import json
import os
import sqlite3

import pytest

from longreach.bench.store import FORMAT_NAME, Cell, ResultStore, cell_key
from longreach.errors import LongreachError


def _cell(idx: int = 0, score: float = 1.0, **over) -> Cell:
    values = dict(
        model="m",
        model_fingerprint="fp",
        method="vanilla",
        task="passkey:haystack=synthetic",
        prompt_format="raw",
        length=1024,
        depth=0.5,
        seed=0,
        idx=idx,
        metric="accuracy",
        score=score,
        expected=["12345"],
        output=" 12345.",
        prompt="a long prompt",
        context_tokens=1020,
        prefill_s=0.5,
        meta={"needle_depths": [0.5]},
    )
    values.update(over)
    return Cell(**values)


def test_new_database_roundtrip(tmp_path):
    path = tmp_path / "sub" / "runs.db"
    with ResultStore(path) as store:
        run = store.start_run("m", "fp", {"lengths": [1024]}, {"torch": "x"})
        assert store.add(_cell(0), run)
        assert store.add(_cell(1, score=0.0), run)
        assert not store.add(_cell(1, score=0.5), run), "a stored key is never overwritten"
    with ResultStore(path) as store:
        cells = store.cells()
        assert [(c.idx, c.score) for c in cells] == [(0, 1.0), (1, 0.0)]
        assert cells[0].expected == ["12345"] and cells[0].meta == {"needle_depths": [0.5]}
        assert cells[0].run_id == run and cells[0].created_at
        assert store.done_keys() == {_cell(0).key, _cell(1).key}
        assert store.runs()[0]["config"] == {"lengths": [1024]}
        mode = store.conn.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"


def test_key_covers_every_key_field():
    base = _cell()
    assert base.key == cell_key(
        "fp", "vanilla", "passkey:haystack=synthetic", "raw", 1024, 0.5, 0, 0
    )
    changed = [
        _cell(model_fingerprint="fp2"),
        _cell(method="yarn:factor=4"),
        _cell(task="niah:haystack=pg"),
        _cell(prompt_format="chat"),
        _cell(length=2048),
        _cell(depth=0.1),
        _cell(depth=None),
        _cell(seed=1),
        _cell(idx=1),
    ]
    assert len({c.key for c in changed} | {base.key}) == len(changed) + 1
    assert _cell(score=0.0, output="x").key == base.key  # results are not part of the key


def _untouched(path, action):
    before = (path.read_bytes(), os.stat(path).st_mtime_ns)
    siblings = sorted(p.name for p in path.parent.iterdir())
    action()
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before, "the file was modified"
    assert sorted(p.name for p in path.parent.iterdir()) == siblings, "files were created"


def test_text_file_is_refused_untouched(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("these are my notes, not a database\n")

    def open_it():
        with pytest.raises(LongreachError, match="is not a SQLite database .* left untouched"):
            ResultStore(path)

    _untouched(path, open_it)


def test_foreign_sqlite_is_refused_untouched(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (k TEXT, v TEXT)")
    conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.commit()
    conn.close()

    def open_it():
        with pytest.raises(LongreachError, match="SQLite database of another program .*customers"):
            ResultStore(path)

    _untouched(path, open_it)


def test_corrupt_database_is_refused_untouched(tmp_path):
    path = tmp_path / "runs.db"
    with ResultStore(path) as store:
        run = store.start_run("m", "fp", {}, {})
        for i in range(200):
            store.add(_cell(i, prompt="x" * 2000), run)
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"runs.db{suffix}").unlink(missing_ok=True)
    data = bytearray(path.read_bytes())
    data[4096 * 3 : 4096 * 6] = b"\xff" * (4096 * 3)  # smash pages of the cells table
    path.write_bytes(bytes(data))

    def open_it():
        with pytest.raises(LongreachError, match="is a corrupt SQLite database .* left untouched"):
            ResultStore(path)

    _untouched(path, open_it)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "runs.db"
    ResultStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value='99' WHERE name='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(LongreachError, match="written by a newer longreach"):
        ResultStore(path)


def test_missing_database_for_reading(tmp_path):
    with pytest.raises(LongreachError, match="does not exist; run `longreach bench"):
        ResultStore(tmp_path / "none.db", create=False)
    assert not (tmp_path / "none.db").exists()
    with pytest.raises(LongreachError, match="is a folder"):
        ResultStore(tmp_path)


def test_meta_records_the_format(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        meta = dict(store.conn.execute("SELECT name, value FROM meta"))
    assert meta["format"] == FORMAT_NAME and meta["schema_version"] == "1"


def test_export_jsonl_and_csv(tmp_path):
    path = tmp_path / "runs.db"
    with ResultStore(path) as store:
        run = store.start_run("m", "fp", {}, {})
        store.add(_cell(0), run)
        store.add(_cell(1, depth=None, output='a "quoted",\nline'), run)
        assert store.export(tmp_path / "cells.jsonl") == 2
        assert store.export(tmp_path / "cells.csv") == 2
        assert store.export(tmp_path / "full.jsonl", include_prompt=True) == 2
        with pytest.raises(LongreachError, match="name the file .jsonl or .csv"):
            store.export(tmp_path / "cells.txt")
    rows = [json.loads(line) for line in (tmp_path / "cells.jsonl").read_text().splitlines()]
    assert rows[1]["output"] == 'a "quoted",\nline' and rows[1]["depth"] is None
    assert "prompt" not in rows[0] and rows[0]["expected"] == ["12345"]
    full = json.loads((tmp_path / "full.jsonl").read_text().splitlines()[0])
    assert full["prompt"] == "a long prompt"
    with open(tmp_path / "cells.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["idx"] for r in table] == ["0", "1"]
    assert table[1]["output"] == 'a "quoted",\nline' and table[1]["depth"] == ""
    assert json.loads(table[0]["expected"]) == ["12345"]
