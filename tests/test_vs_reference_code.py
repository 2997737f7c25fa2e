"""The pure parts of benchmarks/vs_reference_code.py: arguments, settings, comparison, table.

No reference repository is needed: these parts never start a child process.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "vs_reference_code.py"


@pytest.fixture(scope="module")
def vs():
    spec = importlib.util.spec_from_file_location("vs_reference_code", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


REPOS = ["--longlm", "a", "--lm-infinite", "b", "--streaming-llm", "c"]


def test_defaults(vs):
    args = vs.parse_args(REPOS)
    assert args.lengths == [4096, 8192], args.lengths
    assert args.depths == [0.25, 0.5, 0.75], args.depths
    assert args.methods == ["vanilla", "self-extend", "lm-infinite", "streaming"]
    assert args.threads == 1
    assert (args.group, args.window) == (8, 1024)
    assert (args.lmi_window, args.lmi_sinks) == (4096, 10)
    assert (args.start_size, args.recent_size) == (4, 2000)
    assert args.longlm == Path("a") and args.streaming_llm == Path("c")


def test_lengths_and_methods(vs):
    args = vs.parse_args([*REPOS, "--lengths", "4k,1500,0.5k", "--methods", "streaming"])
    assert args.lengths == [4096, 1500, 512], args.lengths
    assert args.methods == ["streaming"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--methods", "yarn"],
        ["--lengths", "4q"],
        ["--lengths", "0"],
        ["--depths", "1.5"],
    ],
)
def test_bad_arguments_exit(vs, argv, capsys):
    with pytest.raises(SystemExit) as info:
        vs.parse_args([*REPOS, *argv])
    assert info.value.code == 2, f"{argv} should be a usage error (exit 2)"


def test_missing_checkout_names_the_flag(vs, capsys):
    with pytest.raises(SystemExit):
        vs.parse_args(["--methods", "vanilla,lm-infinite"])
    assert "--lm-infinite PATH" in capsys.readouterr().err
    # vanilla needs no repository, and --table needs none at all
    assert vs.parse_args(["--methods", "vanilla"]).methods == ["vanilla"]
    assert vs.parse_args(["--table", "x.jsonl"]).table == Path("x.jsonl")


def test_settings_map_authors_calls_to_our_specs(vs):
    s = vs.settings_of(vs.parse_args(REPOS))
    assert s.ours("self-extend") == "self-extend:group=8,window=1024"
    assert s.reference("self-extend") == {"group": 8, "window": 1024}
    assert s.ours("lm-infinite") == "lm-infinite:window=4096,sinks=10,cap=4096"
    assert s.reference("lm-infinite") == {"local_branch": 4096, "global_branch": 10}
    # the authors' recent tokens exclude the current one, our window includes it
    assert s.ours("streaming") == "streaming:sinks=4,window=2001"
    assert s.reference("streaming") == {"start_size": 4, "recent_size": 2000}
    assert s.ours("vanilla") == "vanilla" and s.reference("vanilla") == {}


def test_our_specs_parse(vs):
    from longreach.methods.spec import build_method

    s = vs.Settings()
    for method in vs.METHODS:
        built = build_method(s.ours(method))
        assert built.name == method, (method, built)


def test_compare(vs):
    out = vs.compare([1.0, 3.0, -2.0], [1.5, 2.9, -2.0], [5, 6, 2], [5, 6, 2])
    assert out["max_abs_dlogit"] == pytest.approx(0.5)
    assert out["argmax_agree"] is True and out["answers_agree"] is True
    out = vs.compare([1.0, 3.0], [3.5, 2.9], [5], [5, 7])
    assert out["max_abs_dlogit"] == pytest.approx(2.5)
    assert out["argmax_agree"] is False and out["answers_agree"] is False
    with pytest.raises(ValueError, match="differ in size"):
        vs.compare([1.0], [1.0, 2.0], [], [])


def _rec(method, n, d, agree, ref_ok, our_ok, spec=None):
    return {
        "method": method,
        "spec": spec or method,
        "n": n,
        "depth": 0.5,
        "max_abs_dlogit": d,
        "argmax_agree": agree,
        "answers_agree": agree,
        "ref_correct": ref_ok,
        "our_correct": our_ok,
    }


def test_summary_and_table(vs, tmp_path):
    records = [
        _rec("streaming", 4096, 1e-3, True, False, False),
        _rec("vanilla", 4096, 2e-4, True, True, True),
        _rec("vanilla", 4096, 5e-4, False, True, False),
        _rec("vanilla", 8192, 1e-4, True, False, False),
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    rows = vs.summarize(vs.read_records(path))
    assert [(r["method"], r["n"]) for r in rows] == [
        ("vanilla", 4096),
        ("vanilla", 8192),
        ("streaming", 4096),
    ], "rows follow the method order, then the length"
    v = rows[0]
    assert v["prompts"] == 2 and v["max_abs_dlogit"] == pytest.approx(5e-4)
    assert (v["argmax_agree"], v["answers_agree"], v["ref_correct"], v["our_correct"]) == (
        1,
        1,
        2,
        1,
    )
    lines = vs.format_table(rows).splitlines()
    assert len(lines) == 2 + 3
    assert lines[2].split() == [
        "vanilla",
        "vanilla",
        "4096",
        "5.00e-04",
        "1/2",
        "1/2",
        "2/2",
        "1/2",
    ]
    assert vs.read_records(tmp_path / "missing.jsonl") == []


def test_table_mode_prints_without_torch_work(vs, tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(_rec("lm-infinite", 8192, 0.25, True, True, True)) + "\n")
    vs.main(["--table", str(path)])
    out = capsys.readouterr().out
    assert "lm-infinite" in out and "2.50e-01" in out and "1/1" in out, out


def test_cell_key_rounds_depth(vs):
    assert vs.cell_key("vanilla", "vanilla", 4096, 0.250000001) == (
        "vanilla",
        "vanilla",
        4096,
        0.25,
    )
