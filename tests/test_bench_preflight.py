"""A grid is checked before its first cell: all problems at once, memory estimated from the
config, defaults that fit the model, one row per distinct method, and no stray files."""

from __future__ import annotations

import json
import sqlite3

from fixtures.tinylm import save_tiny_lm, tiny_dir, tiny_tokenizer  # noqa: F401
from test_bench_store_safety import unwritable
from typer.testing import CliRunner

from longreach.bench import preflight
from longreach.bench.grid import format_length
from longreach.bench.preflight import estimate_memory, model_shape, unique_methods
from longreach.cli import app

GiB = 1024**3


def _bench(*args: str):
    return CliRunner().invoke(app, ["bench", "--threads", "1", "--samples", "1", *args])


def _error(result) -> str:
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return text[text.index("error: ") :]


def _runs(db) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


# ---- memory


def test_memory_estimate_of_the_lab_model_follows_the_config():
    from transformers import AutoConfig

    import longreach

    folder = f"{longreach.__path__[0]}/lab/checkpoint"
    shape = model_shape(AutoConfig.from_pretrained(folder))
    assert shape == dict(layers=4, heads=2, kv_heads=2, head_dim=64, hidden=128, intermediate=384)
    n = 10 * 2**20
    est = estimate_memory(shape, n, dtype_bytes=4, chunk=None)
    assert (
        est.kv_bytes == n * 4 * 2 * 64 * 2 * 4 == 40 * GiB
    )  # layers x kv heads x dim x K,V x fp32
    assert est.activation_bytes == n * (4 * 128 + (2 + 2 * 2) * 64 + 3 * 384) * 4 == 80 * GiB
    assert est.generation_bytes == n * 600
    chunked = estimate_memory(shape, n, dtype_bytes=4, chunk=4096)
    assert chunked.kv_bytes == est.kv_bytes and chunked.activation_bytes == 4096 * 8192
    # a method that bounds what it holds (a reader: the trained length) needs that much
    bounded = estimate_memory(shape, n, dtype_bytes=4, chunk=None, resident=256)
    assert bounded.kv_bytes == 256 * 4 * 2 * 64 * 2 * 4 and bounded.activation_bytes == 256 * 8192


def test_absurd_length_is_refused_with_its_estimate_before_any_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "available_memory", lambda device: 8 * GiB)
    result = _bench(
        "--model", "lab", "--dtype", "fp32", "--lengths", "256,10m", "--db", str(tmp_path / "t.db")
    )
    assert _error(result) == (
        "error: a cell of 10m tokens with vanilla needs about 125.9 GiB (KV cache 40.0 GiB, activations "
        "80.0 GiB, sample generation 5.9 GiB) but 8.0 GiB is available on cpu: use shorter "
        "--lengths or --chunk."
    )
    assert not (tmp_path / "t.db").exists(), "a refused grid leaves no database behind"
    assert format_length(10 * 2**20) == "10m" and format_length(3 * 2**19) == "1.5m"


# ---- every problem before the first cell


def test_every_problem_is_reported_before_the_first_cell(tmp_path, tiny_dir):  # noqa: F811
    plain = save_tiny_lm(tmp_path / "plain")
    for path in plain.glob("chat_template*"):
        path.unlink()
    tiny_tokenizer(chat=False).save_pretrained(plain)  # no chat template
    db = tmp_path / "mix.db"
    result = _bench(
        "--model", str(plain), "--method", "vanilla", "--method", "self-extend:window=1024",
        "--task", "passkey", "--task", "perplexity:last=300", "--lengths", "300,400",
        "--chat", "--db", str(db),
    )  # fmt: skip
    assert _error(result) == (
        "error: 3 problems with this model, nothing was computed: (1) self-extend: window "
        "(1024) must not exceed the trained length 256: neighbour positions would leave the "
        "trained range; (2) --chat needs a tokenizer with a chat template and this one has "
        "none; use --no-chat; (3) length 300 is too short for perplexity with last=300: the "
        "scored tokens need some context before them; ask for a longer length or a smaller last."
    )
    assert not db.exists(), "vanilla's cells must not have been computed first"


def test_every_input_problem_is_reported_before_the_model_loads(tmp_path):
    result = _bench(
        "--model", "/never/loaded", "--samples", "0", "--chunk", "0", "--task", "needles",
        "--method", "yarn:factr=4", "--db", str(tmp_path / "r.db"),
    )  # fmt: skip
    text = _error(result)
    assert text.startswith("error: 4 problems in this bench, nothing was computed: ")
    for part in (
        "(1) --samples 0 must be at least 1;",
        "(2) --chunk 0 must be a positive number of tokens;",
        "(3) yarn has no parameter 'factr'",
        "(4) unknown task 'needles'",
    ):
        assert part in text, f"{part!r} missing from {text}"


# ---- defaults that fit the model, one row per method


def test_default_self_extend_and_perplexity_run_on_the_lab_model(tmp_path):
    db = tmp_path / "lab.db"
    result = _bench(
        "--model", "lab", "--method", "self-extend", "--task", "perplexity", "--lengths", "256",
        "--db", str(db),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT method, task, meta FROM cells").fetchall()
    assert [(m, t) for m, t, _ in rows] == [("self-extend", "perplexity:haystack=pg,last=64")]
    assert json.loads(rows[0][2])["scored_tokens"] == 64  # a quarter of the trained 256

    import longreach as lr

    model, _ = lr.load("lab")
    assert lr.methods.build_method("self-extend").window_for(model) == 128
    assert lr.methods.build_method("self-extend:window=64").window_for(model) == 64


def test_specs_that_build_the_same_method_are_one_grid_row():
    specs = ["yarn", "yarn:factor=4", "yarn:factor=4.0", "vanilla", "yarn:factor=8", "vanilla"]
    assert unique_methods(specs) == ["yarn", "vanilla", "yarn:factor=8"]


# ---- bookkeeping


def test_failed_command_leaves_no_database_and_reruns_record_no_run(tmp_path, tiny_dir):  # noqa: F811
    bad = _bench("--model", "nosuchmodel", "--db", str(tmp_path / "bad.db"))
    assert "unknown model alias 'nosuchmodel'" in _error(bad)
    assert not (tmp_path / "bad.db").exists()

    db = tmp_path / "runs.db"
    args = ["--model", str(tiny_dir), "--lengths", "300", "--db", str(db)]
    assert _bench(*args).exit_code == 0 and _runs(db) == 1
    again = _bench(*args)
    assert again.exit_code == 0 and "0 cells computed, 1 already in" in again.output
    assert _runs(db) == 1, "a rerun with nothing to compute must not add a runs row"

    with unwritable(db):
        same = _bench(*args)  # reads only: fine on a database that cannot be written
        assert same.exit_code == 0, same.output
        more = _bench(*args[:-2], "--lengths", "300,400", "--db", str(db))
        assert f"error: results database {db} cannot be written" in _error(more)
