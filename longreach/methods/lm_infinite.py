"""LM-Infinite: Λ-shaped attention (starting tokens + a local window) with a distance cap."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch

from longreach.attention import PositionSet, Region, rotate
from longreach.attention.layout import band_tile_rows
from longreach.methods.base import param
from longreach.methods.registry import register
from longreach.methods.windowed import WindowedLayout, WindowedMethod, slots


@dataclasses.dataclass(frozen=True)
class LMInfiniteLayout(WindowedLayout):
    """Λ layout: band ``i - j < window`` plus keys ``j < sinks``; distances above ``cap`` become ``cap``.

    Requires ``window <= cap``, so band pairs keep their distance. Sink pairs beyond the
    band use their own distance below ``cap`` (position set 0) and exactly ``cap`` from
    ``cap`` on (position set 1: queries rotated to position ``cap``, keys to 0).
    """

    sinks: int = 10
    window: int = 4096
    cap: int = 4096
    block: int = 0  # query rows per tile; 0: derived from the band (band_tile_rows)

    def tile_rows(self) -> int:
        return self.block or band_tile_rows(self.window)

    def regions(self, q_len: int, kv_len: int, q_offset: int) -> Sequence[Region]:
        out = [Region(d=(0, self.window - 1))]
        if self.sinks > 0:
            if self.window < self.cap:
                out.append(Region(k=(0, self.sinks), d=(self.window, self.cap - 1)))
            out.append(Region(k=(0, self.sinks), d=(self.cap, None), pset=1))
        return tuple(out)

    def position_sets(self, module, query, key, q_offset: int) -> Sequence[PositionSet]:
        if self.sinks == 0:
            return ()
        inv_freq = self.inv_freq()
        n_keys = min(self.sinks, key.shape[-2])
        i = slots(q_offset, query.shape[-2], query.device)
        j = slots(0, n_keys, query.device)
        q = rotate(query, self.cap - i, inv_freq)  # every query at position cap ...
        k = rotate(key[:, :, :n_keys], -j, inv_freq)  # ... every sink at position 0
        return (PositionSet(q, k),)


@register
@dataclasses.dataclass
class LMInfinite(WindowedMethod):
    """LM-Infinite (Han et al., 2023, arXiv 2308.16137).

    Two fixes for the failure of a model beyond its trained length L (section 4): a
    Λ-shaped mask, where query i sees the first ``sinks`` tokens (the global branch,
    n_global; the authors' code uses 10) and the ``window`` most recent tokens including
    itself (the local branch, n_local = L), and a distance limit: every relative distance
    d = i − j is replaced by min(d, cap) with cap = L. Cost O(n · (sinks + window)).

    Positions of the global branch: the paper's rule min(i − j, cap). The authors' code
    gives every global-branch pair the single distance ``min(cap, n − 1)`` (queries rotated
    to that position, keys left unrotated at 0); with the default ``window = cap`` every
    such pair has i − j >= cap, so both agree exactly. With ``window < cap`` this follows
    the paper (sink pairs closer than ``cap`` keep their true distance), and the cap never
    depends on the input length, so prefill and decoding give the same scores.

    Parameters:
        window: n_local, the local branch in tokens (default: the trained length);
            at most ``cap``.
        sinks: n_global, starting tokens every query sees (default 10).
        cap: the distance limit (default: the trained length).
        original_max: L, the trained length (default: the model's own): the default of
            ``window`` and ``cap``.
    """

    name: ClassVar[str] = "lm-infinite"
    paper: ClassVar[str] = (
        "Han et al., 2023, LM-Infinite: Zero-Shot Extreme Length Generalization for Large "
        "Language Models, arXiv 2308.16137"
    )
    summary: ClassVar[str] = "Λ mask: sinks + local window, distances capped at L"

    window: int | None = param(None, "n_local: local window in tokens (default: original_max)")
    sinks: int = param(10, "n_global: starting tokens every query sees")
    cap: int | None = param(None, "distance limit (default: original_max)")
    original_max: int | None = param(None, "L, the trained length (default: the model's)")

    def validate(self) -> None:
        if self.window is not None and self.window <= 0:
            self.fail(f"window must be > 0 tokens (got {self.window}).")
        if self.sinks < 0:
            self.fail(f"sinks must be >= 0 tokens (got {self.sinks}).")
        if self.cap is not None and self.cap <= 0:
            self.fail(f"cap must be > 0 tokens (got {self.cap}).")
        if self.original_max is not None and self.original_max < 1:
            self.fail(
                f"original_max must be a positive number of tokens (got {self.original_max})."
            )
        if self.window is not None and self.cap is not None:
            self._check_window(self.window, self.cap)

    def _check_window(self, window: int, cap: int) -> None:
        if window > cap:
            self.fail(
                f"window ({window}) must not exceed the distance cap ({cap}); the local branch "
                "keeps true distances, which the cap bounds."
            )

    def resolved(self, model: torch.nn.Module) -> tuple[int, int]:
        """(window, cap) with defaults filled from the trained length."""
        length = None
        if self.window is None or self.cap is None:
            length = self.trained_length(model)
        window = self.window if self.window is not None else length
        cap = self.cap if self.cap is not None else length
        self._check_window(window, cap)
        return window, cap

    def check_model(self, model: torch.nn.Module) -> None:
        super().check_model(model)
        self.refuse_if_unchanged(model, self.resolved(model)[0], "window")

    def layout(self, model: torch.nn.Module, rotary: torch.nn.Module) -> LMInfiniteLayout:
        window, cap = self.resolved(model)
        return LMInfiniteLayout(rotary=rotary, sinks=self.sinks, window=window, cap=cap)
