"""Self-Extend: exact positions for neighbours, grouped (floor-divided) positions beyond them."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from transformers import DynamicCache

from longreach import compat
from longreach.attention import PositionSet, Region, context, rotate
from longreach.attention.layout import AttentionCall, Work, band_tile_rows
from longreach.methods.base import Patch, param
from longreach.methods.registry import register
from longreach.methods.windowed import WindowedLayout, WindowedMethod, slots


@dataclasses.dataclass(frozen=True)
class SelfExtendLayout(WindowedLayout):
    """Causal attention; pairs with ``i - j < window`` at normal positions, the rest grouped.

    Grouped pairs use query position ``i // G + W - W // G`` and key position ``j // G``
    (position set 1, made by rotating the model's tensors by the difference). A key's
    grouped position ``j // G`` never changes once the key exists, so with a
    :class:`GroupedKeys` published for the call (the method's hook does that for an
    unpadded sequence with a dynamic cache) each key is rotated once, when it first
    reaches the grouped region, instead of at every call. ``block`` 0 (the default) tiles
    by the band (:func:`~longreach.attention.layout.band_tile_rows`).
    """

    window: int = 1024
    group: int = 8
    block: int = 0

    def tile_rows(self) -> int:
        return self.block or band_tile_rows(self.window)

    def regions(self, q_len: int, kv_len: int, q_offset: int) -> Sequence[Region]:
        return (Region(d=(0, self.window - 1)), Region(d=(self.window, None), pset=1))

    def position_sets(self, module, query, key, q_offset: int) -> Sequence[PositionSet]:
        return self._position_sets(query, key, q_offset, None, 0)

    def prepare(self, call: AttentionCall) -> Iterable[Work]:
        memory = call.memory if isinstance(call.memory, GroupedKeys) else None
        plan = self.plan_for(call.module, call.query, call.key, call.q_offset, call.window)
        sets = self._position_sets(call.query, call.key, call.q_offset, memory, call.layer)
        return (Work(plan, sets),)

    def grouped(self, key: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Keys of slots [start, stop) moved from position j to their grouped position j // G."""
        j = slots(start, stop - start, key.device)
        return rotate(key[:, :, start:stop], j // self.group - j, self.inv_freq())

    def _position_sets(self, query, key, q_offset, memory, layer) -> Sequence[PositionSet]:
        w, g = self.window, self.group
        needed = max(0, q_offset + query.shape[-2] - w)  # grouped pairs use keys j <= i - W
        if needed == 0:
            return (PositionSet(query[:, :, :0], key[:, :, :0]),)
        i = slots(q_offset, query.shape[-2], query.device)
        q = rotate(query, i // g + (w - w // g) - i, self.inv_freq())
        if memory is None:
            k = self.grouped(key, 0, needed)
        else:
            k = memory.keys(layer, key, needed, q_offset, self)
        return (PositionSet(q, k),)


class GroupedKeys:
    """Per layer, the keys of one sequence already rotated to their grouped positions.

    Valid for one unpadded sequence (batch 1) in one dynamic cache: a call at ``q_offset``
    writes slots ``q_offset ..`` of the cache, so the grouped keys of slots below
    ``q_offset`` are still those of the cache's keys, and the rest are recomputed (a
    cropped or reused cache then costs one recomputation, never a wrong key). New
    frequencies (a RoPE method applied, dynamic NTK) or another key shape start over. The
    buffer grows by an eighth at a time, so appending is amortised O(1) per token and at
    most an eighth of it is unused.
    """

    def __init__(self) -> None:
        self._layers: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def keys(
        self, layer: int, key: torch.Tensor, needed: int, q_offset: int, layout: SelfExtendLayout
    ) -> torch.Tensor:
        """Grouped keys of slots [0, needed): those kept, plus the new ones rotated once."""
        inv_freq = layout.inv_freq()
        entry = self._layers.get(layer)
        valid, buffer, freq = 0, None, None
        if entry is not None:
            buffer, count, freq = entry
            same = (
                buffer.shape[:2] == key.shape[:2]
                and buffer.shape[3] == key.shape[3]
                and buffer.dtype == key.dtype
                and buffer.device == key.device
                and freq.shape == inv_freq.shape
                and torch.equal(freq, inv_freq)
            )
            valid = min(count, q_offset) if same else 0
            if not same:
                buffer = None
        if buffer is None or buffer.shape[2] < needed:
            size = needed + max(1024, needed // 8)
            grown = key.new_empty(key.shape[0], key.shape[1], size, key.shape[3])
            if valid:
                grown[:, :, :valid] = buffer[:, :, :valid]
            buffer = grown
        if needed > valid:
            buffer[:, :, valid:needed] = layout.grouped(key, valid, needed)
        if entry is None or freq is not entry[2] or not valid:
            freq = inv_freq.detach().clone()
        self._layers[layer] = (buffer, max(needed, valid), freq)
        return buffer[:, :, :needed]


DEFAULT_WINDOW = 1024


@register
@dataclasses.dataclass
class SelfExtend(WindowedMethod):
    """Self-Extend (Jin et al., 2024, LLM Maybe LongLM, arXiv 2401.01325).

    Neighbour attention keeps the normal relative position; grouped attention maps every
    position p to ``floor(p / G)`` so that far tokens reuse positions the model was trained
    on. For query i and key j (section 3, eq. 4 and the merge rule):

        rel(i, j) = i − j                                       if i − j < W
        rel(i, j) = floor(i/G) − floor(j/G) + (W − floor(W/G))  otherwise

    The shift ``W − floor(W/G)`` makes the grouped distances continue where the neighbour
    window ends. The paper computes both score matrices and merges them; here the two
    kinds of pairs are two disjoint regions of a block layout, the grouped one scored with
    queries and keys rotated to their grouped positions, so nothing n x n is built. The
    largest relative position is about ``n/G + W``, so inputs up to about ``(L − W)·G + W``
    stay inside the trained range L. ``group=1`` is exactly the unmodified model.

    Parameters:
        group: G, the group size (default 8): far positions are floor-divided by G.
        window: W, the neighbour window in tokens (default 1024, or half the trained length
            when that is shorter); at most the trained length.
        original_max: L, the trained length (default: the model's own); only checked
            against ``window``.
    """

    name: ClassVar[str] = "self-extend"
    paper: ClassVar[str] = (
        "Jin et al., 2024, LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning, "
        "arXiv 2401.01325"
    )
    summary: ClassVar[str] = "normal positions within W, floor(p/G) positions beyond"

    group: int = param(8, "G: positions beyond the window are floor-divided by G")
    window: int | None = param(
        None, "W: neighbour window (tokens) with normal positions (default: 1024, <= L/2)"
    )
    original_max: int | None = param(None, "L, the trained length (default: the model's)")

    def validate(self) -> None:
        if self.group < 1:
            self.fail(f"group must be >= 1 (got {self.group}); 1 leaves the model unchanged.")
        if self.window is not None and self.window <= 0:
            self.fail(f"window must be > 0 tokens (got {self.window}).")
        if self.original_max is not None and self.original_max < 1:
            self.fail(
                f"original_max must be a positive number of tokens (got {self.original_max})."
            )
        if self.original_max is not None and self.window is not None:
            if self.window > self.original_max:
                self._window_too_large(self.window, self.original_max)

    def window_for(self, model: torch.nn.Module) -> int:
        """W: the given window, else 1024 tokens or half the trained length if that is shorter."""
        if self.window is not None:
            return self.window
        return max(1, min(DEFAULT_WINDOW, self.trained_length(model) // 2))

    def _window_too_large(self, window: int, length: int) -> None:
        self.fail(
            f"window ({window}) must not exceed the trained length {length}: neighbour "
            "positions would leave the trained range."
        )

    def check_model(self, model: torch.nn.Module) -> None:
        super().check_model(model)
        length = self.trained_length(model)
        if self.window_for(model) > length:
            self._window_too_large(self.window_for(model), length)
        self.refuse_if_unchanged(model, self.window_for(model), "window")

    def layout(self, model: torch.nn.Module, rotary: torch.nn.Module) -> SelfExtendLayout:
        return SelfExtendLayout(rotary=rotary, window=self.window_for(model), group=self.group)

    def install(self, model: torch.nn.Module, patch: Patch) -> None:
        super().install(model, patch)
        key = compat.cache_kwarg(model)
        kept: weakref.WeakKeyDictionary[Any, GroupedKeys] = weakref.WeakKeyDictionary()
        tokens: list[Any] = []

        def before(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            tokens.append(context.enter(_grouped_keys_for(kept, args, kwargs, key)))

        def after(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            context.leave(tokens.pop() if tokens else None)

        patch.forward_pre_hook(model, before)
        # always_call: a call that raises must not leave its grouped keys published
        handle = model.register_forward_hook(after, with_kwargs=True, always_call=True)
        patch.on_undo(handle.remove)


def _grouped_keys_for(kept, args: tuple, kwargs: dict, key: str) -> GroupedKeys | None:
    """The grouped keys of this call's cache, when its slots are one sequence's positions.

    That is one unpadded row in a plain dynamic cache (no sliding-window layers, which
    drop old slots). Anything else (padded batches, beam search, other caches) gets None
    and rotates the grouped keys afresh at every call, as before.
    """
    cache = kwargs.get(key)
    if not isinstance(cache, DynamicCache):
        return None
    if any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", ())):
        return None
    tokens = kwargs.get("input_ids")
    if tokens is None and args:
        tokens = args[0]
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None or tokens.shape[0] != 1:
        return None
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and not bool(mask.bool().all()):
        return None
    if mask is not None and not isinstance(mask, torch.Tensor):
        return None
    grouped = kept.get(cache)
    if grouped is None:
        grouped = kept[cache] = GroupedKeys()
    return grouped
