"""Self-Extend: exact positions for neighbours, grouped (floor-divided) positions beyond them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch

from longreach.attention import PositionSet, Region, rotate
from longreach.methods.base import param
from longreach.methods.registry import register
from longreach.methods.windowed import WindowedLayout, WindowedMethod, slots


@dataclasses.dataclass(frozen=True)
class SelfExtendLayout(WindowedLayout):
    """Causal attention; pairs with ``i - j < window`` at normal positions, the rest grouped.

    Grouped pairs use query position ``i // G + W - W // G`` and key position ``j // G``
    (position set 1, made by rotating the model's tensors by the difference).
    """

    window: int = 1024
    group: int = 8
    block: int = 1024

    def regions(self, q_len: int, kv_len: int, q_offset: int) -> Sequence[Region]:
        return (Region(d=(0, self.window - 1)), Region(d=(self.window, None), pset=1))

    def position_sets(self, module, query, key, q_offset: int) -> Sequence[PositionSet]:
        w, g = self.window, self.group
        needed = max(0, q_offset + query.shape[-2] - w)  # grouped pairs use keys j <= i - W
        if needed == 0:
            return (PositionSet(query[:, :, :0], key[:, :, :0]),)
        inv_freq = self.inv_freq()
        i = slots(q_offset, query.shape[-2], query.device)
        j = slots(0, needed, query.device)
        q = rotate(query, i // g + (w - w // g) - i, inv_freq)
        k = rotate(key[:, :, :needed], j // g - j, inv_freq)
        return (PositionSet(q, k),)


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
