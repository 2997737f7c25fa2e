"""hyper: exact settings, the dense reference of its rule, seeds, chunked calls, padding, errors."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from tiny import sharp_model, tiny_model, tokens

import longreach as lr
from longreach import LongreachError, compat
from longreach.methods import build_method
from longreach.methods.hyper import buckets, gray_rank

# Small enough that a few hundred tokens split, sort, block and sample at every level.
SMALL = dict(min_seq_len=64, block_size=32, sample_size=16, lsh_num_projs=3)


def chunked_logits(model, ids, spec, calls):
    """Logits of ``ids`` fed as model calls starting at ``calls``, under hyper ``spec``."""
    with lr.extend(model, "hyper", **spec) as handle, torch.no_grad():
        cache, out = handle.new_cache(), []
        bounds = [*calls, ids.shape[1]]
        for s, e in zip(bounds, bounds[1:], strict=False):
            kw = {compat.cache_kwarg(model): cache} if cache is not None else {}
            step = model(input_ids=ids[:, s:e], use_cache=True, **kw)
            cache = compat.output_cache(step)
            out.append(step.logits)
    return torch.cat(out, 1)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_below_min_seq_len_and_with_one_block_it_is_vanilla(family):
    model = tiny_model(family)
    ids = tokens(600)
    with torch.no_grad():
        want = model(ids).logits
        want_new = lr.greedy(model, lr.prefill(model, ids, chunk=128), 6)
    # defaults: 600 tokens are below min_seq_len (4096); then min_seq_len 50 with blocks of
    # 1000 keys: the causal split runs to depth 4, every rectangle is one block, exact
    for spec in ({}, dict(min_seq_len=50, block_size=1000, sample_size=16)):
        with lr.extend(model, "hyper", **spec), torch.no_grad():
            got = model(ids).logits
            new = lr.greedy(model, lr.prefill(model, ids, chunk=128), 6)
        err = float((got - want).abs().max())
        assert err < 1e-5, f"{spec}: max |d logits| {err}, expected vanilla's (< 1e-5)"
        assert torch.equal(new, want_new), f"{spec}: decoded {new.tolist()}, vanilla {want_new}"


@pytest.mark.parametrize(
    ("n", "spec"),
    [
        (700, SMALL),
        (1000, dict(min_seq_len=100, block_size=48, sample_size=24, lsh_num_projs=4, seed=3)),
        (513, dict(SMALL, sample_size=0)),
    ],
)
def test_one_pass_matches_the_dense_reference(n, spec):
    model = sharp_model(scale=6.0)
    ids = tokens(n, seed=n)
    want = ref.reference_logits(model, ids, ref.hyper_attention(**spec))
    with torch.no_grad():
        dense = model(ids).logits
    with lr.extend(model, "hyper", **spec), torch.no_grad():
        got = model(ids).logits
    err = float((got - want).abs().max())
    assert err < 1e-4, f"max |d logits| {err} against the reference (expected < 1e-4)"
    # the rule is not dense attention: the reference would not tell them apart otherwise
    assert float((want - dense).abs().max()) > 1e-2


def test_chunked_prefill_and_decoding_match_the_dense_reference():
    model = sharp_model(scale=6.0)
    ids = tokens(800, seed=8)
    # chunks of 128 queries (>= min_seq_len 64: their earlier keys use the estimator), a
    # ragged last chunk, then five decoded tokens (one query each: exact attention)
    calls = [*range(0, 768, 128), 768, *range(795, 800)]
    want = ref.reference_logits(model, ids, ref.hyper_attention(**SMALL, calls=calls))
    got = chunked_logits(model, ids, SMALL, calls)
    err = float((got - want).abs().max())
    assert err < 1e-4, f"max |d logits| {err} against the reference (expected < 1e-4)"
    one_pass = ref.reference_logits(model, ids, ref.hyper_attention(**SMALL))
    assert float((one_pass - want).abs().max()) > 1e-3, "chunking should change the split"


def test_decoding_is_exact_attention_over_the_cache():
    model = sharp_model(scale=6.0)
    ids = tokens(600, seed=6)
    # a one-query call sees every earlier key exactly: decoded logits equal a forward whose
    # last query attends everything, i.e. the reference with the last token as its own call
    want = ref.reference_logits(model, ids, ref.hyper_attention(**SMALL, calls=(0, 599)))
    got = chunked_logits(model, ids, SMALL, [0, 599])
    assert float((got - want).abs().max()) < 1e-4
    with torch.no_grad():
        dense_last = model(ids).logits[:, -1]
    # layer 0's last row is exact, but it reads keys of earlier rows that used the rule
    assert float((got[:, -1] - dense_last).abs().max()) > 1e-3


def test_padded_keys_are_never_attended():
    model = sharp_model(scale=6.0)
    ids = tokens(600, seed=5)
    mask = torch.ones_like(ids)
    mask[:, :37] = 0
    want = ref.reference_logits(
        model, ids, ref.hyper_attention(**SMALL, keep=mask[0].bool()), attention_mask=mask
    )
    with lr.extend(model, "hyper", **SMALL), torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    err = float((got[:, 37:] - want[:, 37:]).abs().max())
    assert err < 1e-4, f"real rows: max |d logits| {err} against the reference (expected < 1e-4)"


def test_a_left_padded_batch_in_the_exact_setting_equals_each_row_alone():
    model = tiny_model("llama")
    spec = dict(min_seq_len=40, block_size=1000)
    a, b = tokens(300, seed=1), tokens(260, seed=2)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 40, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    with torch.no_grad():
        want = [model(x).logits[0, -1] for x in (a, b)]
    with lr.extend(model, "hyper", **spec), torch.no_grad():
        state = lr.prefill(model, ids, chunk=300, attention_mask=mask)
    for row in range(2):
        err = float((state.logits[row] - want[row]).abs().max())
        assert err < 1e-4, f"row {row}: max |d logits| {err} against the row alone"


def test_the_same_seed_reproduces_and_another_seed_differs():
    model = sharp_model(scale=6.0)
    ids = tokens(700, seed=7)
    out = {}
    for seed in (0, 0, 1):
        with lr.extend(model, "hyper", **SMALL, seed=seed), torch.no_grad():
            out.setdefault(seed, []).append(model(ids).logits)
    assert torch.equal(out[0][0], out[0][1]), "seed 0 twice gave different logits"
    diff = float((out[0][0] - out[1][0]).abs().max())
    assert diff > 1e-3, f"seeds 0 and 1 differ by only {diff}"


def test_only_the_last_layers_use_the_rule():
    model = sharp_model(scale=6.0)
    ids = tokens(700, seed=9)
    want = ref.reference_logits(model, ids, ref.hyper_attention(**SMALL, layers={1}))
    with lr.extend(model, "hyper", **SMALL, layers=1), torch.no_grad():
        got = model(ids).logits
    assert float((got - want).abs().max()) < 1e-4


def test_buckets_follow_the_gray_code_order():
    assert gray_rank(3).tolist() == [0, 1, 3, 2, 7, 6, 4, 5]
    # place r holds bucket r ^ (r >> 1): neighbours differ in exactly one hyperplane
    order = sorted(range(16), key=lambda b: int(gray_rank(4)[b]))
    assert all(bin(x ^ y).count("1") == 1 for x, y in zip(order, order[1:], strict=False))
    proj = torch.eye(3)  # hyperplane t: the sign of coordinate t
    x = torch.tensor([[-1.0, -1, -1], [1, -1, -1], [1, 1, -1], [-1, 1, -1], [-1, 1, 1]])
    assert buckets(x, proj, gray_rank(3)).tolist() == [0, 1, 2, 3, 4]


def test_bad_parameters_are_one_line():
    for spec, words in (
        ("hyper:block_size=0", "block_size must be >= 1"),
        ("hyper:sample_size=-1", "sample_size must be >= 0"),
        ("hyper:lsh_num_projs=0", "lsh_num_projs must be between 1 and 16"),
        ("hyper:min_seq_len=0", "min_seq_len must be >= 1"),
        ("hyper:layers=0", "layers must be -1"),
        ("hyper:seed=x", "seed"),
    ):
        with pytest.raises(LongreachError, match=words):
            build_method(spec)
    with pytest.raises(LongreachError, match="layers=5 but LlamaForCausalLM has 2 layers"):
        lr.extend(tiny_model("llama"), "hyper:layers=5")
    with pytest.raises(LongreachError, match="sliding-window"):
        lr.extend(tiny_model("mistral-swa"), "hyper")
