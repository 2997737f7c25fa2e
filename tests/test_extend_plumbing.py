"""The base class's plumbing for the windowed methods: an attention function and a cache policy.

Self-Extend, LM-Infinite and StreamingLLM register an attention function with
transformers and (StreamingLLM) install a cache policy. These tests drive that
plumbing with two test-only methods: it must take effect (in forward and in
generate, with padding), compose with a RoPE method, and undo to bit-identical logits.
"""

import dataclasses
from typing import ClassVar

import pytest
import torch
from tiny import tiny_model
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import longreach as lr
from longreach import LongreachError, compat
from longreach.methods.base import ATTENTION, CACHE, Method


@dataclasses.dataclass
class CountingAttention(Method):
    """SDPA through a registered attention function that counts its calls."""

    name: ClassVar[str] = "counting-attention"
    touches: ClassVar[frozenset[str]] = frozenset({ATTENTION})

    def __post_init__(self):
        super().__post_init__()
        self.calls = 0

    def install(self, model, patch):
        def attention(module, query, key, value, attention_mask, **kwargs):
            self.calls += 1
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

        patch.attention(model, "longreach-test-counting", attention)


class PolicyCache(DynamicCache):
    """Stands in for a windowed method's cache policy."""


@dataclasses.dataclass
class CachePolicy(Method):
    name: ClassVar[str] = "cache-policy"
    touches: ClassVar[frozenset[str]] = frozenset({CACHE})

    def new_cache(self, model):
        return PolicyCache(config=model.config)

    def install(self, model, patch):
        patch.cache_policy(model, lambda: self.new_cache(model))


def left_padded(lengths):
    width = max(lengths)
    input_ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    g = torch.Generator().manual_seed(0)
    for row, n in enumerate(lengths):
        input_ids[row, width - n :] = torch.randint(3, 256, (n,), generator=g)
        mask[row, width - n :] = 1
    return input_ids, mask


@torch.no_grad()
def test_attention_function_runs_keeps_padding_masks_and_is_removed():
    model = tiny_model("llama")
    input_ids, mask = left_padded([40, 25])
    before = model(input_ids, attention_mask=mask).logits
    method = CountingAttention()
    with lr.extend(model, method):
        assert model.config._attn_implementation == "longreach-test-counting"
        inside = model(input_ids, attention_mask=mask).logits
        assert method.calls == model.config.num_hidden_layers
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=0,
        )
        assert out.shape == (2, 43)
    # The same SDPA computation, so the padded rows must match exactly: the mask was kept.
    assert torch.equal(inside, before)
    assert model.config._attn_implementation == "sdpa"
    calls = method.calls
    assert torch.equal(model(input_ids, attention_mask=mask).logits, before)
    assert method.calls == calls, "the attention function must not run after removal"


@torch.no_grad()
def test_cache_policy_reaches_forward_and_generate_and_is_removed():
    model = tiny_model("qwen2")
    input_ids, mask = left_padded([30, 30])
    with lr.extend(model, CachePolicy()) as handle:
        assert isinstance(handle.new_cache(), PolicyCache)
        out = model(input_ids, attention_mask=mask, use_cache=True)
        assert isinstance(compat.output_cache(out), PolicyCache)
        gen = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=3,
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        assert isinstance(compat.output_cache(gen), PolicyCache)
        # A cache of another kind than an empty plain DynamicCache is the caller's: kept.
        mine = handle.new_cache()
        out = model(input_ids, **compat.forward_kwargs(model, mine, 0, input_ids.shape[1]))
        assert compat.output_cache(out) is mine
    out = model(input_ids, attention_mask=mask, use_cache=True)
    assert type(compat.output_cache(out)) is DynamicCache


@torch.no_grad()
def test_attention_and_cache_compose_with_a_rope_method_and_undo_in_any_order():
    model = tiny_model("mistral")
    x = torch.randint(3, 256, (1, 300), generator=torch.Generator().manual_seed(3))
    before = model(x).logits
    yarn = lr.extend(model, "yarn", factor=4)
    attention = lr.extend(model, CountingAttention())
    cache = lr.extend(model, CachePolicy())
    with pytest.raises(
        LongreachError,
        match=r"^counting-attention cannot be applied while counting-attention is active on this model: both change the attention function; remove the counting-attention extension first\.$",
    ):
        lr.extend(model, CountingAttention())
    with pytest.raises(LongreachError, match="both change the KV cache"):
        lr.extend(model, CachePolicy())
    yarn.remove()
    cache.remove()
    attention.remove()
    assert torch.equal(model(x).logits, before)


def test_a_failing_install_leaves_the_model_untouched():
    @dataclasses.dataclass
    class Broken(Method):
        name: ClassVar[str] = "broken"
        touches: ClassVar[frozenset[str]] = frozenset({ATTENTION})

        def install(self, model, patch):
            patch.set_attr(model.model.rotary_emb, "attention_scaling", 99.0)
            raise LongreachError("broken: fails on purpose.")

    model = tiny_model("llama")
    with pytest.raises(LongreachError, match="fails on purpose"):
        lr.extend(model, Broken())
    assert model.model.rotary_emb.attention_scaling == 1.0
    assert lr.methods.active_extensions(model) == []
