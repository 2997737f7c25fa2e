"""RoPE helpers for layouts that score some regions with other positions.

Rotary embeddings (Su et al., 2021, arXiv 2104.09864) rotate each pair of channels
``(x_c, x_{c + D/2})`` by the angle ``m * theta_c`` (transformers' "rotate half" layout).
Rotations compose additively, so a query or key already rotated at position ``m`` is
moved to position ``m + delta`` by rotating it by ``delta``: that is how a method makes
a position set (Self-Extend's grouped positions, LM-Infinite's capped distance) from the
tensors the attention function receives, without the unrotated ones.

The angles are computed in float64 and cast once: in fp32 the angle ``m * theta`` has an
error of about ``m * 6e-8`` radians, 0.004 at 64k. For integer positions the cos/sin values
come from a table per set of frequencies, grown on demand and kept between calls, so a
decode step does a lookup instead of float64 trigonometry (the same values, computed once).
"""

from __future__ import annotations

import torch

__all__ = ["inv_freq", "rotate", "rotation_table"]


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``x`` rotated by ``positions`` (RoPE, "rotate half" layout); returns a new tensor.

    x: (B, H, L, D); positions: (L,) or (B, L) integers or floats, one per row of ``x``;
    inv_freq: (D/2,) the model's inverse frequencies (see :func:`inv_freq`).
    No attention scaling is applied (YaRN's factor is already in the rotated tensors).
    Integer positions read cos/sin from a cached table (:func:`rotation_table`); float
    positions compute their angles in float64.
    """
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not positions.is_floating_point() and work == torch.float32:
        cos, sin = _table_lookup(positions, inv_freq, x.device)
    else:
        pos = positions.to(device=x.device, dtype=torch.float64)
        if pos.dim() == 1:
            pos = pos[None]
        angles = pos[..., None] * inv_freq.to(device=x.device, dtype=torch.float64)  # (B, L, D/2)
        cos, sin = angles.cos().to(work), angles.sin().to(work)
    cos = torch.cat((cos, cos), dim=-1)[:, None]  # (B, 1, L, D)
    sin = torch.cat((sin, sin), dim=-1)[:, None]
    xf = x.to(work)
    half = xf.shape[-1] // 2
    rotated_half = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated_half * sin).to(x.dtype)


class _Table:
    """cos and sin of ``p * inv_freq`` for p in [0, size), computed in float64, kept in fp32."""

    def __init__(self) -> None:
        self.cos = torch.empty(0)
        self.sin = torch.empty(0)

    def grow(self, size: int, inv_freq: torch.Tensor, device: torch.device) -> None:
        size = max(size, 2 * self.cos.shape[0], 4096)
        angles = torch.arange(size, dtype=torch.float64, device=device)[:, None] * inv_freq.to(
            device=device, dtype=torch.float64
        )
        self.cos, self.sin = angles.cos().float(), angles.sin().float()


# Tables per (frequencies, device); the key includes the tensor's version, so a method that
# rewrites ``inv_freq`` in place (or installs a new tensor) gets a new table. Few entries:
# one model has one rotary module, and dynamic NTK makes a new tensor per length.
_TABLES: dict[tuple, _Table] = {}
_MAX_TABLES = 8


def rotation_table(inv_freq: torch.Tensor, size: int, device: torch.device) -> _Table:
    """The cached cos/sin table for ``inv_freq`` covering positions ``[0, size)``."""
    key = (inv_freq.data_ptr(), inv_freq._version, inv_freq.numel(), str(device))
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.pop(next(iter(_TABLES)))
        table = _TABLES[key] = _Table()
    if table.cos.shape[0] < size:
        table.grow(size, inv_freq, device)
    return table


def _table_lookup(
    positions: torch.Tensor, inv_freq: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (B, L, D/2) fp32, for integer positions (negative ones too)."""
    pos = positions.to(device=device)
    if pos.dim() == 1:
        pos = pos[None]
    if pos.numel() == 0:
        empty = torch.empty(*pos.shape, inv_freq.numel(), device=device)
        return empty, empty
    size = int(pos.abs().max()) + 1
    table = rotation_table(inv_freq, size, device)
    idx = pos.abs().reshape(-1)
    cos = table.cos.index_select(0, idx).view(*pos.shape, -1)
    sin = table.sin.index_select(0, idx).view(*pos.shape, -1)
    negative = pos < 0
    if bool(negative.any()):
        sin = torch.where(negative[..., None], -sin, sin)  # sin(-a) = -sin(a)
    return cos, sin


def inv_freq(model: torch.nn.Module) -> torch.Tensor:
    """The inverse frequencies a transformers model rotates with (its ``rotary_emb.inv_freq``)."""
    for name, module in model.named_modules():
        freq = getattr(module, "inv_freq", None)
        if isinstance(freq, torch.Tensor) and name.endswith("rotary_emb"):
            return freq
    raise ValueError(f"{type(model).__name__} has no rotary embedding (no rotary_emb.inv_freq)")
