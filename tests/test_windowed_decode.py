"""Decode cost of the windowed methods: incremental work per token, same logits, tile plans.

self-extend keeps the grouped-position keys of a sequence and rotates each key once;
streaming writes each token into a buffer with room and rotates by slot from a kept
table. Both must give, at every decoded token, the dense reference's logits (float64,
tests/reference.py) and the logits of the earlier computation from scratch.
"""

import copy

import pytest
import reference as ref
import torch
from test_windowed_methods import assert_close, reference_fn, sharp_model, tokens
from tiny import tiny_model
from transformers import DynamicCache

import longreach as lr
from longreach import compat
from longreach.attention import rotate
from longreach.attention.layout import Kind, band_tile_rows
from longreach.methods.lm_infinite import LMInfiniteLayout
from longreach.methods.self_extend import GroupedKeys, SelfExtendLayout
from longreach.methods.streaming import StreamingCache, StreamingLayout
from longreach.prefill import prefill

PROMPT, STEPS = 300, 60


def decode_logits(model, ids, start, cache, copy_each_step=False):
    """Logits after ``ids[:, :start]`` (prefilled in chunks of 128), then token by token."""
    state = prefill(model, ids[:, :start], chunk=128, cache=cache)
    got, cache = [state.logits], state.cache
    for t in range(start, ids.shape[1]):
        if copy_each_step:  # a new cache object every step: nothing kept between calls
            cache = copy.deepcopy(cache)
        out = model(
            input_ids=ids[:, t : t + 1], use_cache=True, **compat.forward_kwargs(model, cache, t, 1)
        )
        cache = compat.output_cache(out)
        got.append(out.logits[:, -1])
    return torch.stack(got[:-1], dim=1), cache


@torch.no_grad()
def test_self_extend_rotates_each_grouped_key_once_and_matches_the_reference(monkeypatch):
    params = dict(window=48, group=5)
    model = sharp_model("llama")
    ids = tokens(PROMPT + STEPS, seed=3)
    want = ref.reference_logits(model, ids, reference_fn("self-extend", params, model))
    grouped = SelfExtendLayout.grouped
    counts: list[int] = []

    def counting(self, key, start, stop):
        counts.append(stop - start)
        return grouped(self, key, start, stop)

    monkeypatch.setattr(SelfExtendLayout, "grouped", counting)
    with lr.extend(model, "self-extend", **params):
        got, cache = decode_logits(model, ids, PROMPT, DynamicCache())
        kept = list(counts)
        counts.clear()
        scratch, _ = decode_logits(model, ids, PROMPT, DynamicCache(), copy_each_step=True)
        fresh = list(counts)
    assert_close(got, want[:, PROMPT - 1 : PROMPT + STEPS - 1], "self-extend decoding")
    assert torch.equal(got, scratch), (
        "self-extend with kept grouped keys must give bit-identical logits to rotating them "
        f"afresh; max |diff| {(got - scratch).abs().max().item():.2e}"
    )
    layers = model.config.num_hidden_layers
    needed = PROMPT + STEPS - params["window"]  # keys j <= i - W of the last query, i = n - 1
    assert sum(kept) == layers * needed, (
        f"kept grouped keys: {sum(kept)} key rotations over {layers} layers, expected "
        f"{layers * needed} (each key once)"
    )
    assert sum(fresh) > 20 * sum(kept), f"afresh: {sum(fresh)} rotations, kept: {sum(kept)}"


def test_grouped_keys_are_bit_identical_to_rotating_from_scratch_and_restart_when_reused():
    class Rotary:
        inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)

    layout = SelfExtendLayout(rotary=Rotary(), window=8, group=3)
    memory = GroupedKeys()
    key = torch.randn(1, 2, 0, 16)
    for step, new in enumerate([40, 1, 1, 7, 1, 300, 1]):
        q_offset = key.shape[2]
        key = torch.cat([key, torch.randn(1, 2, new, 16)], dim=2)
        needed = max(0, key.shape[2] - 8)
        got = memory.keys(0, key, needed, q_offset, layout)
        assert torch.equal(got, layout.grouped(key, 0, needed)), f"step {step}: keys differ"
    # the same cache refilled from slot 0 (a new sequence): nothing old may be reused
    other = torch.randn(1, 2, 50, 16)
    assert torch.equal(memory.keys(0, other, 42, 0, layout), layout.grouped(other, 0, 42))
    # new frequencies (a RoPE method applied meanwhile): everything is rotated again
    Rotary.inv_freq = Rotary.inv_freq * 0.5
    longer = torch.cat([other, torch.randn(1, 2, 1, 16)], dim=2)
    assert torch.equal(memory.keys(0, longer, 43, 50, layout), layout.grouped(longer, 0, 43))


@torch.no_grad()
def test_streaming_decodes_in_place_and_matches_the_reference():
    params = dict(sinks=4, window=60)
    model = sharp_model("qwen2")
    ids = tokens(PROMPT + STEPS, seed=4)
    want = ref.reference_logits(model, ids, reference_fn("streaming", params, model))
    storages = set()
    with lr.extend(model, "streaming", **params) as handle:
        cache = handle.new_cache()
        state = prefill(model, ids[:, :PROMPT], chunk=128, cache=cache)
        got = [state.logits]
        for t in range(PROMPT, PROMPT + STEPS):
            out = model(
                input_ids=ids[:, t : t + 1],
                use_cache=True,
                **compat.forward_kwargs(model, cache, t, 1),
            )
            got.append(out.logits[:, -1])
            storages.add(cache.layers[0].keys.untyped_storage().data_ptr())
            assert cache.get_seq_length() == sum(params.values()) - 1
    got = torch.stack(got[:-1], dim=1)
    assert_close(got, want[:, PROMPT - 1 : PROMPT + STEPS - 1], "streaming decoding")
    # one buffer per about sinks + window tokens, not a new tensor per step
    assert len(storages) <= 2, f"{STEPS} steps used {len(storages)} key buffers, expected <= 2"


