"""Chunked prefill then greedy decoding gives the tokens of one-shot prefill."""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES, tiny_model

import longreach.attention as la
from longreach import compat
from longreach.errors import LongreachError
from longreach.prefill import greedy, prefill


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
