"""Eviction policies (h2o, snapkv): exact with a large budget, the dense reference, real freeing."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from tiny import sharp_model, tiny_model, tokens

import longreach as lr
from longreach import LongreachError, compat
from longreach.memory.evicting import EvictingCache


def chunked_logits(model, ids, chunk, cache):
    """Every position's logits, feeding ``ids`` in calls of ``chunk`` tokens."""
    out = []
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            kwargs = {compat.cache_kwarg(model): cache}
            out.append(model(input_ids=ids[:, s : s + chunk], **kwargs).logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("spec", ["h2o:budget=1000", "snapkv:budget=1000"])
def test_a_budget_above_the_input_changes_nothing(spec):
    model = tiny_model("llama")
    ids = tokens(500)
    with torch.no_grad():
        want = model(ids).logits
        want_chunked = lr.prefill(model, ids, chunk=128).logits
    with lr.extend(model, spec), torch.no_grad():
        got = model(ids).logits
        state = lr.prefill(model, ids, chunk=128)
    assert torch.equal(got, want), f"one pass: max |d| {float((got - want).abs().max())}"
    err = float((state.logits - want_chunked).abs().max())
    assert err < 1e-5, f"chunked: max |d| {err}, expected < 1e-5"
    assert isinstance(state.cache, EvictingCache) and state.cache.resident == [500] * 2


CASES = [
    ("h2o", dict(budget=96, recent=32), 48),
    ("h2o", dict(budget=80, recent=16, sinks=4, per_head=False), 40),
    ("snapkv", dict(budget=96, window=16, kernel=5), 48),
    ("snapkv", dict(budget=64, window=8, kernel=3, per_head=False, sinks=2), 32),
]


@pytest.mark.parametrize(("policy", "params", "chunk"), CASES)
def test_chunked_prefill_matches_the_dense_reference(policy, params, chunk):
    model = sharp_model(scale=6.0)
    n = 300
    ids = tokens(n, seed=7)
    kept: dict = {}
    attention = ref.eviction_attention(
        policy=policy, calls=list(range(0, n, chunk)), kept=kept, **params
    )
    want = ref.reference_logits(model, ids, attention)
    with lr.extend(model, policy, **params) as handle:
        cache = handle.new_cache()
        got = chunked_logits(model, ids, chunk, cache)
    err = float((got - want).abs().max())
    assert err < 1e-4, f"{policy} {params}: max |d logits| {err} against the reference"
    for layer, heads in kept.items():
        have = cache.layer(layer).positions.sort(-1).values.tolist()
        assert have == heads, f"layer {layer}: kept {have}, the reference kept {heads}"


def test_decoding_evicts_under_h2o_and_not_under_snapkv():
    model = tiny_model("llama")
    ids = tokens(400)
    for spec, after in (("h2o:budget=128", 128), ("snapkv:budget=128,window=16", 128 + 9)):
        with lr.extend(model, spec), torch.no_grad():
            state = lr.prefill(model, ids, chunk=100)
            lr.greedy(model, state, 10)
        assert state.cache.resident == [after] * 2, f"{spec}: {state.cache.resident}"
        assert state.cache.get_seq_length() == 409


def test_the_cache_really_shrinks():
    model = tiny_model("llama")
    ids = tokens(1000)
    with lr.extend(model, "h2o:budget=100"), torch.no_grad():
        state = lr.prefill(model, ids, chunk=200)
    layer = state.cache.layer(0)
    heads, dim = (
        model.config.num_key_value_heads,
        model.config.hidden_size // model.config.num_attention_heads,
    )
    assert tuple(layer.keys.shape) == (1, heads, 100, dim)
    assert tuple(layer.values.shape) == (1, heads, 100, dim)
    # keys and values, plus a position (int64) and a score (fp32) per slot and head
    per_layer = 2 * heads * 100 * dim * layer.keys.element_size() + heads * 100 * (8 + 4)
    assert state.cache.nbytes == len(state.cache.layers) * per_layer
    assert (
        layer.keys.untyped_storage().nbytes() == layer.keys.numel() * layer.keys.element_size()
    ), "the kept keys are a new tensor, not a view of the old one"


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("h2o:budget=0", "budget must be a positive"),
        ("h2o:budget=10,recent=20", "must not exceed the budget"),
        ("snapkv:kernel=4", "kernel must be a positive odd"),
        ("snapkv:budget=10,window=20", "must not exceed the budget"),
        ("h2o:recent=-1", ">= 0"),
    ],
)
def test_bad_parameters_are_one_line(spec, words):
    from longreach.methods import build_method

    with pytest.raises(LongreachError, match=words):
        build_method(spec)


def test_batches_and_padding_are_refused_in_one_line():
    model = tiny_model("llama")
    ids = tokens(40).repeat(2, 1)
    with lr.extend(model, "h2o:budget=16"), torch.no_grad(), pytest.raises(LongreachError):
        lr.prefill(model, ids, chunk=20)


