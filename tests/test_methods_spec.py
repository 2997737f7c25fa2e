"""The registry, spec strings and parameter validation, with every error message."""

import pytest

from longreach import LongreachError
from longreach.methods import build_method, get_method, method_names, parse_spec
from longreach.methods.yarn import YaRN


def test_registry_lists_the_rope_methods_and_vanilla():
    assert {"pi", "ntk", "dynamic-ntk", "yarn", "truncated", "vanilla"} <= set(method_names())
    assert method_names() == sorted(method_names())


def test_every_method_cites_a_paper_and_documents_each_parameter():
    for name in method_names():
        cls = get_method(name)
        assert cls.paper, f"{name} cites no paper"
        assert cls.__doc__ and cls.summary, f"{name} has no docstring or summary"
        for param, _default, help_text in cls.parameters():
            assert help_text, f"{name}.{param} has no help text"


def test_every_position_method_takes_factor_and_original_max():
    for name in ("pi", "ntk", "dynamic-ntk", "yarn", "truncated"):
        params = [p for p, _, _ in get_method(name).parameters()]
        assert params[:2] == ["factor", "original_max"], f"{name}: {params}"


def test_names_are_case_and_underscore_insensitive():
    assert get_method("Dynamic_NTK") is get_method("dynamic-ntk")


def test_parse_spec_splits_name_and_parameters():
    assert parse_spec("yarn:factor=4,original_max=8192") == (
        "yarn",
        {"factor": "4", "original_max": "8192"},
    )
    assert parse_spec(" pi ") == ("pi", {})
    assert parse_spec("yarn: factor = 4 , ramp=ratio") == ("yarn", {"factor": "4", "ramp": "ratio"})


def test_spec_and_keywords_build_the_same_method():
    from_spec = build_method("yarn:factor=4,original_max=8192")
    from_kwargs = build_method("yarn", factor=4, original_max=8192)
    mixed = build_method("yarn:factor=4", original_max=8192)
    assert from_spec == from_kwargs == mixed
    assert isinstance(from_spec, YaRN)
    assert from_spec.factor == 4.0 and isinstance(from_spec.factor, float)
    assert from_spec.original_max == 8192 and isinstance(from_spec.original_max, int)


def test_to_spec_round_trips_and_names_only_non_defaults():
    method = build_method("yarn:factor=8,original_max=2048,ramp=ratio,attention_factor=1.2")
    assert method.to_spec() == "yarn:factor=8,original_max=2048,attention_factor=1.2,ramp=ratio"
    assert build_method(method.to_spec()) == method
    assert build_method("yarn:factor=4").to_spec() == "yarn"
    assert build_method("truncated:cutoff=none").cutoff is None


def test_a_method_instance_passes_through_and_keywords_override_it():
    method = build_method("pi:factor=2")
    assert build_method(method) is method
    assert build_method(method, factor=8).factor == 8.0


@pytest.mark.parametrize(
    "spec,message",
    [
        (
            "yarnn",
            # the registry's names, sorted (a new method needs no edit here)
            "unknown method 'yarnn'; known methods: dynamic-ntk, h2o, hip, hyper, infiniretri, infllm, lm-infinite, ",
        ),
        (
            "",
            "empty method spec; write it as name:key=value,key=value (e.g. yarn:factor=4,original_max=8192).",
        ),
        (":factor=4", "method spec ':factor=4' has no method name; write it as name:key=value"),
        ("yarn:", "method spec 'yarn:' has nothing after ':'; write it as"),
        ("yarn:factor", "method spec 'yarn:factor' has a bad part 'factor'; write it as"),
        ("yarn:factor=4,,", "method spec 'yarn:factor=4,,' has a bad part ''; write it as"),
        ("yarn:factor=4,factor=8", "method spec 'yarn:factor=4,factor=8' sets 'factor' twice."),
        (
            "yarn:fator=4",
            "yarn has no parameter 'fator'; its parameters are: factor, original_max, alpha, beta, attention_factor, ramp.",
        ),
        ("vanilla:factor=2", "vanilla has no parameter 'factor'; its parameters are: none."),
        ("yarn:factor=abc", "yarn: factor must be a number, got 'abc'."),
        ("yarn:original_max=8k", "yarn: original_max must be a whole number, got '8k'."),
        ("yarn:ramp=cubic", "yarn: ramp must be one of index, ratio, got 'cubic'."),
        (
            "pi:factor=0.5",
            "pi: factor must be >= 1 (got 0.5); a factor below 1 shrinks the context instead of extending it.",
        ),
        ("ntk:factor=0", "ntk: factor must be >= 1 (got 0)"),
        ("dynamic-ntk:factor=-2", "dynamic-ntk: factor must be >= 1 (got -2)"),
        ("yarn:factor=nan", "yarn: factor must be a finite number, got 'nan'."),
        ("pi:factor=inf", "pi: factor must be a finite number, got 'inf'."),
        ("truncated:factor=0.9", "truncated: factor must be >= 1 (got 0.9)"),
        ("pi:original_max=0", "pi: original_max must be a positive number of tokens (got 0)."),
        ("yarn:alpha=0", "yarn: alpha must be > 0 (got 0)."),
        ("yarn:alpha=32,beta=32", "yarn: beta must be larger than alpha (got beta 32, alpha 32)."),
        ("yarn:attention_factor=0", "yarn: attention_factor must be > 0 (got 0)."),
        ("truncated:cutoff=-1", "truncated: cutoff must be a positive number of tokens (got -1)."),
        (
            "truncated:zero_ratio=0.5",
            "truncated: zero_ratio must be >= 1 so that a <= b (got 0.5).",
        ),
        ("truncated:rho_ratio=0", "truncated: rho_ratio must be > 0 (got 0)."),
    ],
)
def test_bad_specs_raise_one_line_errors(spec, message):
    with pytest.raises(LongreachError) as info:
        build_method(spec)
    text = str(info.value)
    assert text.startswith(message), f"expected a message starting with {message!r}, got {text!r}"
    assert "\n" not in text


def test_bad_keyword_values_raise_the_same_errors():
    with pytest.raises(LongreachError, match=r"^pi: factor must be a number, got True\.$"):
        build_method("pi", factor=True)
    with pytest.raises(
        LongreachError, match=r"^yarn: original_max must be a whole number, got 8192\.5\.$"
    ):
        build_method("yarn", original_max=8192.5)
    with pytest.raises(
        LongreachError, match=r"^'factor' is set both in the spec 'pi:factor=2' and as a keyword\.$"
    ):
        build_method("pi:factor=2", factor=3)
    with pytest.raises(
        LongreachError,
        match=r"^a method is a name or a spec string such as 'yarn:factor=4', got int\.$",
    ):
        build_method(4)
