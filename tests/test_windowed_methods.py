"""self-extend, lm-infinite and streaming against dense references, degenerate settings and errors.

The references (tests/reference.py) build the full score matrix (or simulate the
streaming cache one query at a time) in float64; the methods run on the block-sparse
attention. Tiny models are trained on 256 tokens, inputs run to 2000.
"""

import pytest
import reference as ref
import torch
from tiny import sharp_model, tiny_model, tokens

import longreach as lr
from longreach import LongreachError, compat
from longreach.prefill import prefill

ATOL = 1e-4


def inv_freq(model):
    return model.model.rotary_emb.inv_freq


def reference_fn(method, params, model):
    if method == "self-extend":
        return ref.self_extend_attention(params["window"], params["group"], inv_freq(model))
    if method == "lm-infinite":
        length = model.config.max_position_embeddings
        return ref.lm_infinite_attention(
            params.get("sinks", 10),
            params.get("window", length),
            params.get("cap", length),
            inv_freq(model),
        )
    return ref.streaming_attention(params.get("sinks", 4), params["window"], inv_freq(model))


def assert_close(got, want, what):
    err = (got.float() - want.float()).abs().max().item()
    assert err <= ATOL, f"{what}: max |logit difference| {err:.2e} > {ATOL:g}"


# (method, params, family, length): several windows, lengths 300-2000, every family
ONE_SHOT = [
    ("self-extend", dict(window=32, group=4), "llama", 300),
    ("self-extend", dict(window=100, group=3), "qwen2", 1000),
    ("self-extend", dict(window=256, group=8), "gemma", 2000),
    ("lm-infinite", dict(sinks=4, window=64, cap=128), "mistral", 300),
    ("lm-infinite", dict(), "llama", 1000),
    ("lm-infinite", dict(sinks=3, window=100, cap=100), "gemma", 1200),
    ("streaming", dict(sinks=4, window=60), "qwen2", 300),
    ("streaming", dict(sinks=4, window=200), "mistral", 600),
    ("streaming", dict(sinks=2, window=100), "llama", 1000),
]


@pytest.mark.parametrize(("method", "params", "family", "length"), ONE_SHOT)
@torch.no_grad()
def test_one_shot_forward_matches_dense_reference(method, params, family, length):
    model = sharp_model(family)
    ids = tokens(length)
    want = ref.reference_logits(model, ids, reference_fn(method, params, model))
    vanilla = model(ids).logits
    with lr.extend(model, method, **params):
        got = model(ids).logits
    assert_close(got, want, f"{method} {params} on {family} at {length} tokens")
    # the method really changes something at this length
    assert (vanilla - want).abs().max().item() > 1e-2


DECODE = [
    ("self-extend", dict(window=48, group=5), "mistral", 700),
    ("lm-infinite", dict(sinks=4, window=96, cap=160), "qwen2", 700),
    ("streaming", dict(sinks=4, window=80), "gemma", 700),
    ("streaming", dict(sinks=0, window=50), "llama", 400),
]


@pytest.mark.parametrize(("method", "params", "family", "length"), DECODE)
@torch.no_grad()
def test_prefill_then_token_by_token_matches_dense_reference(method, params, family, length):
    model = sharp_model(family)
    ids = tokens(length, seed=1)
    want = ref.reference_logits(model, ids, reference_fn(method, params, model))
    start = length - 60
    with lr.extend(model, method, **params) as handle:
        state = prefill(model, ids[:, :start], chunk=128, cache=handle.new_cache())
        got = [state.logits]
        cache = state.cache
        for t in range(start, length):
            kwargs = compat.forward_kwargs(model, cache, t, 1)
            out = model(input_ids=ids[:, t : t + 1], use_cache=True, **kwargs)
            cache = compat.output_cache(out)
            got.append(out.logits[:, -1])
            if method == "streaming":
                size = params["sinks"] + params["window"]
                assert cache.get_seq_length() <= size, (
                    f"streaming cache holds {cache.get_seq_length()} tokens, expected <= {size}"
                )
    got = torch.stack(got[:-1], dim=1)
    assert_close(got, want[:, start - 1 : length - 1], f"{method} {params} decoding on {family}")


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("self-extend", dict(window=256, group=4)),  # window >= input length
        ("self-extend", dict(window=16, group=1)),  # group size 1
        ("lm-infinite", dict(window=256)),
        ("streaming", dict(sinks=4, window=252)),
    ],
)
@pytest.mark.parametrize("family", ["llama", "gemma"])
@torch.no_grad()
def test_degenerate_settings_reproduce_the_model(method, params, family):
    model = tiny_model(family)
    ids = tokens(300 if params.get("group") == 1 else 240)
    want = model(ids).logits
    with lr.extend(model, method, **params):
        got = model(ids).logits
    assert_close(got, want, f"{method} {params} (degenerate) on {family}")