def test_streaming_rotation_by_slot_equals_rotate():
    class Rotary:
        inv_freq = 1.0 / 10000 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32)

    cache = StreamingCache(4, 60, Rotary())
    for dtype in (torch.float32, torch.bfloat16):
        keys = torch.randn(1, 3, 200, 64, dtype=dtype)[..., :32]  # a strided view, as kept
        want = rotate(keys, torch.arange(200), Rotary.inv_freq)
        assert torch.equal(cache._rotate_by_slot(keys, Rotary.inv_freq), want), dtype


@torch.no_grad()
def test_streaming_batch_with_and_without_padding_agree():
    model = tiny_model("llama")
    ids = tokens(150, seed=5, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    with lr.extend(model, "streaming", sinks=4, window=40):
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0
        )
        alone = model.generate(ids[1:, 30:], max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert torch.equal(out[1, 150:], alone[0, 120:]), "padded row differs from the row alone"


# --------------------------------------------------------------------------- tile plans


def test_self_extend_at_32k_plans_band_sized_tiles_without_one_row_pieces():
    n = 32768
    layout = SelfExtendLayout(window=1024, group=8)
    plan = layout.plan(n, n, 0)
    rows = [p.q1 - p.q0 for t in plan.tiles for p in t.pieces]
    assert layout.tile_rows() == 8 * 1023, layout.tile_rows()
    assert len(plan.tiles) == 5, f"{len(plan.tiles)} tiles, expected 5"
    assert len(rows) == 75, f"{len(rows)} pieces, expected 75"
    assert min(rows) > 1, f"one-row pieces: {rows.count(1)}"
    assert plan.pairs == n * (n + 1) // 2  # causal: every pair once, nothing more
    old = SelfExtendLayout(window=1024, group=8, block=1024).plan(n, n, 0)
    assert sum(p.q1 - p.q0 == 1 for t in old.tiles for p in t.pieces) == 31


@pytest.mark.parametrize(
    ("layout", "tiles", "pieces"),
    [
        # two band runs per tile plus the sinks: 5 pieces per tile (1024-row tiles: 114 pieces)
        (LMInfiniteLayout(sinks=10, window=4096, cap=4096), 5, 24),
        (StreamingLayout(sinks=4, window=4092), 5, 24),
    ],
)
def test_lambda_method_layouts_tile_by_their_band(layout, tiles, pieces):
    n = 32768
    plan = layout.plan(n, n, 0)
    assert layout.tile_rows() == band_tile_rows(layout.window)
    assert len(plan.tiles) == tiles, f"{len(plan.tiles)} tiles, expected {tiles}"
    count = sum(len(t.pieces) for t in plan.tiles)
    assert count == pieces, f"{count} pieces, expected {pieces}"
    assert all(p.q1 - p.q0 > 1 or p.kind == Kind.FULL for t in plan.tiles for p in t.pieces)


def test_band_tile_rows():
    assert band_tile_rows(1024) == 8184
    assert band_tile_rows(4096) == 8190
    assert band_tile_rows(8192) == 8191
    assert band_tile_rows(20000) == 8192
    assert band_tile_rows(1) == 8192
    assert band_tile_rows(40, limit=100) == 78


@pytest.mark.parametrize(
    ("method", "params", "layout"),
    [
        ("self-extend", dict(window=40, group=3), SelfExtendLayout),
        ("lm-infinite", dict(sinks=4, window=40, cap=64), LMInfiniteLayout),
        ("streaming", dict(sinks=4, window=40), StreamingLayout),
    ],
)
@torch.no_grad()
def test_several_band_tiles_match_the_dense_reference(method, params, layout, monkeypatch):
    """Tiles of two band runs (78 rows) over 400 tokens: exact across tile edges."""
    import longreach.attention.layout as layout_module

    monkeypatch.setattr(layout, "tile_rows", lambda self: band_tile_rows(self.window, limit=100))
    layout_module._cached_plan.cache_clear()  # plans are cached per layout, tile size aside
    model = sharp_model("mistral")
    ids = tokens(400, seed=6)
    want = ref.reference_logits(model, ids, reference_fn(method, params, model))
    try:
        with lr.extend(model, method, **params):
            got = model(ids).logits
            plan = lr.attention.hf.layout_of(model.model.layers[0].self_attn).plan(400, 400, 0)
    finally:
        layout_module._cached_plan.cache_clear()
    assert len(plan.tiles) == 6, f"{len(plan.tiles)} tiles, expected 6 of at most 78 rows"
    assert_close(got, want, f"{method} {params} with 78-row tiles")


@torch.no_grad()
def test_streaming_gives_back_the_memory_of_a_long_prompt():
    model = tiny_model("llama")
    sinks, window = 4, 60
    with lr.extend(model, "streaming", sinks=sinks, window=window) as handle:
        state = prefill(model, tokens(1500, seed=7), chunk=1500, cache=handle.new_cache())
        keys = state.cache.layers[0].keys
        slot_bytes = keys.shape[1] * keys.shape[3] * keys.element_size()
        held = keys.untyped_storage().nbytes() // slot_bytes
    assert keys.shape[2] == sinks + window - 1
    assert held <= 2 * (sinks + window), (
        f"after a 1500-token prompt the key buffer holds {held} slots, expected <= "
        f"{2 * (sinks + window)}"
    )
