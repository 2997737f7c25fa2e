"""Chunked prefill then greedy decoding gives the tokens of one-shot prefill."""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES, tiny_model

import longreach as lr
import longreach.attention as la
from longreach import compat
from longreach.errors import LongreachError
from longreach.prefill import advance, current_planned_length, greedy, planned_length, prefill


def _ids(batch=2, n=53, seed=0):
    return torch.randint(3, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ["sdpa", "longreach"])
def test_chunked_prefill_then_greedy_equals_one_shot(family, attention):
    model = tiny_model(family)
    ids = _ids()
    one_shot = greedy(model, prefill(model, ids, chunk=ids.shape[1]), 10)
    with la.use(model) if attention == "longreach" else _nothing():
        state = prefill(model, ids, chunk=8)
        chunked = greedy(model, state, 10)
    assert state.length == ids.shape[1] + 9, (
        f"cache should hold input + 9 decoded tokens, holds {state.length}"
    )
    assert torch.equal(chunked, one_shot), (
        f"{family}/{attention}: chunked {chunked.tolist()} != one-shot {one_shot.tolist()}"
    )


def test_prefill_matches_generate_with_left_padding():
    model = tiny_model("llama")
    ids = _ids(2, 40)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    want = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)[
        :, ids.shape[1] :
    ]
    with la.use(model):
        got = greedy(model, prefill(model, ids, chunk=6, attention_mask=mask), 8)
    assert torch.equal(got, want), (
        f"padded chunked prefill + greedy {got.tolist()} != generate {want.tolist()}"
    )


def test_prefill_state_feeds_generate():
    model = tiny_model("qwen2")
    ids = _ids(1, 33)
    want = model.generate(ids, max_new_tokens=5, do_sample=False)
    state = prefill(model, ids[:, :-1], chunk=10)  # generate() runs the last token itself
    got = model.generate(
        ids, max_new_tokens=5, do_sample=False, **{compat.cache_kwarg(model): state.cache}
    )
    assert torch.equal(got, want), (
        f"generate from a chunked cache gave {got.tolist()}, expected {want.tolist()}"
    )


def test_prefill_keeps_only_last_logits_and_fills_cache():
    model = tiny_model("gemma")
    ids = _ids(2, 21)
    state = prefill(model, ids, chunk=4)
    assert state.logits.shape == (2, model.config.vocab_size), (
        f"logits shape {tuple(state.logits.shape)}"
    )
    kwargs = compat.forward_kwargs(model, None, past_length=0, query_length=21)
    with torch.no_grad():
        full = model(input_ids=ids, **kwargs).logits[:, -1]
    err = (state.logits - full).abs().max().item()
    assert err <= 1e-5, f"last logits of chunked prefill differ from one forward by {err:.2e}"
    assert state.cache.get_seq_length() == 21, (
        f"cache holds {state.cache.get_seq_length()} tokens, expected 21"
    )


def test_prefill_rejects_bad_chunk():
    model = tiny_model("llama")
    with pytest.raises(LongreachError, match="chunk"):
        prefill(model, _ids(1, 5), chunk=0)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_prefill_is_the_top_level_function():
    import longreach

    assert longreach.prefill is prefill and longreach.greedy is greedy


def test_prefill_continues_a_cache_that_holds_past_tokens():
    model = tiny_model("llama")
    ids = _ids(1, 60)
    whole = prefill(model, ids, chunk=60)
    head = prefill(model, ids[:, :25], chunk=7)
    rest = prefill(model, ids[:, 25:], chunk=7, cache=head.cache, past=25)
    err = (rest.logits - whole.logits).abs().max().item()
    assert err <= 1e-5, f"a prefill after 25 cached tokens differs from one pass by {err:.2e}"
    assert rest.length == 60 and rest.cache.get_seq_length() == 60
    with pytest.raises(LongreachError, match="needs the cache"):
        prefill(model, ids, past=3)


def test_greedy_stops_at_any_eos_id_and_at_the_stop_rule():
    model = tiny_model("llama")
    ids = _ids(1, 30)
    free = greedy(model, prefill(model, ids), 12)[0].tolist()
    third = free[2]
    ended = greedy(model, prefill(model, ids), 12, {9999, third})[0].tolist()
    assert ended == free[: free.index(third) + 1], f"stopped at {ended}, expected at {third}"
    seen = []

    def after_four(tokens):
        seen.append(tokens.shape[1])
        return tokens.shape[1] >= 4

    stopped = greedy(model, prefill(model, ids), 12, stop=after_four)[0].tolist()
    assert stopped == free[:4], f"stop rule gave {stopped}, expected {free[:4]}"
    assert seen == [1, 2, 3, 4], f"stop saw lengths {seen}"


def _dynamic_model():
    model = tiny_model("llama")  # trained length 256: dynamic NTK rescales past it
    return model, lr.extend(model, "dynamic-ntk", factor=4)


@torch.no_grad()
def test_dynamic_ntk_chunked_prefill_computes_one_forward():
    model, handle = _dynamic_model()
    ids = _ids(1, 600)
    with handle:
        one = model(ids).logits[:, -1]
        state = prefill(model, ids, chunk=128)
        chunked = (state.logits - one).abs().max().item()
        after_chunks = greedy(model, state, 8)
        after_one = greedy(model, prefill(model, ids, chunk=600), 8)
        cache, bare = None, {}
        for declared in (False, True):
            with planned_length(600) if declared else _nothing():
                cache = None
                for s in range(0, 600, 128):
                    kwargs = compat.forward_kwargs(model, cache, s, min(128, 600 - s))
                    out = model(input_ids=ids[:, s : s + 128], use_cache=True, **kwargs)
                    cache = compat.output_cache(out)
            bare[declared] = (out.logits[:, -1] - one).abs().max().item()
    assert chunked <= 1e-5, f"prefill(chunk=128) differs from one forward by {chunked:.2e}"
    assert torch.equal(after_chunks, after_one), (
        f"decoding after chunks {after_chunks.tolist()} != after one pass {after_one.tolist()}"
    )
    # The rule matters: bare chunked calls rescale per chunk (6.7e-4 measured) unless the
    # whole input's length is declared.
    assert bare[False] > 1e-4, f"bare chunked calls differ by only {bare[False]:.2e}"
    assert bare[True] <= 1e-5, f"declared bare chunks differ by {bare[True]:.2e}"


@torch.no_grad()
def test_dynamic_ntk_chunked_advance_and_padded_prefill_compute_one_call():
    model, handle = _dynamic_model()
    ids = _ids(2, 500, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    with handle:
        one = model(ids[:, :300], attention_mask=mask[:, :300]).logits[:, -1]
        whole = prefill(model, ids[:, :300], chunk=300, attention_mask=mask[:, :300])
        parts = prefill(model, ids[:, :300], chunk=64, attention_mask=mask[:, :300])
        err = (parts.logits - one).abs().max().item()
        assert err <= 1e-5, f"padded prefill in chunks of 64 differs from one call by {err:.2e}"
        # a further turn in one call, and in chunks: the same function
        whole = advance(model, whole, ids[:, 300:], chunk=200)
        parts = advance(model, parts, ids[:, 300:], chunk=48)
    err = (parts.logits - whole.logits).abs().max().item()
    assert err <= 1e-5, f"advance in chunks of 48 differs from one call by {err:.2e}"


def test_planned_length_nests_to_the_largest_and_ends_with_its_block():
    assert current_planned_length() is None
    with planned_length(500):
        with planned_length(200):
            assert current_planned_length() == 500
        with planned_length(800):
            assert current_planned_length() == 800
        assert current_planned_length() == 500
    assert current_planned_length() is None
