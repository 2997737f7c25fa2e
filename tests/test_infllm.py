"""infllm: exact settings, the dense reference of its rule, retrieval, the memory cache and its tiers.

The reference (tests/reference.py, ``infllm_attention``) simulates the rule query by query
in float64 on the whole sequence, given where the model calls started; the method runs
on the block-sparse kernel with a block memory. Tiny models (trained on 256 tokens),
inputs of 300-3000 tokens.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import reference as ref
import torch
from tiny import sharp_model, tiny_model, tokens

import longreach as lr
from longreach import LongreachError
from longreach.attention.kernel import block_attention
from longreach.attention.layout import AttentionCall
from longreach.attention.rotary import rotate
from longreach.memory import BlockMemoryCache, sweep_stale
from longreach.methods.infllm import InfLLMLayout, parse_bytes
from longreach.prefill import greedy, prefill

GEOMETRY = dict(init=4, block=8, window=64, topk=4, repr=2, chunk=16, dense=128)


def reference(model, ids, calls=(0,), **geometry):
    g = {**GEOMETRY, **geometry}
    attention = ref.infllm_attention(
        inv_freq=model.model.rotary_emb.inv_freq, calls=list(calls), **g
    )
    return ref.reference_logits(model, ids, attention)


# --------------------------------------------------------------------------- exact settings


def test_short_input_is_bit_identical_to_vanilla():
    model = tiny_model("llama")
    ids = tokens(68)  # init + window
    with torch.no_grad():
        want = model(ids).logits
        want_cached = prefill(model, ids, chunk=68).logits
    with lr.extend(model, "infllm", **GEOMETRY), torch.no_grad():
        got = model(ids).logits
        got_cached = prefill(model, ids, chunk=68).logits
    assert torch.equal(got, want), f"max |d| {float((got - want).abs().max())}, expected 0"
    assert torch.equal(got_cached, want_cached)


def test_inputs_below_dense_are_bit_identical_to_vanilla():
    model = tiny_model("qwen2")
    ids = tokens(128)
    with torch.no_grad():
        want = model(ids).logits
    with lr.extend(model, "infllm", **GEOMETRY), torch.no_grad():
        got = model(ids).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_all_blocks_at_true_positions_is_dense_attention(family):
    model = sharp_model(family)
    ids = tokens(500, seed=1)
    with torch.no_grad():
        want = model(ids).logits
        vanilla_state = prefill(model, ids[:, :480], chunk=64)
        want_decode = greedy(model, vanilla_state, 8)
    spec = dict(GEOMETRY, topk=1000, true_positions=True)
    with lr.extend(model, "infllm", **spec), torch.no_grad():
        got = model(ids, use_cache=False).logits
        state = prefill(model, ids[:, :480], chunk=64)
        assert isinstance(state.cache, BlockMemoryCache)
        got_last = state.logits
        got_decode = greedy(model, state, 8)
    err = float((got - want).abs().max())
    assert err < 1e-5, f"one shot: max |d logits| {err}, expected < 1e-5"
    err = float((got_last - want[:, 479]).abs().max())
    assert err < 1e-5, f"chunked prefill: max |d logits| {err}, expected < 1e-5"
    assert torch.equal(got_decode, want_decode)


# --------------------------------------------------------------------------- the reference


@pytest.mark.parametrize(("n", "family"), [(300, "llama"), (1000, "qwen2"), (3000, "llama")])
def test_one_shot_matches_the_dense_reference(n, family):
    model = sharp_model(family)
    ids = tokens(n, seed=n)
    want = reference(model, ids)
    with lr.extend(model, "infllm", **GEOMETRY), torch.no_grad():
        got = model(ids, use_cache=False).logits
    err = float((got - want).abs().max())
    assert err < 1e-4, f"{n} tokens: max |d logits| {err} against the reference, expected < 1e-4"


def test_per_head_selection_matches_the_reference():
    model = sharp_model("llama")
    ids = tokens(600, seed=3)
    want = reference(model, ids, per_head=True)
    with lr.extend(model, "infllm", per_head=True, **GEOMETRY), torch.no_grad():
        got = model(ids, use_cache=False).logits
    err = float((got - want).abs().max())
    assert err < 1e-4, f"max |d logits| {err}, expected < 1e-4"


def test_prefill_then_decode_matches_the_reference():
    model = sharp_model("llama")
    n, new = 700, 12
    prompt = tokens(n, seed=7)
    with lr.extend(model, "infllm", **GEOMETRY), torch.no_grad():
        state = prefill(model, prompt, chunk=96)
        out = greedy(model, state, new)
        cache = state.cache
        last = state.logits  # after feeding new - 1 decoded tokens
        assert cache.get_seq_length() == n + new - 1
    ids = torch.cat([prompt, out[:, :-1]], dim=1)
    calls = [*range(0, n, 96), *range(n, n + new - 1)]
    want = reference(model, ids, calls=calls)
    # the decoded tokens are the reference's greedy choices at every step
    assert torch.equal(want[0, n - 1 :].argmax(-1), out[0]), "decoded tokens differ"
    # and the logits after the last decoded token are the reference's
    err = float((last - want[:, -1]).abs().max())
    assert err < 1e-4, f"max |d logits| after decoding {err}, expected < 1e-4"


def test_prefill_chunking_changes_nothing_when_chunks_align():
    model = sharp_model("llama")
    ids = tokens(900, seed=5)
    with lr.extend(model, "infllm", **GEOMETRY), torch.no_grad():
        one = model(ids, use_cache=False).logits[:, -1]
        for chunk in (16, 112, 900):
            got = prefill(model, ids, chunk=chunk).logits
            err = float((got - one).abs().max())
            assert err < 1e-5, f"prefill chunk {chunk}: max |d| {err}, expected < 1e-5"


def test_generate_works_inside_and_matches_greedy():
    model = sharp_model("llama")
    ids = tokens(400, seed=9)
    with lr.extend(model, "infllm", **GEOMETRY), torch.no_grad():
        gen = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        state = prefill(model, ids, chunk=400)
        mine = greedy(model, state, 10)
    assert torch.equal(gen[0, 400:], mine[0])


# --------------------------------------------------------------------------- retrieval


def test_the_block_holding_a_planted_key_is_retrieved():
    torch.manual_seed(0)
    heads, dim, n = 2, 16, 400
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    rotary = type("Rotary", (), {"inv_freq": inv_freq})()
    layout = InfLLMLayout(rotary=rotary, **GEOMETRY)
    u = torch.nn.functional.normalize(torch.randn(dim), dim=0)
    raw_k = 0.3 * torch.randn(1, heads, n, dim)
    needle = 5  # block 5: tokens init + 40 .. init + 48
    a = GEOMETRY["init"] + needle * GEOMETRY["block"]
    raw_k[0, :, a : a + GEOMETRY["block"]] = 3.0 * u
    pos = torch.arange(n)
    key = rotate(raw_k, pos, inv_freq)
    value = torch.randn(1, heads, n, dim)
    query = rotate(0.3 * torch.randn(1, heads, n, dim), pos, inv_freq)
    # the last chunk asks for u: its queries, moved to position `window`, point along u
    s = n - GEOMETRY["chunk"]
    query[0, :, s:] = rotate(
        (3.0 * u).expand(1, heads, n - s, dim), pos[s:] - GEOMETRY["window"], inv_freq
    )
    state = layout.transient_memory().layer(0)
    call = AttentionCall(None, 0, query, key, value, 0, memory=None)
    chosen = None
    for work in layout.works(call, state):
        if work.rows[0] == s:
            far = rotate(query[:, :, s:], GEOMETRY["window"] - pos[s:], inv_freq)
            chosen = layout.retrieve(state, far).tolist()
        o, lse = block_attention(
            query[:, :, work.rows[0] : work.rows[1]],
            key,
            value,
            work.plan,
            position_sets=work.sources,
            return_lse=True,
        )
        if work.done:
            work.done(o, lse)
    assert state.n_blocks > GEOMETRY["topk"], "the input must have more blocks than topk"
    assert chosen is not None and needle in chosen, f"block {needle} not in {chosen}"


def test_memory_cache_keeps_a_bounded_resident_part():
    model = tiny_model("llama")
    with lr.extend(model, "infllm", **GEOMETRY), torch.no_grad():
        state = prefill(model, tokens(1500), chunk=128)
    cache = state.cache
    assert cache.get_seq_length() == 1500
    layer = cache.layer(0)
    g = GEOMETRY
    last_chunk = 1408 + 80  # the last call [1408, 1500) runs chunks of 16 from 1408
    assert layer.n_blocks == (last_chunk - g["window"] - g["init"] + 1) // g["block"]
    resident = layer.keys.shape[-2]
    # the next call trims what the last one moved into memory
    assert resident <= g["window"] + g["block"] + g["chunk"] + 128, resident
    with lr.extend(model, "infllm", **GEOMETRY), torch.no_grad():
        greedy(model, state, 2)
    layer = cache.layer(0)
    assert layer.keys.shape[-2] <= g["window"] + g["block"] + g["chunk"] + 1, layer.keys.shape
    kv_len, kv_offset = cache.get_mask_sizes(1, 0)
    # the mask sees the resident part as the next update will leave it
    assert kv_offset == max(layer.slot_base, layer.memory_end)
    assert kv_len == cache.get_seq_length() - kv_offset + 1


# --------------------------------------------------------------------------- tiers


def _logits(model, ids, **extra):
    with lr.extend(model, "infllm", **GEOMETRY, **extra), torch.no_grad():
        state = prefill(model, ids, chunk=128)
        return state.logits, state.cache


def test_disk_tier_gives_the_same_logits_as_ram(tmp_path):
    model = sharp_model("llama")
    ids = tokens(1200, seed=2)
    ram, _ = _logits(model, ids)
    disk, cache = _logits(model, ids, budget="8KiB", offload_dir=str(tmp_path))
    assert cache.disk_blocks > 0, "the budget should have sent blocks to disk"
    assert torch.equal(ram, disk)
    folder = cache.budget.folder
    assert folder and os.path.isdir(folder)
    cache.close()
    assert not os.path.exists(folder)


@pytest.mark.parametrize(("kv_dtype", "tol"), [("bf16", 0.05), ("int8", 0.05)])
def test_smaller_storage_dtypes_stay_close(kv_dtype, tol):
    model = tiny_model("llama")
    ids = tokens(1000, seed=4)
    full, _ = _logits(model, ids)
    small, cache = _logits(model, ids, kv_dtype=kv_dtype)
    store = cache.layer(0).store
    assert store.dtype == {"bf16": torch.bfloat16, "int8": torch.int8}[kv_dtype]
    err = float((small - full).abs().max())
    assert err < tol, f"{kv_dtype}: max |d logits| {err}, expected < {tol}"


def test_a_killed_disk_run_leaves_nothing_a_rerun_trusts(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from tiny import tiny_model
        import longreach as lr
        from longreach.prefill import prefill
        model = tiny_model("llama")
        ids = torch.randint(3, 256, (1, 200000), generator=torch.Generator().manual_seed(0))
        with lr.extend(model, "infllm", budget="4KiB", offload_dir={str(tmp_path)!r}, **{GEOMETRY!r}):
            prefill(model, ids, chunk=128)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            folders = [f for f in os.listdir(tmp_path) if f.startswith("longreach-memory-")]
            files = [
                os.path.join(tmp_path, f, x) for f in folders for x in os.listdir(tmp_path / f)
            ]
            if any(os.path.getsize(x) > 0 for x in files):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the disk-tier run wrote no block file within 60 s")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert folders, "the killed run should have left its folder behind"
    removed = sweep_stale(str(tmp_path))
    assert sorted(removed) == sorted(folders)
    model = sharp_model("llama")
    ids = tokens(1200, seed=2)
    ram, _ = _logits(model, ids)
    disk, _ = _logits(model, ids, budget="8KiB", offload_dir=str(tmp_path))
    assert torch.equal(ram, disk)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"block": 0}, "block must be a positive"),
        ({"topk": -1}, "topk must be >= 0"),
        ({"repr": 0}, "repr must be >= 1"),
        ({"kv_dtype": "fp8"}, "kv_dtype must be one of"),
        ({"budget": "lots", "offload_dir": "/tmp"}, "budget must be a size"),
        ({"budget": "1GiB"}, "needs offload_dir"),
        ({"chunk": 100, "window": 64}, "must not exceed window"),
        ({"repr": 9, "block": 8}, "must not exceed block"),
    ],
)
def test_bad_parameters_get_one_line_errors(params, words):
    model = tiny_model("llama")
    with pytest.raises(LongreachError, match=words) as info:
        lr.extend(model, "infllm", **params)
    assert "\n" not in str(info.value)


def test_batches_are_refused_in_one_line():
    model = tiny_model("llama")
    with lr.extend(model, "infllm", **GEOMETRY), torch.no_grad():
        with pytest.raises(LongreachError, match="one sequence"):
            prefill(model, torch.randint(3, 256, (2, 300)), chunk=300)


def test_parse_bytes():
    assert parse_bytes("4GiB") == 4 << 30
    assert parse_bytes("512MB") == 512 << 20
    assert parse_bytes("1024") == 1024


def test_defaults_scale_with_the_trained_length():
    from longreach.methods.infllm import InfLLM

    lab = tiny_model("llama", max_position_embeddings=256)
    assert InfLLM().geometry(lab) == dict(init=4, block=4, window=128, chunk=64, dense=256)
    big = tiny_model("llama", max_position_embeddings=8192)
    assert InfLLM().geometry(big) == dict(init=128, block=128, window=4096, chunk=512, dense=8192)


def test_the_memory_context_is_per_thread():
    import threading

    from longreach.attention import context

    seen = {}

    def worker(name):
        token = context.enter(name)
        time.sleep(0.05)
        seen[name] = context.current_memory()
        context.leave(token)

    threads = [threading.Thread(target=worker, args=(f"memory-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {f"memory-{i}": f"memory-{i}" for i in range(4)}
    assert context.current_memory() is None
