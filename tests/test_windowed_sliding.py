"""self-extend, lm-infinite and streaming on models with sliding-window attention.

The model's sliding window w is one more region bound (a key w or more tokens back is
never attended, on top of the method's rule), so the block kernel still runs: results are
checked against the dense references (tests/reference.py, which read the layer's window
from what transformers passes to the attention function), against the unmodified model in
the degenerate settings, and the dense SDPA fallback (which computes plain attention and
would hide the method) must never run. Tiny Mistral: every layer slides (w = 96); tiny
Qwen2: layer 0 full, layer 1 sliding.
"""

import pytest
import reference as ref
import torch
import transformers.integrations.sdpa_attention as sdpa_module
from tiny import sharp_model, tiny_model, tokens
from transformers import DynamicCache
from transformers.masking_utils import (
    and_masks,
    causal_mask_function,
    or_masks,
    padding_mask_function,
    sliding_window_bidirectional_mask_function,
    sliding_window_causal_mask_function,
)

import longreach as lr
from longreach import LongreachError, compat
from longreach.attention import hf
from longreach.prefill import greedy, prefill

ATOL = 1e-4
W = 96  # the tiny models' sliding window


def reference_fn(method, params, model):
    inv_freq = model.model.rotary_emb.inv_freq
    length = model.config.max_position_embeddings
    if method == "self-extend":
        return ref.self_extend_attention(params["window"], params["group"], inv_freq)
    if method == "lm-infinite":
        return ref.lm_infinite_attention(
            params.get("sinks", 10),
            params.get("window", length),
            params.get("cap", length),
            inv_freq,
        )
    window = params.get("window", min(length, W) - params.get("sinks", 4))
    return ref.streaming_attention(params.get("sinks", 4), window, inv_freq)


def without_model_window(attention):
    """The same reference with the layer's sliding window ignored."""

    def fn(module, query, key, value, attention_mask, **kwargs):
        kwargs.pop("sliding_window", None)
        return attention(module, query, key, value, attention_mask, **kwargs)

    return fn


def assert_close(got, want, what):
    err = (got.float() - want.float()).abs().max().item()
    assert err <= ATOL, f"{what}: max |logit difference| {err:.2e} > {ATOL:g}"


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts block-kernel calls; any call of transformers' dense SDPA path fails the test."""
    calls = []
    kernel = hf.block_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape[-2])
        return kernel(*args, **kwargs)

    def no_dense(*args, **kwargs):
        raise AssertionError("the dense SDPA fallback ran; the block kernel should have")

    monkeypatch.setattr(hf, "block_attention", counting)
    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", no_dense)
    return calls


def test_only_transformers_plain_sliding_window_causal_mask_is_recognised():
    sw = sliding_window_causal_mask_function(96)
    keep = torch.ones(1, 8, dtype=torch.bool)
    assert compat.sliding_window_of(sw, {"local_size": 96}) == 96
    assert compat.sliding_window_of(sw, {"local_size": 95}) is None, "local_size disagrees"
    assert compat.sliding_window_of(sw, {}) is None, "no local_size"
    assert compat.sliding_window_of(causal_mask_function, {"local_size": 96}) is None
    for other in (
        sliding_window_bidirectional_mask_function(96),
        and_masks(sw, padding_mask_function(keep)),
        or_masks(sw, causal_mask_function),
        and_masks(sliding_window_causal_mask_function(96), causal_mask_function),
    ):
        assert compat.sliding_window_of(other, {"local_size": 96}) is None


def test_sliding_layers_are_read_per_layer():
    assert compat.sliding_windows(tiny_model("mistral-swa")) == {0: W, 1: W}
    assert compat.sliding_windows(tiny_model("qwen2-swa")) == {0: None, 1: W}
    assert compat.sliding_windows(tiny_model("mistral")) == {0: None, 1: None}


@pytest.mark.parametrize("family", ["mistral-swa", "qwen2-swa"])
@torch.no_grad()
def test_block_attention_equals_sdpa_with_the_models_sliding_cache(family, kernel_calls):
    model = sharp_model(family)
    ids = tokens(400)
    want = model(ids).logits  # sdpa, through transformers' own registry (not patched)
    with hf.use(model):
        one_shot = model(ids).logits
        assert kernel_calls, "the block kernel never ran"
        state = prefill(model, ids[:, :300], chunk=128)  # the model's own sliding cache
        got = [state.logits]
        cache = state.cache
        kept = cache.layers[-1].keys.shape[-2]
        assert kept == W - 1, f"the sliding layer's cache keeps {kept} keys, expected {W - 1}"
        for t in range(300, 399):
            kwargs = compat.forward_kwargs(model, cache, t, 1)
            out = model(input_ids=ids[:, t : t + 1], use_cache=True, **kwargs)
            cache = compat.output_cache(out)
            got.append(out.logits[:, -1])
    assert_close(one_shot, want, f"longreach attention on {family}")
    assert_close(torch.stack(got, 1), want[:, 299:399], f"chunked prefill + decode on {family}")


