"""streaming runs for any number of tokens in a cache of constant size (Xiao et al., 2023)."""

import torch
from tiny import tiny_model

import longreach as lr
from longreach import compat
from longreach.prefill import greedy, prefill


@torch.no_grad()
def test_streaming_generates_5000_tokens_in_a_constant_cache():
    model = tiny_model("llama", num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    sinks, window = 4, 60
    sizes = []

    def record(module, args, kwargs, output):  # runs before the method's own eviction hook
        sizes.append(compat.output_cache(output).get_seq_length())

    hook = None
    try:
        with lr.extend(model, "streaming", sinks=sinks, window=window) as handle:
            hook = model.register_forward_hook(record, with_kwargs=True, prepend=True)
            state = prefill(model, torch.randint(3, 256, (1, 100)), cache=handle.new_cache())
            out = greedy(model, state, 5000)
            assert state.cache.get_seq_length() == sinks + window - 1
    finally:
        if hook is not None:
            hook.remove()
    assert out.shape == (1, 5000)
    assert len(sizes) == 1 + 4999  # the prefill, then one call per new token but the last
    assert sizes[0] == 100, f"the prompt call held {sizes[0]} tokens, expected 100"
    assert max(sizes[1:]) == sinks + window, (
        f"the cache held up to {max(sizes[1:])} tokens while decoding, expected {sinks + window}"
    )
    assert len(set(sizes[1:])) == 1, f"cache sizes while decoding: {sorted(set(sizes[1:]))}"


@torch.no_grad()
def test_streaming_generate_keeps_its_cache_bounded():
    model = tiny_model("qwen2")
    with lr.extend(model, "streaming", sinks=4, window=40):
        out = model.generate(
            input_ids=torch.randint(3, 256, (1, 30)),
            max_new_tokens=70,
            min_new_tokens=70,
            do_sample=False,
            return_dict_in_generate=True,
        )
    cache = compat.output_cache(out)
    assert out.sequences.shape[1] == 100
    assert cache.get_seq_length() == 43, f"cache holds {cache.get_seq_length()} tokens, expected 43"
