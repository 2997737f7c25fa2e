"""One parameter conversion for methods and tasks; transformers' internals only in compat."""

from __future__ import annotations

import ast
import inspect
from typing import Literal

import pytest

from longreach.errors import LongreachError
from longreach.methods import build_method
from longreach.params import coerce
from longreach.tasks import get_task


@pytest.mark.parametrize(
    "value,annotation,want",
    [
        ("4", int, 4), (4.0, int, 4), ("2.5", float, 2.5), (3, float, 3.0),
        ("on", bool, True), ("No", bool, False), ("auto", int | None, None),
        ("none", float | None, None), ("8", int | None, 8), ("Ratio", Literal["index", "ratio"], "ratio"),
    ],
)  # fmt: skip
def test_coerce_converts(value, annotation, want):
    got = coerce("m", "p", value, annotation)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize(
    "value,annotation,message",
    [
        ("8k", int, "m: p must be a whole number, got '8k'."),
        (True, int, "m: p must be a whole number, got True."),
        ("nan", float, "m: p must be a finite number, got 'nan'."),
        ("maybe", bool, "m: p must be true or false, got 'maybe'."),
        ("x", Literal["a", "b"], "m: p must be one of a, b, got 'x'."),
    ],
)
def test_coerce_errors_are_one_sentence(value, annotation, message):
    with pytest.raises(LongreachError) as err:
        coerce("m", "p", value, annotation)
    assert str(err.value) == message


def test_methods_and_tasks_share_the_conversion():
    assert build_method("yarn:factor=2").factor == 2.0
    assert get_task("multi-needle:k=3").k == 3
    with pytest.raises(LongreachError) as method_err:
        build_method("yarn:original_max=8k")
    with pytest.raises(LongreachError) as task_err:
        get_task("multi-needle:k=8k")
    assert str(method_err.value) == "yarn: original_max must be a whole number, got '8k'."
    assert str(task_err.value) == "multi-needle: k must be a whole number, got '8k'."
    assert get_task("perplexity:last=auto").last is None
    assert get_task("perplexity:last=32").last == 32


def test_a_task_parameter_given_twice_is_refused():
    with pytest.raises(LongreachError, match=r"task 'multi-needle:k=2,k=3' sets 'k' twice"):
        get_task("multi-needle:k=2,k=3")


def test_method_base_reaches_transformers_only_through_compat():
    from longreach.methods import base

    tree = ast.parse(inspect.getsource(base))
    imported = {
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert not any(name.startswith("transformers") for name in imported), imported
    assert ".config._attn_implementation" not in inspect.getsource(base)