# (method, params, family, length): the window bounds self-extend's grouped pairs and
# lm-infinite's band and sinks; streaming's cache (sinks + window <= 96) fits in it.
ONE_SHOT = [
    ("self-extend", dict(window=32, group=4), "mistral-swa", 300),
    ("self-extend", dict(window=48, group=3), "qwen2-swa", 400),
    ("lm-infinite", dict(sinks=4, window=64, cap=80), "mistral-swa", 300),
    ("lm-infinite", dict(), "qwen2-swa", 400),  # sliding layer: the window alone
    ("streaming", dict(sinks=4, window=60), "mistral-swa", 300),
    ("streaming", dict(), "qwen2-swa", 400),  # default window: 96 - 4
]


@pytest.mark.parametrize(("method", "params", "family", "length"), ONE_SHOT)
@torch.no_grad()
def test_one_shot_matches_the_windowed_reference_on_the_block_kernel(
    method, params, family, length, kernel_calls
):
    model = sharp_model(family)
    ids = tokens(length)
    fn = reference_fn(method, params, model)
    want = ref.reference_logits(model, ids, fn)
    vanilla = model(ids).logits  # sdpa with the model's own sliding window
    with lr.extend(model, method, **params):
        got = model(ids).logits
    assert kernel_calls, f"{method} never ran the block kernel"
    assert_close(got, want, f"{method} {params} on {family} at {length} tokens")
    change = (got - vanilla).abs().max().item()
    assert change > 1e-2, f"{method} changed the logits by only {change:.2e}: vanilla ran"
    if method != "streaming":  # streaming's cache never reaches the window
        unbounded = ref.reference_logits(model, ids, without_model_window(fn))
        gap = (unbounded - want).abs().max().item()
        assert gap > 1e-2, f"the model's window changes the reference by only {gap:.2e}"


DECODE = [
    ("self-extend", dict(window=48, group=5), "mistral-swa", 300),
    ("lm-infinite", dict(sinks=4, window=64, cap=80), "qwen2-swa", 300),
    ("streaming", dict(sinks=4, window=80), "mistral-swa", 300),
]


@pytest.mark.parametrize(("method", "params", "family", "length"), DECODE)
@torch.no_grad()
def test_chunked_prefill_then_decoding_matches_the_windowed_reference(
    method, params, family, length, kernel_calls
):
    model = sharp_model(family)
    ids = tokens(length, seed=1)
    want = ref.reference_logits(model, ids, reference_fn(method, params, model))
    start = length - 40
    with lr.extend(model, method, **params) as handle:
        state = prefill(model, ids[:, :start], chunk=64, cache=handle.new_cache())
        got = [state.logits]
        cache = state.cache
        for t in range(start, length):
            kwargs = compat.forward_kwargs(model, cache, t, 1)
            out = model(input_ids=ids[:, t : t + 1], use_cache=True, **kwargs)
            cache = compat.output_cache(out)
            got.append(out.logits[:, -1])
    got = torch.stack(got[:-1], dim=1)
    assert_close(got, want[:, start - 1 : length - 1], f"{method} {params} decoding on {family}")


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("self-extend", dict(window=32, group=4)),
        ("lm-infinite", dict(sinks=4, window=64, cap=80)),
    ],
)
@torch.no_grad()
def test_generate_replaces_the_models_sliding_cache_with_a_full_one(method, params):
    model = sharp_model("mistral-swa")
    ids = tokens(200, seed=2)
    with lr.extend(model, method, **params):
        out = model.generate(
            input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None
        )
        state = prefill(model, ids, chunk=64)
        want = greedy(model, state, 6)
    assert out[0, -6:].tolist() == want[0].tolist(), (
        f"{method}: generate gives {out[0, -6:].tolist()}, prefill + greedy {want[0].tolist()}"
    )


