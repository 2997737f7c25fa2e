"""A bench run killed with SIGKILL mid-run resumes: nothing finished is lost or recomputed."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from fixtures.tinylm import one_thread, tiny_dir  # noqa: F401

from longreach.bench import BenchConfig, ResultStore, run_bench

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = dict(tasks=["passkey"], lengths=[300, 400], depths=[0.2, 0.8], samples=6)


def _script(model_dir, db) -> str:
    return textwrap.dedent(
        f"""
        import torch
        torch.set_num_threads(1)
        from longreach.bench import BenchConfig, run_bench
        run_bench(BenchConfig(model={str(model_dir)!r}, db={str(db)!r}, **{GRID!r}))
        """
    )


def _count(db) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def _rows(db) -> dict[str, tuple]:
    with ResultStore(db, create=False) as store:
        return {c.key: (c.output, c.score, c.context_tokens, c.prompt) for c in store.cells()}


def test_sigkill_then_resume_recomputes_nothing_and_loses_nothing(tmp_path, tiny_dir):  # noqa: F811
    db = tmp_path / "killed.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _script(tiny_dir, db)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 240
        while _count(db) < 5:
            if proc.poll() is not None:
                pytest.fail(f"the bench process ended early: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the bench process stored no cells within 240 s")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    with ResultStore(db, create=False) as store:
        before = {c.key: (c.run_id, c.created_at, c.output) for c in store.cells()}
    total = 2 * 2 * 6
    assert 5 <= len(before) < total, f"{len(before)} of {total} cells stored at the kill"

    resumed = run_bench(BenchConfig(model=str(tiny_dir), db=str(db), **GRID))
    assert resumed.skipped == len(before), "a finished cell was lost or not recognised"
    assert resumed.computed == total - len(before), "a finished cell was recomputed"
    with ResultStore(db, create=False) as store:
        after = {c.key: (c.run_id, c.created_at, c.output) for c in store.cells()}
    assert {k: after[k] for k in before} == before, "cells finished before the kill changed"

    reference = tmp_path / "reference.db"
    run_bench(BenchConfig(model=str(tiny_dir), db=str(reference), **GRID))
    assert _rows(db) == _rows(reference), "the resumed run differs from an uninterrupted run"
