"""Spans: full attention at a few layers, a sliding window (and a cache to match) at the others."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch

from longreach.attention.layout import Region
from longreach.memory.evicting import EvictingLayer
from longreach.methods.base import param
from longreach.methods.eviction import EvictionMethod
from longreach.methods.registry import register


@register
@dataclasses.dataclass
class Spans(EvictionMethod):
    """Spans (Zhang et al., 2023, Efficient Long-Range Transformers: You Need to Attend More, but Not Necessarily at Every Layer, arXiv 2310.12442; MASFormer).

    Layers ``0, every, 2 * every, ...`` (or the ``layers`` listed) keep full causal attention
    and their whole KV cache; every other layer attends only the ``window`` newest tokens
    (itself included) and its cache keeps ``window - 1`` tokens after each call: memory for
    those layers is bounded while reading. The paper *trains* this mix of spans; here it is
    applied to a pretrained model without training, which is the question it lets you
    measure. Positions are true positions (the full layers see the whole input at its real
    distances; combine with a RoPE method to go past the trained length).

    Parameters:
        window: tokens a windowed layer attends, itself included (default: trained length / 8).
        every: full attention at the layers whose index is a multiple of this (default 4).
        layers: the full-attention layers instead, e.g. ``0+5+11`` (``+`` separates).
        original_max: L, the trained length (default: the model's).
    """

    name: ClassVar[str] = "spans"
    paper: ClassVar[str] = (
        "Zhang et al., 2023, Efficient Long-Range Transformers: You Need to Attend More, but "
        "Not Necessarily at Every Layer, arXiv 2310.12442"
    )
    summary: ClassVar[str] = "full attention at some layers, a window (and its cache) elsewhere"

    window: int | None = param(None, "tokens a windowed layer attends (default: L / 8)")
    every: int = param(4, "full attention at layer indices that are multiples of this")
    layers: str | None = param(None, "full-attention layers instead, e.g. 0+5+11")
    original_max: int | None = param(None, "L, the trained length (default: the model's)")

    def __post_init__(self) -> None:
        self._window = self.window
        self._full: frozenset[int] | None = None
        super().__post_init__()

    def validate(self) -> None:
        if self.window is not None and self.window < 1:
            self.fail(f"window must be >= 1 token (got {self.window}).")
        if self.every < 1:
            self.fail(f"every must be >= 1 layer (got {self.every}).")
        if self.layers is not None:
            self.full_layers(None)

    def full_layers(self, model: torch.nn.Module | None) -> frozenset[int]:
        if self.layers is None:
            count = model.config.num_hidden_layers if model is not None else 0
            return frozenset(range(0, count, self.every))
        try:
            chosen = frozenset(int(x) for x in str(self.layers).split("+") if x.strip())
        except ValueError:
            self.fail(
                f"layers must be layer indices joined by '+', e.g. 0+5+11 (got {self.layers!r})."
            )
        if not chosen or min(chosen) < 0:
            self.fail(f"layers must name at least one layer index >= 0 (got {self.layers!r}).")
        return chosen

    def check_model(self, model: torch.nn.Module) -> None:
        super().check_model(model)
        count = model.config.num_hidden_layers
        full = self.full_layers(model)
        if max(full) >= count:
            self.fail(f"layer {max(full)} does not exist: the model has {count} layers.")
        self._full = full
        self._window = self.window or max(1, self.trained_length(model) // 8)

    def install(self, model, patch) -> None:
        self.check_model(model)
        super().install(model, patch)

    def resident_tokens(self, model: torch.nn.Module, tokens: int, chunk: int | None) -> int:
        return tokens  # the full layers keep everything

    def layer_regions(self, layer: int) -> Sequence[Region]:
        if self._full is not None and layer in self._full:
            return (Region(d=(0, None)),)
        return (Region(d=(0, self._window - 1)),)

    def evict(self, state: EvictingLayer, q_len: int) -> None:
        if self._full is not None and state.layer in self._full:
            return
        keep = self._window - 1
        if state.resident > keep:
            state.keep(
                torch.arange(state.resident - keep, state.resident, device=state.keys.device)
            )
