"""hip: exact with k past the number of blocks, the dense reference of its search, the search."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from tiny import sharp_model, tiny_model, tokens

import longreach as lr
from longreach import LongreachError, compat
from longreach.methods import build_method
from longreach.methods.hip import search

GEOMETRY = dict(block=8, window=32, chunk=64, sinks=4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_k_past_the_number_of_blocks_is_dense_attention(family):
    model = tiny_model(family)
    ids = tokens(700)
    with torch.no_grad():
        want = model(ids).logits
        want_state = lr.prefill(model, ids, chunk=128)
        want_new = lr.greedy(model, want_state, 6)
    with lr.extend(model, "hip", k=1000, **GEOMETRY), torch.no_grad():
        got = model(ids).logits
        state = lr.prefill(model, ids, chunk=128)
        new = lr.greedy(model, state, 6)
    assert float((got - want).abs().max()) < 1e-5
    assert torch.equal(new, want_new)


@pytest.mark.parametrize(("k", "n", "dense_layers"), [(4, 600, 0), (2, 900, 1), (6, 1000, 0)])
def test_one_pass_and_chunked_prefill_match_the_dense_reference(k, n, dense_layers):
    model = sharp_model(scale=6.0)
    ids = tokens(n, seed=n)
    spec = dict(GEOMETRY, k=k, dense_layers=dense_layers)
    want = ref.reference_logits(model, ids, ref.hip_attention(**spec))
    with lr.extend(model, "hip", **spec), torch.no_grad():
        got = model(ids).logits
    err = float((got - want).abs().max())
    assert err < 1e-4, f"one pass: max |d logits| {err} against the reference"
    calls = list(range(0, n, 128))
    want = ref.reference_logits(model, ids, ref.hip_attention(**spec, calls=calls))
    with lr.extend(model, "hip", **spec) as handle, torch.no_grad():
        cache, out = handle.new_cache(), []
        kw = {}
        for s in calls:
            if cache is not None:
                kw = {compat.cache_kwarg(model): cache}
            step = model(input_ids=ids[:, s : s + 128], use_cache=True, **kw)
            cache = compat.output_cache(step)
            out.append(step.logits)
    err = float((torch.cat(out, 1) - want).abs().max())
    assert err < 1e-4, f"chunked: max |d logits| {err} against the reference"


def test_the_search_finds_the_best_blocks_of_a_planted_score():
    n_blocks, k = 64, 4
    wanted = torch.tensor([[3, 17, 40, 63], [0, 1, 2, 50]])
    value = torch.zeros(2, n_blocks)
    for h in range(2):
        value[h, wanted[h]] = torch.tensor([10.0, 9.0, 8.0, 7.0])
    # a span's score is its best block's: the planted blocks win at every level
    cummax = value

    def scores_of(lo, hi):
        out = torch.full(lo.shape, float("-inf"))
        for h in range(lo.shape[0]):
            for m in range(lo.shape[1]):
                if hi[h, m] > lo[h, m]:
                    out[h, m] = cummax[h, lo[h, m] : hi[h, m]].max()
        return out

    got = search(scores_of, n_blocks, k, 2, "cpu")
    assert got.tolist() == wanted.tolist(), got
    assert search(scores_of, 3, 4, 2, "cpu").tolist() == [[0, 1, 2], [0, 1, 2]]


def test_bad_parameters_are_one_line():
    for spec, words in (
        ("hip:k=0", "k must be"),
        ("hip:sinks=-1", ">= 0"),
        ("hip:chunk=0", "chunk must be"),
    ):
        with pytest.raises(LongreachError, match=words):
            build_method(spec)
