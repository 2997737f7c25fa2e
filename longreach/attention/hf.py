"""The bridge to transformers: an attention function and its mask function, registered on request.

:func:`register` adds the name ``"longreach"`` to ``transformers.AttentionInterface`` and
``transformers.masking_utils.AttentionMaskInterface``. The mask entry is essential: it
replaces the (q_len x kv_len) boolean mask transformers would build with a small
:class:`SlotMask` that carries where the queries sit and which keys are padding. Without a
mask entry transformers skips mask creation for unknown names and padding is silently lost.

:func:`use` switches a model to that attention and assigns a layout to its attention
modules (all layers, or some); it returns a handle that restores the previous state, and
works as a context manager. Modules without an assigned layout run :class:`CausalLayout`.

A sliding-window layer (Mistral, Phi-3, Qwen2 with ``use_sliding_window``) is one more
region bound: the mask entry recognises transformers' sliding-window causal mask and puts
its window w on the :class:`SlotMask`; the layout's plan then leaves out every pair more
than ``w - 1`` slots apart (:meth:`Layout.plan`), so the block kernel still runs.

Anything the block kernel does not express falls back, correctly but densely, to
transformers' own SDPA path: a 4-D mask passed in by the caller, mask patterns other than
plain or sliding-window causal (packed sequences, image-token overlays), attention
dropout during training. That fallback computes plain causal attention, so it is taken
only for :class:`CausalLayout`; any other layout (a method's) raises a clear error
instead of silently computing vanilla attention. Soft-capped logits (Gemma 2/3) raise a
clear error.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from longreach import compat
from longreach.attention import context
from longreach.attention.kernel import KeyPadding, block_attention
from longreach.attention.layout import AttentionCall, CausalLayout, Layout
from longreach.errors import LongreachError

__all__ = ["NAME", "SlotMask", "UseHandle", "attention_modules", "layout_of", "register", "use"]

log = logging.getLogger(__name__)

NAME = "longreach"

_DEFAULT = CausalLayout()
_LAYOUTS: weakref.WeakKeyDictionary[torch.nn.Module, Layout] = weakref.WeakKeyDictionary()
_warned: set[str] = set()


@dataclass
class SlotMask:
    """What the attention function needs instead of a dense mask.

    ``q_offset`` and ``kv_offset`` are the absolute positions of the first query and of the
    first key slot (a sliding cache starts at ``kv_offset > 0``); ``padding`` marks real
    keys, or is None when no key is padding. ``window`` is the layer's sliding window w
    (a query never sees a key ``w`` or more slots before it), None for full attention.

    It stands for a (batch, 1, q_length, kv_length) mask and says so through ``ndim`` and
    ``shape``: ``generate`` with a static cache builds the mask ahead of the forward call and
    hands it back to transformers' mask creation, which then passes it to
    :func:`mask_function` (it returns it unchanged) instead of treating it as a 2-D padding mask.
    """

    q_offset: int
    q_length: int
    kv_offset: int
    kv_length: int
    padding: KeyPadding | None = None
    batch_size: int = 1
    window: int | None = None

    ndim = 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, 1, self.q_length, self.kv_length)

    def dense(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The (batch, 1, q_length, kv_length) boolean mask this stands for (fallback paths only)."""
        i = torch.arange(self.q_offset, self.q_offset + self.q_length, device=device)[:, None]
        j = torch.arange(self.kv_offset, self.kv_offset + self.kv_length, device=device)[None, :]
        mask = j <= i
        if self.window is not None:
            mask = mask & (i - j < self.window)
        mask = mask[None, None].expand(self.batch_size, 1, -1, -1)
        if self.padding is not None:
            mask = mask & self.padding.keep.to(device)[:, None, None, :]
        return mask


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


def _dense_mask(**kwargs: Any) -> Any:
    from transformers.masking_utils import AttentionMaskInterface

    return AttentionMaskInterface._global_mapping["sdpa"](**kwargs)


