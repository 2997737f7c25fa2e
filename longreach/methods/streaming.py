"""StreamingLLM: attention sinks plus a rolling window in the KV cache, positions inside the cache."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from transformers import DynamicCache

from longreach import compat
from longreach.attention import PositionSet, Region, rotate
from longreach.attention.layout import band_tile_rows
from longreach.attention.rotary import rotation_table
from longreach.errors import LongreachError
from longreach.methods.base import ATTENTION, CACHE, Patch, param
from longreach.methods.registry import register
from longreach.methods.windowed import (
    WindowedLayout,
    WindowedMethod,
    rotary_module,
    sliding_windows,
    slots,
)


@dataclasses.dataclass(frozen=True)
class StreamingLayout(WindowedLayout):
    """Λ layout for StreamingLLM: band ``i - j < window`` at true distances, sinks at ``min(i, S-1) - j``.

    ``S = sinks + window`` is the cache size. Decoding token by token, a query sits at
    cache slot ``min(i, S - 1)`` and sink j at slot j; the band keeps true distances
    because the recent tokens stay contiguous in the cache. Position set 1 moves each
    query to ``min(i, S - 1)`` for its sink pairs, so a many-token call (a long prompt,
    chunked prefill) computes exactly what one-token-at-a-time decoding would.
    """

    sinks: int = 4
    window: int = 1020
    block: int = 0  # query rows per tile; 0: derived from the band (band_tile_rows)

    def tile_rows(self) -> int:
        return self.block or band_tile_rows(self.window)

    def regions(self, q_len: int, kv_len: int, q_offset: int) -> Sequence[Region]:
        band = Region(d=(0, self.window - 1))
        if self.sinks == 0:
            return (band,)
        return (band, Region(k=(0, self.sinks), d=(self.window, None), pset=1))

    def windowed_regions(
        self, q_len: int, kv_len: int, q_offset: int, window: int | None
    ) -> Sequence[Region]:
        # The model's window counts slots of the cache, where no key is more than
        # sinks + window - 1 from the query; Streaming.check_model keeps that below it.
        if window is not None and self.sinks + self.window > window:
            raise LongreachError(
                f"streaming: sinks + window ({self.sinks} + {self.window}) exceed this layer's "
                f"sliding window ({window}); use window <= {window - self.sinks}."
            )
        return self.regions(q_len, kv_len, q_offset)

    def position_sets(self, module, query, key, q_offset: int) -> Sequence[PositionSet]:
        if self.sinks == 0:
            return ()
        last = self.sinks + self.window - 1
        sinks = key[:, :, : min(self.sinks, key.shape[-2])]
        if q_offset + query.shape[-2] - 1 <= last:  # no query beyond the last slot: nothing moves
            return (PositionSet(query, sinks),)
        i = slots(q_offset, query.shape[-2], query.device)
        return (PositionSet(rotate(query, i.clamp(max=last) - i, self.inv_freq()), sinks),)


class StreamingCache(DynamicCache):
    """A KV cache that keeps the first ``sinks`` tokens and the most recent ones, nothing else.

    A ``longreach.Context`` copies it per question (``context_reuse``): a question's tokens
    push document tokens out, which a crop cannot bring back.

    Keys are stored *before* rotation (Xiao et al., 2023, section 3.2): each update
    un-rotates the new keys and returns all stored keys rotated by their slot in the
    cache, so no position ever exceeds the cache size. After every forward call the
    method's hook calls :meth:`evict`, which keeps ``sinks + window - 1`` tokens (the next
    token makes ``sinks + window``) and really frees the rest (the buffers below are cut back
    to about twice the cache size after a long call; with padding, new smaller tensors).

    In a left-padded batch each row keeps its own first real tokens as sinks; rows with
    fewer real tokens keep some padding slots in front (masked), so every row has the
    same number of slots. ``keep`` (B, slots) marks real slots, None when all are real.

    Without padding each layer's keys and values live in a buffer with room for about
    ``2 * (sinks + window)`` slots (:class:`_Slots`): a new token is written in place,
    eviction moves only the ``sinks`` first slots up to the kept window, and the buffer is
    compacted once every ``sinks + window`` tokens or so; the rotation of the whole cache
    (slot positions change at every eviction) reads cos/sin rows from a table kept for
    the cache. With padding every call concatenates and gathers, as rows differ.
    """

    context_reuse = "copy"

    def __init__(self, sinks: int, window: int, rotary: torch.nn.Module) -> None:
        super().__init__()
        self.sinks = sinks
        self.window = window
        self.rotary = rotary
        self.keep: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # (B, slots) during a forward call
        self._slots: dict[int, _Slots] = {}  # per layer, when no slot is padding
        self._table: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    @property
    def capacity(self) -> int:
        """``sinks + window``: the most slots the cache holds, the current token included."""
        return self.sinks + self.window

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.positions is None:
            raise LongreachError(
                "the streaming cache was used outside a model call of the streaming method; "
                "call the model inside `longreach.extend(model, 'streaming')`."
            )
        inv_freq = self.rotary.inv_freq
        new = self.positions[:, -key_states.shape[-2] :]
        raw = rotate(key_states, -new, inv_freq)
        if self.keep is None:  # slot s is at position s in every row
            keys, values = self._append(layer_idx, raw, value_states, *args, **kwargs)
            return self._rotate_by_slot(keys, inv_freq), values
        keys, values = super().update(raw, value_states, layer_idx, *args, **kwargs)
        return rotate(keys, self.positions[:, -keys.shape[-2] :], inv_freq), values

    def _append(self, layer_idx: int, keys, values, *args, **kwargs):
        """Write new raw keys and values after the layer's live slots; return all live slots."""
        slots = self._own_slots(layer_idx)
        if slots is None:  # first call of this layer, or its tensors were replaced (crop, ...)
            keys, values = super().update(keys, values, layer_idx, *args, **kwargs)
            slots = self._slots[layer_idx] = _Slots(keys, values, 2 * self.capacity)
        else:
            slots.append(keys, values, 2 * self.capacity)
        layer = self.layers[layer_idx]
        layer.keys, layer.values = slots.live()
        return layer.keys, layer.values

    def _own_slots(self, layer_idx: int) -> _Slots | None:
        """The layer's buffer if the layer still holds exactly the views it was given."""
        slots = self._slots.get(layer_idx)
        if slots is None or layer_idx >= len(self.layers):
            return None
        layer = self.layers[layer_idx]
        if getattr(layer, "keys", None) is not slots.view_k:
            return None
        if getattr(layer, "values", None) is not slots.view_v:
            return None
        return slots

    def _rotate_by_slot(self, keys: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """``rotate(keys, arange(slots))`` with cos/sin rows of a full-width table kept here."""
        if keys.dtype == torch.float64:
            return rotate(keys, torch.arange(keys.shape[-2], device=keys.device), inv_freq)
        cos, sin = self._rows(keys.shape[-2], inv_freq, keys.device)
        x = keys.float()
        half = x.shape[-1] // 2
        turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        out = x * cos
        out += turned.mul_(sin)  # the same two products and sum as rotate(), fewer temporaries
        return out.to(keys.dtype)

    def _rows(self, size: int, inv_freq: torch.Tensor, device: torch.device):
        """(cos, sin), each (size, D) fp32: the slot positions' rows, both halves."""
        key = (inv_freq.data_ptr(), inv_freq._version, inv_freq.numel(), str(device))
        if self._table is None or self._table[0] != key or self._table[1].shape[0] < size:
            table = rotation_table(inv_freq, max(size, self.capacity + 1), device)
            cos, sin = table.cos, table.sin
            self._table = (key, torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1))
        return self._table[1][:size], self._table[2][:size]

    def begin(self, new_keep: torch.Tensor) -> torch.Tensor | None:
        """Record ``new_keep`` (B, C) for the incoming tokens; return the 2-D mask over all slots.

        Also fixes each slot's position (real tokens counted from each row's first one).
        Returns None when no slot is padding.
        """
        self.evict()
        past = self.get_seq_length()
        bsz = new_keep.shape[0]
        old = self.keep
        if old is None:
            old = torch.ones(bsz, past, dtype=torch.bool, device=new_keep.device)
        keep = torch.cat([old, new_keep.bool()], dim=-1)
        positions = (keep.long().cumsum(-1) - 1).clamp(min=0)
        self.positions = positions
        self.keep = None if bool(keep.all()) else keep
        return None if self.keep is None else keep.long()

    def end(self) -> None:
        self.positions = None
        self.evict()

    def evict(self) -> None:
        """Keep ``sinks`` first and ``window - 1`` last real tokens per row; free the rest."""
        past = self.get_seq_length()
        limit = self.sinks + self.window - 1
        if past <= limit:
            return
        recent = self.window - 1
        if self.keep is None:
            idx = None
            for index, layer in enumerate(self.layers):
                slots = self._own_slots(index)
                if slots is not None:
                    slots.evict(self.sinks, slots.length() - limit, 2 * self.capacity)
                    layer.keys, layer.values = slots.live()
                elif getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
                    if idx is None:
                        idx = torch.cat(
                            [torch.arange(self.sinks), torch.arange(past - recent, past)]
                        ).to(self._device())
                    layer.keys = layer.keys.index_select(2, idx)
                    layer.values = layer.values.index_select(2, idx)
            return
        rows = []
        for keep in self.keep:
            real = torch.nonzero(keep).flatten()
            if real.numel() > limit:
                real = torch.cat([real[: self.sinks], real[real.numel() - recent :]])
            rows.append((torch.nonzero(~keep).flatten(), real))
        width = max(real.numel() for _, real in rows)
        if width == 0:
            width = 1
        index = torch.stack([torch.cat([pad[: width - real.numel()], real]) for pad, real in rows])
        keep = torch.stack(
            [torch.arange(width, device=index.device) >= width - real.numel() for _, real in rows]
        )
        for layer in self._filled_layers():
            layer.keys = _gather(layer.keys, index)
            layer.values = _gather(layer.values, index)
        self.keep = None if bool(keep.all()) else keep

    def _filled_layers(self) -> list[Any]:
        return [
            layer
            for layer in self.layers
            if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0
        ]

    def _device(self) -> torch.device:
        layers = self._filled_layers()
        return layers[0].keys.device if layers else torch.device("cpu")


