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


def test_no_rope_config_gives_none():
    from transformers import GPT2Config

    assert compat.rope_parameters(GPT2Config(n_layer=1)) is None


def test_default_dtype_is_float():
    assert compat.default_dtype("cpu") in (torch.float32, torch.bfloat16)
    if not compat.cpu_supports_bf16():
        assert compat.default_dtype("cpu") == torch.float32
