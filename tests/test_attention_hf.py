"""The "longreach" attention inside real transformers models (tiny, random, fp32)."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from reference import lambda_mask
from tiny import FAMILIES, tiny_model

import longreach.attention as la


def _ids(batch=2, n=45, seed=0):
    return torch.randint(3, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_layout_matches_sdpa_logits(family):
    model = tiny_model(family)
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
        with la.use(model, la.CausalLayout(block=8)):
            assert model.config._attn_implementation == "longreach", "use() should switch the model"
            got = model(ids).logits
    assert model.config._attn_implementation == "sdpa", "leaving use() should restore sdpa"
    err = (got - want).abs().max().item()
    assert err <= 1e-5, f"{family}: logits differ from sdpa by {err:.2e}, expected <= 1e-5"


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_left_padding_matches_sdpa(family):
    model = tiny_model(family)
    ids = _ids(3, 30)
    mask = torch.ones(3, 30, dtype=torch.long)
    mask[1, :7] = 0
    mask[2, :29] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        with la.use(model, la.CausalLayout(block=8)):
            got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    err = (got - want)[real].abs().max().item()
    assert err <= 1e-5, (
        f"{family}: padded-batch logits differ from sdpa by {err:.2e} at real tokens"
    )


def test_lambda_layout_matches_a_dense_lambda_mask():
    model = tiny_model("llama")
    n, sinks, window = 60, 3, 11
    ids = _ids(1, n)
    dense = lambda_mask(n, sinks, window)[
        None, None
    ]  # a 4-D mask transformers passes through as is
    with torch.no_grad():
        want = model(ids, attention_mask=dense).logits
        with la.use(model, la.LambdaLayout(sinks=sinks, window=window, block=16)):
            got = model(ids).logits
    err = (got - want).abs().max().item()
    assert err <= 1e-5, f"Λ layout logits differ from sdpa with a dense Λ mask by {err:.2e}"


def test_generate_under_lambda_matches_a_dense_lambda_mask():
    """Decoding steps (one query against the cache) follow the same Λ pattern as prefill."""
    model = tiny_model("qwen2")
    n, new, sinks, window = 30, 8, 2, 9
    ids = _ids(1, n)
    with la.use(model, la.LambdaLayout(sinks=sinks, window=window)):
        seq = model.generate(ids, max_new_tokens=new, do_sample=False)
    dense = lambda_mask(n + new, sinks, window)[None, None]
    with torch.no_grad():
        logits = model(seq, attention_mask=dense).logits
    want = logits[0, n - 1 : n + new - 1].argmax(-1)
    assert torch.equal(seq[0, n:], want), (
        f"Λ generate gave {seq[0, n:].tolist()}, dense Λ {want.tolist()}"
    )


def test_lambda_with_window_beyond_length_is_vanilla():
    model = tiny_model("qwen2")
    ids = _ids(1, 40)
    with torch.no_grad():
        want = model(ids).logits
        with la.use(model, la.LambdaLayout(sinks=4, window=40)):
            got = model(ids).logits
    err = (got - want).abs().max().item()
    assert err <= 1e-5, f"Λ with window >= length must equal vanilla, differs by {err:.2e}"


def test_layers_and_restore():
    model = tiny_model("llama")
    ids = _ids(1, 40)
    mods = la.attention_modules(model)
    assert len(mods) == 2, f"expected the 2 attention modules of the tiny model, found {len(mods)}"
    narrow = la.LambdaLayout(sinks=1, window=4, block=8)
    with torch.no_grad():
        want = model(ids).logits
        with la.use(model, narrow, layers=[1]) as handle:
            assert la.layout_of(mods[0]) == la.CausalLayout(), (
                "layer 0 should keep the causal layout"
            )
            assert la.layout_of(mods[1]) == narrow, "layer 1 should run the Λ layout"
            changed = model(ids).logits
        assert handle is not None and la.layout_of(mods[1]) == la.CausalLayout(), (
            "restore should drop the layout"
        )
        again = model(ids).logits
    assert (changed - want).abs().max().item() > 1e-3, (
        "a 4-token window on layer 1 should change the logits"
    )
    assert torch.equal(again, want), "after restore the model must give its original logits"


def test_decoding_with_generate_matches_sdpa():
    model = tiny_model("mistral")
    ids = _ids(2, 25)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    with la.use(model):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want), (
        f"generate under longreach attention gave {got.tolist()}, sdpa {want.tolist()}"
    )


def test_generate_with_a_static_cache_matches_sdpa():
    model = tiny_model("llama")
    ids = _ids(2, 30)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    kwargs = dict(
        attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation="static"
    )
    want = model.generate(ids, **kwargs)
    with la.use(model):
        got = model.generate(ids, **kwargs)
    assert torch.equal(got, want), (
        f"static-cache generate gave {got.tolist()}, sdpa {want.tolist()}"
    )


def test_training_with_dropout_falls_back_to_sdpa_with_the_same_mask():
    model = tiny_model("llama", attention_dropout=0.3).train()
    ids = _ids(2, 20)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    torch.manual_seed(1)
    want = model(ids, attention_mask=mask).logits
    with la.use(model):
        torch.manual_seed(1)
        got = model(ids, attention_mask=mask).logits
    err = (got - want)[mask.bool()].abs().max().item()
    assert err <= 1e-5, f"dropout fallback differs from sdpa by {err:.2e} (mask or RNG use differs)"


def test_import_does_not_register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    mappings = (AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping)
    saved_modules = {k: v for k, v in sys.modules.items() if k.startswith("longreach.attention")}
    saved_entries = [m.pop("longreach", None) for m in mappings]
    try:
        for name in saved_modules:
            del sys.modules[name]
        fresh = importlib.import_module("longreach.attention")
        assert all("longreach" not in m for m in mappings), (
            "importing longreach.attention must not register"
        )
        fresh.register()
        assert all("longreach" in m for m in mappings), "register() must add both interface entries"
    finally:
        sys.modules.update(saved_modules)
        import longreach

        longreach.attention = saved_modules["longreach.attention"]
        for m, entry in zip(mappings, saved_entries, strict=True):
            m.pop("longreach", None)
            if entry is not None:
                m["longreach"] = entry