@torch.no_grad()
def test_a_sliding_cache_that_dropped_keys_is_refused():
    model = tiny_model("mistral-swa")
    ids = tokens(201)
    cache = DynamicCache(config=model.config)
    model(ids[:, :200], use_cache=True, **compat.forward_kwargs(model, cache, 0, 200))
    with lr.extend(model, "self-extend", window=32, group=4):
        with pytest.raises(LongreachError) as err:
            model(ids[:, 200:], use_cache=True, **compat.forward_kwargs(model, cache, 200, 1))
    assert str(err.value) == (
        "windowed methods address keys by their position from the start of the input, but "
        "this KV cache dropped the oldest ones (a sliding-window cache); let the method make "
        "the cache (pass no cache, or the extension's new_cache())."
    )


@pytest.mark.parametrize(
    ("method", "params", "family", "length"),
    [
        ("self-extend", dict(window=32, group=1), "mistral-swa", 300),  # group size 1
        ("self-extend", dict(window=256, group=4), "qwen2-swa", 240),  # window >= length
        ("lm-infinite", dict(window=256), "qwen2-swa", 240),
        ("streaming", dict(sinks=4, window=92), "mistral-swa", 96),  # cache >= length
        ("streaming", dict(sinks=4, window=92), "qwen2-swa", 96),
    ],
)
@torch.no_grad()
def test_degenerate_settings_reproduce_the_sliding_model(method, params, family, length):
    model = tiny_model(family)
    ids = tokens(length)
    want = model(ids).logits
    with lr.extend(model, method, **params):
        got = model(ids).logits
    assert_close(got, want, f"{method} {params} (degenerate) on {family}")


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        (
            "self-extend",
            dict(window=96, group=4),
            "self-extend: every layer of MistralForCausalLM attends only to its 96 most recent "
            "tokens (sliding window), all within window=96, so self-extend would change "
            "nothing; pass window below 96.",
        ),
        (
            "lm-infinite",
            dict(),
            "lm-infinite: every layer of MistralForCausalLM attends only to its 96 most recent "
            "tokens (sliding window), all within window=256, so lm-infinite would change "
            "nothing; pass window below 96.",
        ),
        (
            "streaming",
            dict(window=100),
            "streaming: sinks + window (4 + 100) must not exceed the model's sliding window "
            "(96): its sliding layers would drop the sinks; pass window <= 92.",
        ),
        (
            "infllm",
            dict(),
            "infllm: MistralForCausalLM has sliding-window attention layers, which infllm's "
            "memory layout does not combine with yet; use a model without a sliding window.",
        ),
    ],
)
def test_impossible_combinations_are_refused_at_extend_time(method, params, message):
    model = tiny_model("mistral-swa")
    with pytest.raises(LongreachError) as err:
        lr.extend(model, method, **params)
    assert str(err.value) == message
    assert model.config._attn_implementation == "sdpa"


def test_streaming_default_window_fits_the_sliding_window():
    model = tiny_model("mistral-swa")
    with lr.extend(model, "streaming") as handle:
        assert handle.new_cache().capacity == W, "sinks + window should default to the window"


@torch.no_grad()
def test_the_dense_fallback_never_runs_a_methods_layout_silently():
    model = tiny_model("mistral-swa")
    ids = tokens(50)
    dense = torch.ones(50, 50, dtype=torch.bool).tril()[None, None]
    with lr.extend(model, "self-extend", window=32, group=4):
        with pytest.raises(LongreachError) as err:
            model(ids, attention_mask=dense)
    assert str(err.value) == (
        "longreach attention cannot apply SelfExtendLayout here: this call has a dense 4-D "
        "attention mask or a mask pattern the block kernel cannot express (packed sequences, "
        "overlays); pass a 2-D padding mask or none (the dense fallback would silently "
        "compute plain causal attention instead)."
    )


@torch.no_grad()
def test_a_custom_layout_refuses_a_sliding_cache_that_dropped_keys():
    from longreach.attention import LambdaLayout

    model = tiny_model("mistral-swa")
    ids = tokens(201)
    with hf.use(model, LambdaLayout(sinks=4, window=32)):
        cache = DynamicCache(config=model.config)
        model(ids[:, :200], use_cache=True, **compat.forward_kwargs(model, cache, 0, 200))
        with pytest.raises(LongreachError) as err:
            model(ids[:, 200:], use_cache=True, **compat.forward_kwargs(model, cache, 200, 1))
    assert str(err.value) == (
        "LambdaLayout addresses keys by position from the start of the input, but this "
        "sliding-window KV cache dropped the oldest ones; pass a cache that keeps every key "
        "(transformers.DynamicCache() without a config)."
    )
