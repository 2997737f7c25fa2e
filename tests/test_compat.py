"""compat: the cache keyword and cache_position differences across transformers 5.x."""

import pytest
import torch
from tiny import FAMILIES, tiny_model
from transformers import DynamicCache

from longreach import compat


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_forward_matches_one_shot(family):
    model = tiny_model(family)
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :25], **compat.forward_kwargs(model, cache, 0, 25))
        cache = compat.output_cache(first)
        assert cache is not None, "forward returned no cache"
        second = model(ids[:, 25:], **compat.forward_kwargs(model, cache, 25, 15))
    torch.testing.assert_close(first.logits, full[:, :25], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second.logits, full[:, 25:], atol=1e-5, rtol=1e-5)


def test_cache_kwarg_names_a_forward_parameter():
    import inspect

    model = tiny_model("llama")
    params = inspect.signature(type(model).forward).parameters
    assert compat.cache_kwarg(model) in params
    assert compat.takes_cache_position(model) == ("cache_position" in params)


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_parameters_read(family):
    model = tiny_model(family)
    params = compat.rope_parameters(model.config)
    assert params["rope_theta"] == 10000.0
    assert params.get("rope_type", "default") == "default"


def test_rope_parameters_from_legacy_attributes():
    class Legacy:
        rope_theta = 5e5
        rope_scaling = {"type": "linear", "factor": 4.0}

    params = compat.rope_parameters(Legacy())
    assert params == {"rope_type": "linear", "type": "linear", "factor": 4.0, "rope_theta": 5e5}


def test_legacy_rope_fields_for_transformers_4_readers():
    saved = {"rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}
    assert compat.legacy_rope_fields(saved) == {"rope_theta": 100000.0}
    yarn = {"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}}
    assert compat.legacy_rope_fields(yarn) == {
        "rope_theta": 5e5,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "type": "yarn"},
    }
    both = {"rope_theta": 1.0, "rope_parameters": {"rope_theta": 1.0}}
    assert compat.legacy_rope_fields(both) == {}, "fields already there are left alone"
    assert compat.legacy_rope_fields({"n_layer": 1}) == {}


def test_no_rope_config_gives_none():
    from transformers import GPT2Config

    assert compat.rope_parameters(GPT2Config(n_layer=1)) is None


def test_default_dtype_is_float():
    assert compat.default_dtype("cpu") in (torch.float32, torch.bfloat16)
    if not compat.cpu_supports_bf16():
        assert compat.default_dtype("cpu") == torch.float32


@pytest.mark.parametrize(
    "line, speedup, expected",
    [
        # AMD EPYC, AVX2 only
        ("flags\t\t: fpu sse2 avx avx2 fma", None, False),
        # Intel Xeon with AVX-512 but no bf16 units: oneDNN only emulates bf16 there
        ("flags\t\t: fpu avx2 avx512f avx512bw avx512vl avx512_vnni", None, False),
        # AVX512-BF16 without AMX: the probe decides. Intel Xeon (model 207): bf16 measured
        # 1.5x slower than fp32; AMD EPYC Zen 5: 4x faster
        ("flags\t\t: fpu avx2 avx512f avx512_bf16", 0.6, False),
        ("flags\t\t: fpu avx2 avx512f avx512_bf16", 1.4, False),
        ("flags\t\t: fpu avx2 avx512f avx512_bf16", 4.1, True),
        # Sapphire Rapids: AMX
        ("flags\t\t: avx512f avx512_bf16 amx_bf16 amx_tile", None, True),
        # Arm with the BF16 extension
        ("Features\t: fp asimd sve bf16", None, True),
        ("Features\t: fp asimd", None, False),
    ],
)
def test_bf16_decision_follows_the_cpu_flags(tmp_path, monkeypatch, line, speedup, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\n{line}\n", encoding="utf-8")
    real = compat.cpu_flags
    monkeypatch.setattr(compat, "cpu_flags", lambda: real(str(cpuinfo)))
    # the mkldnn probe says True on every AVX-512 CPU; it must not be consulted
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    probed = []

    def probe():
        probed.append(True)
        assert speedup is not None, f"{line!r}: the flags decide, the probe must not run"
        return speedup

    monkeypatch.setattr(compat, "bf16_matmul_speedup", probe)
    compat.cpu_supports_bf16.cache_clear()
    try:
        assert compat.cpu_supports_bf16() is expected, f"{line!r}: expected {expected}"
        assert compat.default_dtype("cpu") == (torch.bfloat16 if expected else torch.float32)
        assert probed == ([True] if speedup is not None else [])
    finally:
        compat.cpu_supports_bf16.cache_clear()


def test_bf16_probe_measures_a_ratio():
    ratio = compat.bf16_matmul_speedup(n=32, repeats=2)
    assert ratio > 0 and ratio == ratio  # a finite positive ratio, not NaN


def test_cpu_flags_without_cpuinfo_is_empty(tmp_path):
    assert compat.cpu_flags(str(tmp_path / "missing")) == frozenset()
