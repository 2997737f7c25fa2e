"""Shared plumbing of the windowed methods: self-extend, lm-infinite, streaming.

Each windowed method is a block layout (``longreach.attention``): disjoint regions of
(query, key) pairs, some scored with the model's own rotated tensors (``pset`` 0) and
some with a position set the layout rotates differently (``pset`` 1). Nothing n x n is
ever built; extra memory is O(n · window) at most.

Position sets need each token's *position*, but a layout sees *slots* of the key
tensor. Without padding the two are equal. With left padding (``generate`` on a
batch) row b's real tokens start at slot ``pad_b`` and sit at position
``slot - pad_b``, so grouped (self-extend) or capped (lm-infinite, streaming) positions
differ per row. :func:`windowed_attention` therefore runs each padded row on its own,
with its padding sliced off, so that inside a row slots are positions again; rows
without padding run together. That function is registered (through
``Patch.attention``) under :data:`NAME` with the block kernel's own mask function,
which hands it a small ``SlotMask`` instead of an n x n mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from longreach.attention import hf
from longreach.attention.layout import Layout
from longreach.errors import LongreachError
from longreach.methods.base import ATTENTION, CACHE, Method, Patch

NAME = "longreach-windowed"


# --------------------------------------------------------------------------- attention


def windowed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` entry: the module's block layout, each left-padded row on its own."""
    mask = attention_mask
    if isinstance(mask, hf.SlotMask) and mask.kv_offset > 0:
        raise LongreachError(
            "windowed methods address keys by their position from the start of the input, "
            "but this KV cache dropped the oldest ones (a sliding-window cache); let the "
            "method make the cache (pass no cache, or the extension's new_cache())."
        )
    padding = mask.padding if isinstance(mask, hf.SlotMask) else None
    if padding is None:
        return hf.attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    keep = padding.keep  # (B, kv_len), True for real keys
    bsz, _, q_len, _ = query.shape
    kv_len = key.shape[-2]
    q_offset = mask.q_offset - mask.kv_offset
    first = torch.where(keep.any(-1), keep.int().argmax(-1), kv_len).tolist()
    for row, start in enumerate(first):
        if not bool(keep[row, start:].all()):
            raise LongreachError(
                "windowed methods need left padding (real tokens last in every row); "
                "pad the batch on the left."
            )
    out = query.new_zeros(bsz, q_len, query.shape[1], value.shape[-1])
    for row, start in enumerate(first):
        q0 = max(q_offset, start)  # first real query slot of this row
        if q0 >= q_offset + q_len:
            continue  # every query of this row is padding: its output is never used
        q_b = query[row : row + 1, :, q0 - q_offset :]
        row_mask = hf.SlotMask(q0 - start, q_b.shape[-2], 0, kv_len - start, None, 1, mask.window)
        o, _ = hf.attention_forward(
            module,
            q_b,
            key[row : row + 1, :, start:],
            value[row : row + 1, :, start:],
            row_mask,
            dropout=dropout,
            scaling=scaling,
            **kwargs,
        )
        out[row, q0 - q_offset :] = o[0]
    return out, None


# --------------------------------------------------------------------------- layouts


def slots(start: int, length: int, device: torch.device) -> torch.Tensor:
    """Positions ``start .. start + length - 1`` (inside one unpadded row, slots are positions)."""
    return torch.arange(start, start + length, device=device)


@dataclasses.dataclass(frozen=True)
class WindowedLayout(Layout):
    """A frozen (hence plan-cached) layout that reads RoPE frequencies when it runs.

    ``rotary`` is the model's rotary embedding module; its ``inv_freq`` is read at each
    call, so a RoPE method applied before or after (``yarn``, ``dynamic-ntk``) is what the
    position sets rotate with.
    """

    rotary: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    def inv_freq(self) -> torch.Tensor:
        return self.rotary.inv_freq


# --------------------------------------------------------------------------- base method


def rotary_module(model: torch.nn.Module, method: str) -> torch.nn.Module:
    """The model's single rotary module, checked to rotate the whole head (the layouts need that)."""
    from longreach.methods.rope import rotary_modules

    modules = rotary_modules(model)
    name = type(model).__name__
    if not modules:
        raise LongreachError(
            f"{method}: {name} has no rotary position embedding (RoPE) module, and this method "
            "re-rotates queries and keys."
        )
    if len(modules) > 1 or not isinstance(getattr(modules[0], "rope_type", "default"), str):
        raise LongreachError(
            f"{method}: {name} uses several rotary embeddings (one per layer type), which "
            "windowed methods do not support yet."
        )
    rotary = modules[0]
    from longreach import compat

    head_dim = compat.head_dim(model.config)
    if 2 * rotary.inv_freq.numel() != head_dim:
        raise LongreachError(
            f"{method}: {name} rotates only part of each head (partial rotary), which windowed "
            "methods do not support yet."
        )
    return rotary


def sliding_windows(model: torch.nn.Module) -> list[int]:
    """The sliding windows of ``model``'s sliding-window layers (empty when none slides)."""
    from longreach import compat

    return [w for w in compat.sliding_windows(model).values() if w is not None]


@dataclasses.dataclass
class WindowedMethod(Method):
    """Base of the windowed methods: a layout on every attention layer, run by :func:`windowed_attention`.

    On a model with sliding-window layers the layer's window bounds the layout's regions
    (a key ``w`` or more tokens back is never attended, on top of the method's rule), and
    the KV cache keeps every key on those layers too: the layouts address keys by their
    position, which a sliding cache (that drops the oldest keys) would lose.
    """

    touches: ClassVar[frozenset[str]] = frozenset({ATTENTION})

    def layout(self, model: torch.nn.Module, rotary: torch.nn.Module) -> WindowedLayout:
        raise NotImplementedError

    def check_model(self, model: torch.nn.Module) -> None:
        rotary_module(model, self.name)
        if not hf.attention_modules(model):
            self.fail(f"{type(model).__name__} has no attention modules that longreach recognises.")

    def refuse_if_unchanged(self, model: torch.nn.Module, reach: int, param: str) -> None:
        """Refuse when every layer slides within ``reach`` tokens, where the method changes nothing.

        ``reach``: the distance below which the method keeps the model's own attention
        (its window parameter ``param``).
        """
        windows = sliding_windows(model)
        if windows and len(windows) == len(hf.attention_modules(model)) and max(windows) <= reach:
            w = max(windows)
            self.fail(
                f"every layer of {type(model).__name__} attends only to its {w} most recent "
                f"tokens (sliding window), all within {param}={reach}, so {self.name} would "
                f"change nothing; pass {param} below {w}."
            )

    def new_cache(self, model: torch.nn.Module) -> Any:
        """A cache that keeps every key, sliding-window layers included (None: no layer slides)."""
        if not sliding_windows(model):
            return None
        from transformers import DynamicCache

        return DynamicCache()  # no config: every layer a full one

    def install(self, model: torch.nn.Module, patch: Patch) -> None:
        layout = self.layout(model, rotary_module(model, self.name))
        handle = hf.use(model, layout)  # assigns the layout to every attention module
        patch.on_undo(handle.restore)
        patch.attention(model, NAME, windowed_attention, hf.mask_function)
        if CACHE not in self.touches and sliding_windows(model):  # a cache method has its own
            patch.cache_policy(model, lambda: self.new_cache(model))
