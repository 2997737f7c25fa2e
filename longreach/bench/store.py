"""The results database: SQLite, one row per sample ("cell"), committed one row at a time.

Every cell is keyed by (model fingerprint, method spec, task spec, prompt format, length,
depth, seed, index). A run killed at any moment (SIGKILL included) loses at most the cell it
was computing: each finished cell is its own committed transaction in WAL mode, and a rerun
skips every key already stored. A file that is not a longreach results database (not SQLite,
corrupt, or another program's SQLite) is refused with one sentence and never written to.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from longreach.errors import LongreachError

FORMAT_NAME = "longreach-results"
SCHEMA_VERSION = 1
_SQLITE_MAGIC = b"SQLite format 3\x00"

_SCHEMA = """
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE runs (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at        TEXT NOT NULL,
    model             TEXT NOT NULL,
    model_fingerprint TEXT NOT NULL,
    config            TEXT NOT NULL,  -- JSON: the whole bench configuration
    versions          TEXT NOT NULL   -- JSON: longreach, transformers, torch, python, platform
);
CREATE TABLE cells (
    key                  TEXT PRIMARY KEY,  -- JSON list of the key fields below
    run_id               INTEGER NOT NULL REFERENCES runs(id),
    model                TEXT NOT NULL,
    model_fingerprint    TEXT NOT NULL,
    trained_length       INTEGER,
    method               TEXT NOT NULL,
    task                 TEXT NOT NULL,
    prompt_format        TEXT NOT NULL,     -- 'raw' or 'chat'
    length               INTEGER NOT NULL,  -- target length in the model's tokens
    depth                REAL,              -- NULL for tasks without a depth
    seed                 INTEGER NOT NULL,
    idx                  INTEGER NOT NULL,
    metric               TEXT NOT NULL,     -- 'accuracy' (0..1) or 'perplexity'
    score                REAL,
    expected             TEXT NOT NULL,     -- JSON list
    output               TEXT NOT NULL,
    prompt               TEXT NOT NULL,
    context_tokens       INTEGER NOT NULL,  -- actual prompt tokens
    context_chars        INTEGER,           -- characters of the context (haystack + needles)
    context_words        INTEGER,           -- whitespace-separated words of the context
    shared_prefix_tokens INTEGER NOT NULL DEFAULT 0,
    prefill_s            REAL,
    decode_s             REAL,
    new_tokens           INTEGER,
    decode_tok_s         REAL,
    peak_mem_bytes       INTEGER,
    mem_kind             TEXT,              -- 'rss_peak', 'ru_maxrss' or 'cuda_max_allocated'
    device               TEXT,
    dtype                TEXT,
    meta                 TEXT NOT NULL,     -- JSON: task details (needle depths, ...)
    created_at           TEXT NOT NULL
);
CREATE INDEX cells_by_grid ON cells (model_fingerprint, method, task, length);
"""

KEY_FIELDS = (
    "model_fingerprint",
    "method",
    "task",
    "prompt_format",
    "length",
    "depth",
    "seed",
    "idx",
)


def cell_key(
    model_fingerprint: str,
    method: str,
    task: str,
    prompt_format: str,
    length: int,
    depth: float | None,
    seed: int,
    idx: int,
    questions: int | None = None,
    question: int | None = None,
) -> str:
    """The primary key of a cell: a JSON list, so it is readable in any SQLite browser.

    A question of a shared context (``bench --questions-per-context``) appends the number of
    questions per context and its own index; every other cell keeps the eight fields.
    """
    fields = [
        model_fingerprint,
        method,
        task,
        prompt_format,
        int(length),
        depth,
        int(seed),
        int(idx),
    ]
    if questions is not None:
        fields += [int(questions), None if question is None else int(question)]
    return json.dumps(fields)


@dataclass
class Cell:
    """One finished sample, as stored."""

    model: str
    model_fingerprint: str
    method: str
    task: str
    prompt_format: str
    length: int
    depth: float | None
    seed: int
    idx: int
    metric: str
    score: float | None
    expected: list[str]
    output: str
    prompt: str
    context_tokens: int
    context_chars: int | None = None
    context_words: int | None = None
    trained_length: int | None = None
    shared_prefix_tokens: int = 0
    prefill_s: float | None = None
    decode_s: float | None = None
    new_tokens: int | None = None
    decode_tok_s: float | None = None
    peak_mem_bytes: int | None = None
    mem_kind: str | None = None
    device: str | None = None
    dtype: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # A question of a context shared by ``context_questions`` questions (else None): its
    # index, and on question 0 only, the seconds the shared document took to encode once.
    context_questions: int | None = None
    question: int | None = None
    context_encode_s: float | None = None
    run_id: int | None = None
    created_at: str | None = None

    @property
    def key(self) -> str:
        return cell_key(
            *(getattr(self, name) for name in KEY_FIELDS), self.context_questions, self.question
        )


_CELL_COLUMNS = [f for f in Cell.__dataclass_fields__ if f not in ("run_id", "created_at")]
# Columns added after schema 1 was first written: nullable, so an older longreach still reads
# and writes the database. Opening adds the missing ones; a read-only database reads them as NULL.
_ADDED_COLUMNS = {
    "context_words": "INTEGER",
    "context_questions": "INTEGER",  # the questions of a shared context
    "question": "INTEGER",
    "context_encode_s": "REAL",
}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class ResultStore:
    """Open (or create) a results database; refuses foreign or corrupt files untouched."""

    def __init__(self, path: str | os.PathLike, create: bool = True) -> None:
        self.path = Path(path).expanduser()
        self._check_file(create)
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise LongreachError(f"cannot open results database {self.path}: {exc}.") from None
        self.conn.row_factory = sqlite3.Row
        try:
            fresh = self._validate()
            if fresh:
                if not create:
                    raise LongreachError(
                        f"{self.path} holds no results yet; run `longreach bench --db {self.path}` first."
                    )
                self._create()
            self._columns = self._add_missing_columns()
            try:
                self.conn.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError:
                pass  # a database that cannot be written: reading works, writing says why
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA busy_timeout=30000")
        except BaseException:
            self.conn.close()
            raise

    # ---- opening

    def _check_file(self, create: bool) -> None:
        if self.path.is_dir():
            raise LongreachError(f"{self.path} is a folder; pass a database file path to --db.")
        if not self.path.exists():
            if not create:
                raise LongreachError(
                    f"results database {self.path} does not exist; run `longreach bench --db {self.path}` first."
                )
            _check_creatable(self.path)
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LongreachError(
                    f"cannot create {self.path} ({exc.strerror or exc}); pass a --db path in a "
                    "writable folder."
                ) from None
            return
        if not self.path.is_file():
            raise LongreachError(
                f"{self.path} is not a regular file (a device or a pipe?); pass a database file "
                "path to --db."
            )
        try:
            with open(self.path, "rb") as f:
                head = f.read(len(_SQLITE_MAGIC))
        except OSError as exc:
            raise LongreachError(
                f"cannot read {self.path} ({exc.strerror or exc}); check its permissions."
            ) from None
        if head and head != _SQLITE_MAGIC:
            raise LongreachError(
                f"{self.path} is not a SQLite database (another kind of file?); it was left "
                "untouched: pass a new path to --db."
            )

    def _validate(self) -> bool:
        """True for an empty database; raises for a corrupt, foreign or newer one. Reads only."""
        try:
            tables = {
                row[0]
                for row in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if not tables:
                return True
            check = self.conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            meta: dict[str, str] = {}
            if "meta" in tables:
                try:
                    meta = dict(self.conn.execute("SELECT name, value FROM meta").fetchall())
                except sqlite3.OperationalError:  # a table named meta with other columns
                    meta = {}
        except sqlite3.DatabaseError as exc:
            lines = [ln for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("***")]
            first = lines[0].strip() if lines else "unreadable"
            raise LongreachError(
                f"{self.path} is a corrupt SQLite database ({first}); it was left untouched: "
                "restore it from a copy or pass a new path to --db."
            ) from None
        if meta.get("format") != FORMAT_NAME:
            raise LongreachError(
                f"{self.path} is a SQLite database of another program (tables: "
                f"{', '.join(sorted(tables))}); it was left untouched: pass a new path to --db."
            )
        version = int(meta.get("schema_version", "0"))
        if version > SCHEMA_VERSION:
            raise LongreachError(
                f"{self.path} was written by a newer longreach (schema {version}, this one reads "
                f"{SCHEMA_VERSION}); upgrade longreach or pass a new path to --db."
            )
        return False

    def _cell_columns(self) -> set[str]:
        return {row[1] for row in self.conn.execute("PRAGMA table_info(cells)")}

    def _add_missing_columns(self) -> set[str]:
        """Add the columns an older database lacks, where it can be written; the columns it has."""
        have = self._cell_columns()
        for name, kind in _ADDED_COLUMNS.items():
            if name in have:
                continue
            try:
                self.conn.execute(f"ALTER TABLE cells ADD COLUMN {name} {kind}")
            except sqlite3.OperationalError:
                pass  # read-only, or another process added it first: read what is there
            have = self._cell_columns()
        return have

    def _create(self) -> None:
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self.conn.execute(statement)
            self.conn.executemany(
                "INSERT INTO meta (name, value) VALUES (?, ?)",
                [
                    ("format", FORMAT_NAME),
                    ("schema_version", str(SCHEMA_VERSION)),
                    ("created_at", _now()),
                ],
            )

    class _Tx:
        """One write transaction; a database that cannot be written fails with one line."""

        def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
            self.conn, self.path = conn, path

        def __enter__(self) -> sqlite3.Connection:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise _unwritable(self.path, exc) from None
            return self.conn

        def __exit__(self, exc_type: Any, exc: BaseException | None, *_: Any) -> bool:
            try:
                self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
            except sqlite3.OperationalError as err:
                if exc_type is None:
                    raise _unwritable(self.path, err) from None
            if isinstance(exc, sqlite3.OperationalError):
                raise _unwritable(self.path, exc) from None
            return False

    def _transaction(self) -> ResultStore._Tx:
        return ResultStore._Tx(self.conn, self.path)

    # ---- writing

    def start_run(
        self, model: str, model_fingerprint: str, config: dict[str, Any], versions: dict[str, str]
    ) -> int:
        with self._transaction() as conn:
            cur = conn.execute(
                "INSERT INTO runs (started_at, model, model_fingerprint, config, versions) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    _now(),
                    model,
                    model_fingerprint,
                    json.dumps(config, sort_keys=True, default=str),
                    json.dumps(versions, sort_keys=True),
                ),
            )
            return int(cur.lastrowid)

    def add(self, cell: Cell, run_id: int) -> bool:
        """Store one finished cell in its own transaction; False if its key was already stored."""
        values = asdict(cell)
        values["expected"] = json.dumps(values["expected"])
        values["meta"] = json.dumps(values["meta"], sort_keys=True, default=str)
        stored = [c for c in _CELL_COLUMNS if c in self._columns]
        columns = ["key", "run_id", "created_at", *stored]
        row = [cell.key, run_id, _now(), *(values[c] for c in stored)]
        with self._transaction() as conn:
            cur = conn.execute(
                f"INSERT OR IGNORE INTO cells ({', '.join(columns)}) "
                f"VALUES ({', '.join('?' for _ in columns)})",
                row,
            )
            return cur.rowcount == 1

    # ---- reading

    def done_keys(self) -> set[str]:
        return {row[0] for row in self.conn.execute("SELECT key FROM cells")}

    def cells(self, include_prompt: bool = True) -> list[Cell]:
        return list(self.iter_cells(include_prompt))

    def iter_cells(self, include_prompt: bool = True) -> Iterator[Cell]:
        cols = ["run_id", "created_at", *_CELL_COLUMNS]
        select = ", ".join(
            "'' AS prompt"
            if c == "prompt" and not include_prompt
            else (c if c in self._columns else f"NULL AS {c}")
            for c in cols
        )
        for row in self.conn.execute(f"SELECT {select} FROM cells ORDER BY rowid"):
            values = dict(row)
            values["expected"] = json.loads(values["expected"])
            values["meta"] = json.loads(values["meta"])
            yield Cell(**values)

    def runs(self) -> list[dict[str, Any]]:
        out = []
        for row in self.conn.execute("SELECT * FROM runs ORDER BY id"):
            values = dict(row)
            values["config"] = json.loads(values["config"])
            values["versions"] = json.loads(values["versions"])
            out.append(values)
        return out

    def count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0])

    # ---- export

    def export(self, out: str | os.PathLike, include_prompt: bool = False) -> int:
        """Write every cell to ``out`` as JSONL (``.jsonl``/``.json``) or CSV (``.csv``).

        The file is written next to ``out`` under a temporary name and renamed into place, so
        an existing file is replaced only by a complete export; an ``out`` that is this
        database (or its -wal/-shm/-journal file) is refused.
        """
        out = Path(out).expanduser()
        suffix = out.suffix.lower()
        if self._is_own_file(out):
            raise LongreachError(
                f"{out} is the results database itself (or one of its files); exporting onto it "
                "would destroy it: pass another --out."
            )
        if suffix not in (".jsonl", ".json", ".csv"):
            raise LongreachError(
                f"cannot export to {out.name}: name the file .jsonl or .csv to choose the format."
            )
        if out.is_dir():
            raise LongreachError(f"{out} is a folder; pass a file path ending in .jsonl or .csv.")
        cells = self.iter_cells(include_prompt)
        return _write_atomically(
            out,
            lambda f: (
                _write_csv(f, cells, include_prompt)
                if suffix == ".csv"
                else _write_jsonl(f, cells, include_prompt)
            ),
        )

    def _is_own_file(self, out: Path) -> bool:
        db = self.path.resolve()
        own = [db] + [db.with_name(db.name + tail) for tail in ("-wal", "-shm", "-journal")]
        target = out.resolve()
        if target in own:
            return True
        try:
            return out.exists() and os.path.samefile(out, db)
        except OSError:
            return False

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def stored_keys(path: str | os.PathLike) -> set[str]:
    """The cell keys stored at ``path``, checked as ``ResultStore`` checks it, creating nothing.

    A path that does not exist yet (or an empty file) holds no keys; it must be creatable.
    """
    store = object.__new__(ResultStore)
    store.path = Path(path).expanduser()
    if not store.path.exists():
        store._check_file(create=False) if store.path.is_dir() else _check_creatable(store.path)
        return set()
    store._check_file(create=False)
    try:
        store.conn = sqlite3.connect(str(store.path), timeout=30.0, isolation_level=None)
    except sqlite3.Error as exc:
        raise LongreachError(f"cannot open results database {store.path}: {exc}.") from None
    try:
        return set() if store._validate() else store.done_keys()
    finally:
        store.conn.close()


def _check_creatable(path: Path) -> None:
    """Refuse early a new database path whose nearest existing folder cannot take it."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LongreachError(
            f"cannot create {path}: {ancestor} is a file, not a folder; pass another --db path."
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LongreachError(
            f"cannot create {path}: the folder {ancestor} is not writable; pass another --db path."
        )