def left_padded(lengths, seed=3):
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = tokens(n, seed=seed + row)[0]
        mask[row, width - n :] = 1
    return ids, mask


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("self-extend", dict(window=40, group=4)),
        ("lm-infinite", dict(sinks=4, window=50, cap=80)),
        ("streaming", dict(sinks=4, window=50)),
    ],
)
@torch.no_grad()
def test_generate_with_left_padding_matches_each_row_alone_and_remove_restores(method, params):
    model = tiny_model("llama")
    ids, mask = left_padded([300, 220])
    before = model(ids, attention_mask=mask).logits
    with lr.extend(model, method, **params):
        batch = model(ids, attention_mask=mask).logits
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        for row, n in enumerate([300, 220]):
            alone = ids[row : row + 1, -n:]
            logits = model(alone).logits
            assert_close(batch[row : row + 1, -n:], logits, f"{method} padded row {row}")
            out = model.generate(
                input_ids=alone,
                max_new_tokens=12,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
            assert torch.equal(generated[row, -12:], out[0, -12:]), (
                f"{method}: row {row} generates {generated[row, -12:].tolist()} in the batch "
                f"but {out[0, -12:].tolist()} alone"
            )
    after = model(ids, attention_mask=mask).logits
    assert torch.equal(before, after), f"{method}: logits after remove() differ from before"
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "self-extend:group=0",
            "self-extend: group must be >= 1 (got 0); 1 leaves the model unchanged.",
        ),
        ("self-extend:window=0", "self-extend: window must be > 0 tokens (got 0)."),
        (
            "self-extend:window=200,original_max=100",
            "self-extend: window (200) must not exceed the trained length 100: neighbour positions would leave the trained range.",
        ),
        ("lm-infinite:window=0", "lm-infinite: window must be > 0 tokens (got 0)."),
        ("lm-infinite:sinks=-1", "lm-infinite: sinks must be >= 0 tokens (got -1)."),
        ("lm-infinite:cap=0", "lm-infinite: cap must be > 0 tokens (got 0)."),
        (
            "lm-infinite:window=300,cap=200",
            "lm-infinite: window (300) must not exceed the distance cap (200); the local branch keeps true distances, which the cap bounds.",
        ),
        ("streaming:window=0", "streaming: window must be > 0 tokens (got 0)."),
        ("streaming:sinks=-2", "streaming: sinks must be >= 0 tokens (got -2)."),
        (
            "streaming:window=100,original_max=50",
            "streaming: sinks + window (4 + 100) must not exceed the trained length 50: positions inside the cache would leave the trained range.",
        ),
    ],
)
def test_bad_parameters_raise_one_line_errors(spec, message):
    with pytest.raises(LongreachError) as err:
        lr.methods.build_method(spec)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        (
            "self-extend",
            dict(window=512),
            "self-extend: window (512) must not exceed the trained length 256: neighbour positions would leave the trained range.",
        ),
        (
            "lm-infinite",
            dict(window=300),
            "lm-infinite: window (300) must not exceed the distance cap (256); the local branch keeps true distances, which the cap bounds.",
        ),
        (
            "streaming",
            dict(window=300),
            "streaming: sinks + window (4 + 300) must not exceed the trained length 256: positions inside the cache would leave the trained range.",
        ),
    ],
)
def test_window_larger_than_the_trained_length_is_refused_on_the_model(method, params, message):
    model = tiny_model("llama")
    with pytest.raises(LongreachError) as err:
        lr.extend(model, method, **params)
    assert str(err.value) == message
    assert model.config._attn_implementation == "sdpa"


@torch.no_grad()
def test_right_padding_and_two_windowed_methods_are_refused():
    model = tiny_model("llama")
    ids = tokens(40, batch=2)
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0
    with lr.extend(model, "lm-infinite", window=16, cap=16):
        with pytest.raises(LongreachError) as err:
            model(ids, attention_mask=mask)
        assert str(err.value) == (
            "windowed methods need left padding (real tokens last in every row); pad the batch on the left."
        )
        with pytest.raises(LongreachError) as err:
            lr.extend(model, "streaming", window=16)
        assert "cannot be applied while lm-infinite is active" in str(err.value)