def test_sirllm_matches_the_dense_reference():
    model = sharp_model(scale=6.0)
    n, chunk = 240, 40
    ids = tokens(n, seed=3)
    params = dict(budget=70, sinks=4, recent=16)
    want, kept = ref.sirllm_logits(
        model, ids, calls=list(range(0, n, chunk)),
        inv_freq=model.model.rotary_emb.inv_freq, **params,
    )  # fmt: skip
    with lr.extend(model, "sirllm", **params) as handle:
        cache = handle.new_cache()
        got = chunked_logits(model, ids, chunk, cache)
    err = float((got - want).abs().max())
    assert err < 1e-4, f"sirllm: max |d logits| {err} against the reference"
    for layer in cache.layers:
        have = layer.positions[0].tolist()
        assert have == kept, f"layer {layer.layer}: kept {have}, the reference kept {kept}"


def test_sirllm_with_a_large_budget_is_the_model():
    model = tiny_model("qwen2")
    ids = tokens(200)
    with torch.no_grad():
        want = lr.prefill(model, ids, chunk=50).logits
    with lr.extend(model, "sirllm:budget=256"), torch.no_grad():
        got = lr.prefill(model, ids, chunk=50).logits
    err = float((got - want).abs().max())
    assert err < 1e-5, f"max |d| {err}"


def test_sirllm_decay_lowers_old_scores():
    model = tiny_model("llama")
    with lr.extend(model, "sirllm:budget=64,decay=0.5") as handle, torch.no_grad():
        state = lr.prefill(model, tokens(100), chunk=50)
        before = state.cache.layer(0).scores.clone()
        handle.method.new_turn(state.cache)
    after = state.cache.layer(0).scores
    finite = torch.isfinite(before)
    assert torch.allclose(after[finite], before[finite] * 0.5)


@pytest.mark.parametrize(
    ("family", "params"),
    [("llama", dict(window=24, every=2)), ("qwen2", dict(window=40, layers="1"))],
)
def test_spans_match_the_dense_reference(family, params):
    model = sharp_model(family, scale=6.0)
    ids = tokens(260, seed=5)
    count = model.config.num_hidden_layers
    full = (
        {int(x) for x in params["layers"].split("+")}
        if "layers" in params
        else set(range(0, count, params["every"]))
    )
    want = ref.reference_logits(model, ids, ref.spans_attention(full, params["window"]))
    with lr.extend(model, "spans", **params) as handle:
        cache = handle.new_cache()
        got = chunked_logits(model, ids, 50, cache)
    err = float((got - want).abs().max())
    assert err < 1e-4, f"spans {params}: max |d logits| {err} against the reference"
    want_resident = [260 if layer in full else params["window"] - 1 for layer in range(count)]
    assert cache.resident == want_resident, f"resident {cache.resident}, expected {want_resident}"


def test_spans_with_every_layer_full_is_the_model():
    model = tiny_model("llama")
    ids = tokens(300)
    with torch.no_grad():
        want = lr.prefill(model, ids, chunk=64).logits
    with lr.extend(model, "spans:every=1"), torch.no_grad():
        got = lr.prefill(model, ids, chunk=64).logits
    assert float((got - want).abs().max()) < 1e-5


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("spans:layers=a+b", "layer indices"),
        ("spans:every=0", "every must be"),
        ("sirllm:decay=2", "decay"),
    ],
)
def test_more_bad_parameters_are_one_line(spec, words):
    from longreach.methods import build_method

    with pytest.raises(LongreachError, match=words):
        build_method(spec)


def test_spans_refuses_a_layer_the_model_lacks():
    model = tiny_model("llama")
    with pytest.raises(LongreachError, match="does not exist"):
        lr.extend(model, "spans:layers=0+9")


def test_slot_rotated_keys_follow_evictions_while_decoding():
    # positions inside the cache: after any mix of appends and evictions the keys returned
    # are the stored (un-rotated) keys rotated by their slot, however they were kept
    from types import SimpleNamespace

    from longreach.attention.rotary import rotate

    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    cache = EvictingCache(layers=1, method="test", rotary=SimpleNamespace(inv_freq=inv_freq))
    layer = cache.layer(0)
    gen = torch.Generator().manual_seed(0)

    def fed(n: int) -> torch.Tensor:  # keys as the model gives them: rotated at their slots
        raw = torch.randn(1, 2, n, 8, generator=gen)
        return rotate(raw, torch.arange(layer.resident, layer.resident + n), inv_freq)

    def check(returned: torch.Tensor) -> None:
        want = rotate(layer.keys, torch.arange(layer.resident), inv_freq)
        assert torch.allclose(returned, want, atol=1e-5), float((returned - want).abs().max())

    keys, _ = layer.update(fed(12), torch.randn(1, 2, 12, 8))  # a prefill chunk
    check(keys)
    layer.keep(torch.tensor([0, 1, 3, 4, 6, 7, 8, 9, 10, 11]))
    for step in range(6):  # decoding: append one, evict one (shared, then per head)
        keys, _ = layer.update(fed(1), torch.randn(1, 2, 1, 8))
        check(keys)
        resident = layer.resident
        if step % 2:
            drop = [2 + step, 4]
            index = torch.stack(
                [torch.tensor([i for i in range(resident) if i != d]) for d in drop]
            )
        else:
            index = torch.tensor([i for i in range(resident) if i != 3 + step])
        layer.keep(index)
        assert layer.rotated is not None and layer.rotated.shape == layer.keys.shape
        check(layer.rotated)
    keys, _ = layer.update(fed(5), torch.randn(1, 2, 5, 8))  # a longer call again
    check(keys)
    assert layer.rotated is None, "a multi-token call keeps no rotated copy"