def _unwritable(path: Path, exc: sqlite3.Error) -> LongreachError:
    return LongreachError(
        f"results database {path} cannot be written ({exc}); check the file's and its folder's "
        "permissions, or pass another --db."
    )


def _write_atomically(out: Path, write: Callable[[TextIO], int]) -> int:
    """``write(file)`` into a temporary file next to ``out``, then rename it onto ``out``."""
    where = f"cannot write {out}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise LongreachError(
            f"{where} ({exc.strerror or exc}); pass an --out path in a writable folder."
        ) from None
    tmp = Path(tmp_name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; an export is an ordinary file
        with open(fd, "w", encoding="utf-8", newline="") as f:
            n = write(f)
        os.replace(tmp, out)
    except OSError as exc:
        raise LongreachError(
            f"{where} ({exc.strerror or exc}); check its permissions or pass another --out."
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return n


def _write_jsonl(f: TextIO, cells: Iterable[Cell], include_prompt: bool) -> int:
    n = 0
    for cell in cells:
        record = asdict(cell)
        if not include_prompt:
            record.pop("prompt")
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        n += 1
    return n


def _write_csv(f: TextIO, cells: Iterable[Cell], include_prompt: bool) -> int:
    columns = [
        c for c in ("run_id", "created_at", *_CELL_COLUMNS) if include_prompt or c != "prompt"
    ]
    n = 0
    writer = csv.writer(f)
    writer.writerow(columns)
    for cell in cells:
        record = asdict(cell)
        record["expected"] = json.dumps(record["expected"], ensure_ascii=False)
        record["meta"] = json.dumps(record["meta"], ensure_ascii=False, sort_keys=True)
        writer.writerow(["" if record[c] is None else record[c] for c in columns])
        n += 1
    return n