def mask_function(
    batch_size: int,
    kv_length: int,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> SlotMask | torch.Tensor | None:
    """``AttentionMaskInterface`` entry: a :class:`SlotMask`, or a dense mask for unusual patterns."""
    from transformers.masking_utils import causal_mask_function

    if isinstance(attention_mask, SlotMask):
        return attention_mask  # made ahead of this forward call (generate with a static cache)
    window = None
    if mask_function is not None and mask_function is not causal_mask_function:
        window = compat.sliding_window_of(mask_function, kwargs)
    if window is None and mask_function is not None and mask_function is not causal_mask_function:
        _warn_once(
            "longreach attention: this model uses a mask pattern other than plain or "
            "sliding-window causal (packing or an overlay); those layers run transformers' "
            "dense SDPA."
        )
        return _dense_mask(
            batch_size=batch_size,
            kv_length=kv_length,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            **kwargs,
        )
    q_offset, q_length = compat.mask_query_range(kwargs)
    padding = None
    if attention_mask is not None:
        keep = attention_mask.bool()
        short = kv_offset + kv_length - keep.shape[-1]
        if short > 0:  # slots past the mask (a static cache's empty tail) are never attended
            keep = torch.nn.functional.pad(keep, (0, short), value=False)
        keep = keep[:, kv_offset : kv_offset + kv_length]
        if keep.shape[0] == 1 and batch_size > 1:
            keep = keep.expand(batch_size, -1)
        if not bool(keep.all()):
            padding = KeyPadding(keep)
    return SlotMask(q_offset, q_length, kv_offset, kv_length, padding, batch_size, window)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` entry: block-sparse exact attention with the module's layout."""
    if kwargs.get("softcap") is not None:
        raise LongreachError(
            "longreach attention does not support attention-logit soft-capping (Gemma 2/3); "
            "use this model with attn_implementation='eager'."
        )
    layout = _LAYOUTS.get(module, _DEFAULT)
    dense = (
        isinstance(attention_mask, torch.Tensor)
        or (dropout > 0.0 and module.training)
        or not getattr(module, "is_causal", True)
    )
    if dense:
        if not isinstance(layout, CausalLayout):
            raise LongreachError(
                f"longreach attention cannot apply {type(layout).__name__} here: "
                f"{_dense_reason(attention_mask, dropout, module)} (the dense fallback would "
                "silently compute plain causal attention instead)."
            )
        if isinstance(attention_mask, SlotMask):
            plain = attention_mask.window is None or attention_mask.window >= key.shape[-2]
            if plain and attention_mask.padding is None and query.shape[-2] == key.shape[-2]:
                attention_mask = None  # plain causal: SDPA's is_causal handles it
            else:
                attention_mask = attention_mask.dense(query.device)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    q_len, kv_len = query.shape[-2], key.shape[-2]
    window = None
    if isinstance(attention_mask, SlotMask):
        q_offset = attention_mask.q_offset - attention_mask.kv_offset
        padding = attention_mask.padding
        window = attention_mask.window
    else:  # no mask made (called outside a model forward): the queries are the newest keys
        q_offset, padding = kv_len - q_len, None
    if window is not None and not layout.windows:
        raise LongreachError(
            f"the layout {type(layout).__name__} does not support sliding-window attention "
            "layers (this model's sliding window); use a model without one."
        )
    if window is not None and attention_mask.kv_offset > 0 and not isinstance(layout, CausalLayout):
        # Only plain causal attention depends on distances alone; a layout's absolute slots
        # (sinks, blocks) would point at the wrong keys once the sliding cache dropped some.
        raise LongreachError(
            f"{type(layout).__name__} addresses keys by position from the start of the input, "
            "but this sliding-window KV cache dropped the oldest ones; pass a cache that keeps "
            "every key (transformers.DynamicCache() without a config)."
        )
    call = AttentionCall(
        module,
        getattr(module, "layer_idx", 0),
        query,
        key,
        value,
        q_offset,
        padding,
        context.current_memory(),
        scaling,
        window,
    )
    out = None
    for work in layout.prepare(call):
        rows = work.rows
        part = (rows is None) or (rows == (0, q_len))
        q = query if part else query[:, :, rows[0] : rows[1]]
        o = block_attention(
            q,
            key,
            value,
            work.plan,
            scale=scaling,
            padding=padding,
            position_sets=work.sources,
            return_lse=work.done is not None,
        )
        if work.done is not None:
            o, lse = o
        if part:
            out = o
        else:
            if out is None:
                out = query.new_empty(query.shape[0], q_len, query.shape[1], value.shape[-1])
                out = out.transpose(1, 2)
            out[:, :, rows[0] : rows[1]] = o
        if work.done is not None:
            work.done(o, lse)
    return out.transpose(1, 2), None


def _dense_reason(attention_mask: Any, dropout: float, module: torch.nn.Module) -> str:
    if isinstance(attention_mask, torch.Tensor):
        return (
            "this call has a dense 4-D attention mask or a mask pattern the block kernel cannot "
            "express (packed sequences, overlays); pass a 2-D padding mask or none"
        )
    if not getattr(module, "is_causal", True):
        return "this attention is not causal; use a causal language model"
    return f"attention dropout ({dropout}) is on in training mode; call model.eval()"


def register() -> None:
    """Make ``attn_implementation="longreach"`` available to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_function)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that call the attention function (those with a ``layer_idx`` and KV groups)."""
    return [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups") and hasattr(m, "config")
    ]


def layout_of(module: torch.nn.Module) -> Layout:
    """The layout an attention module runs under ``"longreach"`` attention."""
    return _LAYOUTS.get(module, _DEFAULT)


class UseHandle:
    """Restores a model's attention implementation and layouts; also a context manager."""

    def __init__(self, model: torch.nn.Module, previous_impl: str, previous: dict) -> None:
        self._model = model
        self._previous_impl = previous_impl
        self._previous = previous
        self._restored = False

    def restore(self) -> None:
        if self._restored:
            return
        self._restored = True
        for module, layout in self._previous.items():
            if layout is None:
                _LAYOUTS.pop(module, None)
            else:
                _LAYOUTS[module] = layout
        if self._model.config._attn_implementation != self._previous_impl:
            self._model.set_attn_implementation(self._previous_impl)

    def __enter__(self) -> UseHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def use(
    model: torch.nn.Module, layout: Layout | None = None, *, layers: Iterable[int] | None = None
) -> UseHandle:
    """Run ``model``'s attention through the block kernel with ``layout`` (default: causal).

    ``layers`` limits the layout to those layer indices (the others keep theirs, causal by
    default). Registers the attention function if needed. Returns a handle whose
    ``restore()`` (or the end of a ``with`` block) undoes exactly this call.
    """
    register()
    layout = layout if layout is not None else _DEFAULT
    wanted = None if layers is None else set(layers)
    previous: dict[torch.nn.Module, Layout | None] = {}
    modules = attention_modules(model)
    if not modules:
        raise LongreachError(
            f"{type(model).__name__} has no attention modules that longreach recognises "
            "(modules with a layer_idx and num_key_value_groups); it cannot use block attention."
        )
    for m in modules:
        if wanted is None or m.layer_idx in wanted:
            previous[m] = _LAYOUTS.get(m)
            _LAYOUTS[m] = layout
    previous_impl = model.config._attn_implementation
    if previous_impl != NAME:
        model.set_attn_implementation(NAME)
    return UseHandle(model, previous_impl, previous)