class _Slots:
    """One layer's keys and values in buffers with spare room; the live slots are [lo, hi).

    The first ``sinks`` live slots are the sinks, the rest the recent window, in order.
    ``live()`` returns views, which the cache layer holds (so transformers' length and
    mask bookkeeping see exactly the live slots); a layer whose tensors are no longer
    those views was changed by someone else and is adopted afresh.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        self.keys = self.values = None
        self.lo = self.hi = 0
        self._move(keys, values, room)

    def length(self) -> int:
        return self.hi - self.lo

    def live(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.view_k = self.keys[:, :, self.lo : self.hi]
        self.view_v = self.values[:, :, self.lo : self.hi]
        return self.view_k, self.view_v

    def _move(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        """Copy ``keys``/``values`` to the start of new buffers of max(room, their length) slots."""
        n = keys.shape[2]
        size = max(room, n)
        self.keys = keys.new_empty(*keys.shape[:2], size, keys.shape[3])
        self.values = values.new_empty(*values.shape[:2], size, values.shape[3])
        self.keys[:, :, :n] = keys
        self.values[:, :, :n] = values
        self.lo, self.hi = 0, n

    def append(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        n = keys.shape[2]
        if self.hi + n > self.keys.shape[2]:  # no room behind: compact into new buffers
            live_k, live_v = self.live()
            self._move(live_k, live_v, max(room, self.length() + n))
        self.keys[:, :, self.hi : self.hi + n] = keys
        self.values[:, :, self.hi : self.hi + n] = values
        self.hi += n

    def evict(self, sinks: int, drop: int, room: int) -> None:
        """Drop the ``drop`` oldest slots after the sinks: move the sinks up by ``drop``."""
        if drop <= 0:
            return
        if sinks:
            src = slice(self.lo, self.lo + sinks)
            dst = slice(self.lo + drop, self.lo + drop + sinks)
            for buf in (self.keys, self.values):
                part = buf[:, :, src]
                buf[:, :, dst] = part.clone() if drop < sinks else part
        self.lo += drop
        if self.keys.shape[2] > room:  # a long call grew the buffers: give the memory back
            live_k, live_v = self.live()
            self._move(live_k, live_v, room)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, D) -> (B, H, S', D) with slots ``index`` (B, S') per row."""
    index = index.to(x.device)[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1])
    return torch.gather(x, 2, index)


