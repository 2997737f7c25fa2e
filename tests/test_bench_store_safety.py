"""Files the store must never destroy, and paths it cannot write: one line each, nothing lost."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_bench_store import _cell
from typer.testing import CliRunner

from longreach.bench.store import ResultStore, stored_keys
from longreach.cli import app
from longreach.errors import LongreachError


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _db_with_cells(path: Path, n: int = 2) -> Path:
    with ResultStore(path) as store:
        run = store.start_run("m", "fp", {}, {})
        for i in range(n):
            store.add(_cell(i), run)
    return path


@contextlib.contextmanager
def unwritable(path: Path):
    """Make ``path`` unwritable even for root (chattr +i), or by its mode for other users."""
    if os.geteuid() != 0:
        os.chmod(path, 0o444)
        try:
            yield
        finally:
            os.chmod(path, 0o644)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: cannot make a file unwritable")
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"chattr +i is not supported here: {made.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def _one_line(result, message: str) -> None:
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert message in text, f"expected {message!r} in: {text}"


# ---- export


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
def test_export_onto_its_own_database_is_refused_and_the_database_kept(tmp_path, suffix):
    db = _db_with_cells(tmp_path / "same.csv")
    before = _md5(db)
    target = Path(str(db) + suffix)
    result = CliRunner().invoke(app, ["export", "--db", str(db), "--out", str(target)])
    _one_line(result, "is the results database itself")
    assert _md5(db) == before, "the database must be byte-identical after a refused export"
    with ResultStore(db, create=False) as store:
        assert store.count() == 2


def test_export_through_another_name_of_the_database_is_refused(tmp_path):
    db = _db_with_cells(tmp_path / "runs.db")
    os.link(db, tmp_path / "alias.csv")
    (tmp_path / "link.jsonl").symlink_to(db)
    with ResultStore(db, create=False) as store:
        for name in ("alias.csv", "link.jsonl"):
            with pytest.raises(LongreachError, match="is the results database itself"):
                store.export(tmp_path / name)
        assert store.count() == 2


def test_export_replaces_a_file_only_with_a_complete_export(tmp_path, monkeypatch):
    db = _db_with_cells(tmp_path / "runs.db", n=3)
    out = tmp_path / "cells.jsonl"
    out.write_text("an older export\n")
    import longreach.bench.store as store_module

    def broken(f, cells, include_prompt):
        f.write("half a line")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module, "_write_jsonl", broken)
    with ResultStore(db, create=False) as store:
        with pytest.raises(LongreachError, match=r"cannot write .*cells.jsonl \(No space left"):
            store.export(out)
    assert out.read_text() == "an older export\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    monkeypatch.undo()
    with ResultStore(db, create=False) as store:
        assert store.export(out) == 3
    assert len(out.read_text().splitlines()) == 3
    assert oct(out.stat().st_mode & 0o777) != oct(0o600), "an export is not a private file"


def test_export_to_a_folder_an_unwritable_place_or_an_immutable_file(tmp_path):
    db = _db_with_cells(tmp_path / "runs.db")
    (tmp_path / "isdir.csv").mkdir()
    run = CliRunner().invoke
    _one_line(
        run(app, ["export", "--db", str(db), "--out", str(tmp_path / "isdir.csv")]),
        "isdir.csv is a folder; pass a file path ending in .jsonl or .csv",
    )
    _one_line(
        run(app, ["export", "--db", str(db), "--out", "/proc/longreach/cells.csv"]),
        "cannot write /proc/longreach/cells.csv",
    )
    immutable = tmp_path / "immutable.csv"
    immutable.write_text("keep me\n")
    with unwritable(immutable):
        if os.geteuid() != 0:
            os.chmod(tmp_path, 0o555)  # a plain user can rename over a read-only file
        try:
            result = run(app, ["export", "--db", str(db), "--out", str(immutable)])
        finally:
            os.chmod(tmp_path, 0o755)
        _one_line(result, f"cannot write {immutable}")
    assert immutable.read_text() == "keep me\n"


# ---- a database that cannot be written


def test_unwritable_database_is_one_line_when_writing_and_fine_for_reading(tmp_path):
    db = _db_with_cells(tmp_path / "ro.db")
    before = _md5(db)
    with unwritable(db):
        with ResultStore(db) as store:
            assert store.count() == 2  # reading works
            with pytest.raises(LongreachError, match=r"ro.db cannot be written \(attempt to write"):
                store.start_run("m", "fp", {}, {})
        assert stored_keys(db) == {_cell(0).key, _cell(1).key}
    assert _md5(db) == before


@pytest.mark.parametrize(
    "path,message",
    [
        ("/proc/longreach/x/y.db", "cannot create /proc/longreach/x/y.db"),
        ("/dev/null", "/dev/null is not a regular file"),
    ],
)
def test_database_paths_that_cannot_hold_a_database(path, message):
    with pytest.raises(LongreachError, match=message):
        ResultStore(path)
    assert not Path("/dev/null-journal").exists()
    with pytest.raises(LongreachError, match="is not a regular file"):
        stored_keys("/dev/null")


def test_stored_keys_reads_without_creating_anything(tmp_path):
    new = tmp_path / "new" / "sub" / "runs.db"
    assert stored_keys(new) == set()
    assert not (tmp_path / "new").exists(), "checking a new path must create nothing"
    db = _db_with_cells(tmp_path / "runs.db")
    assert stored_keys(db) == {_cell(0).key, _cell(1).key}
    (tmp_path / "zero.db").touch()
    assert stored_keys(tmp_path / "zero.db") == set()
    (tmp_path / "text.db").write_text("not sqlite")
    with pytest.raises(LongreachError, match="is not a SQLite database"):
        stored_keys(tmp_path / "text.db")
