"""Block-sparse exact attention: the kernel layer the Extend and Remember methods run on.

A sparse pattern is only worth having if it costs less. Masking a dense n x n score
matrix (what most reference code does) is O(n^2) in memory and slower than plain
attention on CPU. Here a pattern is a *layout*: disjoint regions of (query, key) pairs,
compiled into query tiles of ``block`` rows, each a few unmasked attention calls whose
results are merged exactly by log-sum-exp (online softmax). Nothing n x n ever exists,
grouped-query attention never repeats K/V per head, and fp32 and bf16 both work.

Layers (each a module):

- :mod:`~longreach.attention.layout` — :class:`Region`, :class:`Layout` and the ready
  layouts :class:`CausalLayout`, :class:`LambdaLayout` (Λ: sinks + band),
  :class:`BlockLayout` (key blocks per query block), :class:`RegionLayout`; :func:`plan`.
- :mod:`~longreach.attention.kernel` — :func:`block_attention` (CPU flash backend, batched
  torch backend for CUDA), :class:`PositionSet`, :class:`KeyPadding`.
- :mod:`~longreach.attention.hf` — :func:`register` and :func:`use`: the transformers
  ``AttentionInterface`` + ``AttentionMaskInterface`` entries named ``"longreach"``.
- :mod:`~longreach.attention.rotary` — :func:`rotate`, :func:`inv_freq` for position sets.

Positions: methods supply rotated tensors, not a position rule
---------------------------------------------------------------
Methods that change positions per (query, key) pair — LM-Infinite caps distances,
Self-Extend groups far ones — do it with *position sets*. Every region names a ``pset``:
0 scores with the query and keys the model produced; ``p >= 1`` scores with
``layout.position_sets(...)[p - 1]``, a :class:`PositionSet` of queries and keys the method
rotated differently (with :func:`rotate`, by a delta from the model's own rotation). The
kernel only ever multiplies a query tile by a key tile, so it stays one fast path with no
per-pair position logic, the rotation is exact (float64 angles) and a set can cover only
the keys it needs (``key_start``). A per-(block, block) position rule inside the kernel
would have had to re-rotate keys per query tile, O(n^2 / block) rotations.

Example: Self-Extend (Jin et al., 2024) as a layout
---------------------------------------------------
::

    import torch
    from dataclasses import dataclass, field
    from longreach.attention import Layout, PositionSet, Region, inv_freq, rotate, use

    @dataclass(frozen=True)
    class SelfExtend(Layout):
        window: int          # W: neighbours keep exact positions
        group: int           # G: farther keys share floor(pos / G)
        freq: torch.Tensor = field(default=None, compare=False, hash=False)
        block: int = 1024

        def regions(self, q_len, kv_len, q_offset):
            return (Region(d=(0, self.window - 1)), Region(d=(self.window, None), pset=1))

        def position_sets(self, module, query, key, q_offset):
            W, G = self.window, self.group
            qpos = torch.arange(q_offset, q_offset + query.shape[-2])
            kpos = torch.arange(key.shape[-2])
            # grouped query position floor(i/G) + W - floor(W/G); key position floor(j/G)
            q = rotate(query, qpos // G + W - W // G - qpos, self.freq)
            k = rotate(key, kpos // G - kpos, self.freq)
            return (PositionSet(q, k),)

    with use(model, SelfExtend(window=1024, group=8, freq=inv_freq(model))):
        model.generate(...)

A layout is a frozen dataclass so that its plans are cached per (queries, keys, offset);
tensor fields are left out of the hash and comparison. ``longreach.methods.self_extend``
is the real method (it also handles left-padded batches).

Registration happens only in :func:`register` / :func:`use`, never on import.
"""

from __future__ import annotations

from longreach.attention.context import current_memory
from longreach.attention.hf import (
    NAME,
    SlotMask,
    UseHandle,
    attention_modules,
    layout_of,
    register,
    use,
)
from longreach.attention.kernel import KeyPadding, PositionSet, block_attention, default_backend
from longreach.attention.layout import (
    AttentionCall,
    BlockLayout,
    CausalLayout,
    Kind,
    LambdaLayout,
    Layout,
    Piece,
    Plan,
    Region,
    RegionLayout,
    Tile,
    Work,
    check_disjoint,
    plan,
)
from longreach.attention.rotary import inv_freq, rotate

__all__ = [
    "NAME",
    "AttentionCall",
    "BlockLayout",
    "CausalLayout",
    "KeyPadding",
    "Kind",
    "LambdaLayout",
    "Layout",
    "Piece",
    "Plan",
    "PositionSet",
    "Region",
    "RegionLayout",
    "SlotMask",
    "Tile",
    "UseHandle",
    "Work",
    "attention_modules",
    "block_attention",
    "check_disjoint",
    "current_memory",
    "default_backend",
    "inv_freq",
    "layout_of",
    "plan",
    "register",
    "rotate",
    "use",
]