@register
@dataclasses.dataclass
class Streaming(WindowedMethod):
    """StreamingLLM (Xiao et al., 2023, Efficient Streaming Language Models with Attention Sinks, arXiv 2309.17453).

    Keep the first ``sinks`` tokens (attention sinks, default 4) and the ``window`` most
    recent tokens in the KV cache and evict everything between, so memory stays constant
    however long generation runs. Keys are cached before rotation and rotated by their
    position *inside the cache* (section 3.2): position ids never exceed
    ``sinks + window − 1``. It does not extend what the model can use: a token that left
    the window is gone. It keeps generation fluent for any length.

    Prefill of a prompt longer than the cache: processed, in one call or in chunks,
    exactly as if fed one token at a time. Every query attends to the sinks and the
    ``window`` most recent tokens (itself included), with true distances inside the window
    and distance ``min(i, S − 1) − j`` to sink j (S = sinks + window: the query's slot once
    the cache is full). This is a Λ layout on the block-sparse attention (no n x n mask); a
    call of C tokens holds at most ``S − 1 + C`` cached tokens, and after each call the cache
    is cut to ``S − 1``. The reference code instead evicts to make room before a chunk, so
    early queries of a chunk see fewer tokens; chunk-size-independent results seemed worth
    more. Without a cache (``use_cache=False``) the same layout gives the same scores.

    Parameters:
        sinks: starting tokens always kept (default 4, the paper's choice).
        window: recent tokens kept, the current one included (default: the trained length,
            or the model's sliding window when shorter, minus ``sinks``); ``sinks + window``
            must not exceed either.
        original_max: L, the trained length (default: the model's own).
    """

    name: ClassVar[str] = "streaming"
    paper: ClassVar[str] = (
        "Xiao et al., 2023, Efficient Streaming Language Models with Attention Sinks, "
        "arXiv 2309.17453"
    )
    summary: ClassVar[str] = "KV cache of sinks + recent window, positions inside the cache"
    touches: ClassVar[frozenset[str]] = frozenset({ATTENTION, CACHE})

    sinks: int = param(4, "attention-sink tokens always kept at the start of the cache")
    window: int | None = param(None, "recent tokens kept (default: original_max - sinks)")
    original_max: int | None = param(None, "L, the trained length (default: the model's)")

    def validate(self) -> None:
        if self.sinks < 0:
            self.fail(f"sinks must be >= 0 tokens (got {self.sinks}).")
        if self.window is not None and self.window <= 0:
            self.fail(f"window must be > 0 tokens (got {self.window}).")
        if self.original_max is not None and self.original_max < 1:
            self.fail(
                f"original_max must be a positive number of tokens (got {self.original_max})."
            )
        if self.original_max is not None and self.window is not None:
            self._check_size(self.window, self.original_max)

    def _check_size(self, window: int, length: int) -> None:
        if self.sinks + window > length:
            self.fail(
                f"sinks + window ({self.sinks} + {window}) must not exceed the trained length "
                f"{length}: positions inside the cache would leave the trained range."
            )
        if window <= 0:
            self.fail(f"window must be > 0 tokens (got {window}); lower sinks.")

    def resolved_window(self, model: torch.nn.Module) -> int:
        length = self.trained_length(model)
        sliding = min(sliding_windows(model), default=None)
        limit = length if sliding is None else min(length, sliding)
        window = self.window if self.window is not None else limit - self.sinks
        self._check_size(window, length)
        if sliding is not None and self.sinks + window > sliding:
            self.fail(
                f"sinks + window ({self.sinks} + {window}) must not exceed the model's sliding "
                f"window ({sliding}): its sliding layers would drop the sinks; pass window <= "
                f"{sliding - self.sinks}."
            )
        return window

    def check_model(self, model: torch.nn.Module) -> None:
        super().check_model(model)
        self.resolved_window(model)

    def layout(self, model: torch.nn.Module, rotary: torch.nn.Module) -> StreamingLayout:
        return StreamingLayout(rotary=rotary, sinks=self.sinks, window=self.resolved_window(model))

    def new_cache(self, model: torch.nn.Module) -> StreamingCache:
        return StreamingCache(
            self.sinks, self.resolved_window(model), rotary_module(model, self.name)
        )

    def install(self, model: torch.nn.Module, patch: Patch) -> None:
        super().install(model, patch)
        patch.cache_policy(model, lambda: self.new_cache(model))
        key = compat.cache_kwarg(model)
        takes_cache_position = compat.takes_cache_position(model)

        def before(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            cache = kwargs.get(key)
            if not isinstance(cache, StreamingCache):
                return None
            tokens = kwargs.get("input_ids")
            if tokens is None and args:
                tokens = args[0]
            if tokens is None:
                tokens = kwargs["inputs_embeds"]
            bsz, count = tokens.shape[0], tokens.shape[1]
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.dim() != 2:
                raise LongreachError(
                    "streaming needs a 2-D attention mask (batch, tokens); got a "
                    f"{mask.dim()}-D one."
                )
            new_keep = (
                mask[:, -count:].bool()
                if mask is not None
                else torch.ones(bsz, count, dtype=torch.bool, device=tokens.device)
            )
            kwargs["attention_mask"] = cache.begin(new_keep)
            past = cache.positions.shape[-1] - count
            kwargs["position_ids"] = cache.positions[:, past:]
            if takes_cache_position:
                kwargs["cache_position"] = torch.arange(past, past + count, device=tokens.device)
            return args, kwargs

        def after(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            cache = kwargs.get(key)
            if isinstance(cache, StreamingCache):
                cache.end()

        patch.forward_pre_hook(model, before)
        handle = model.register_forward_hook(after, with_kwargs=True)
        patch.on_undo(handle.remove)
