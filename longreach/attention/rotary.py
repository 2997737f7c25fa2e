"""RoPE helpers for layouts that score some regions with other positions.

Rotary embeddings (Su et al., 2021, arXiv 2104.09864) rotate each pair of channels
``(x_c, x_{c + D/2})`` by the angle ``m * theta_c`` (transformers' "rotate half" layout).
Rotations compose additively, so a query or key already rotated at position ``m`` is
moved to position ``m + delta`` by rotating it by ``delta``: that is how a method makes
a position set (Self-Extend's grouped positions, LM-Infinite's capped distance) from the
tensors the attention function receives, without the unrotated ones.

The angles are computed in float64 and cast once: in fp32 the angle ``m * theta`` has an
error of about ``m * 6e-8`` radians, 0.004 at 64k.
"""

from __future__ import annotations

import torch

__all__ = ["inv_freq", "rotate"]


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``x`` rotated by ``positions`` (RoPE, "rotate half" layout); returns a new tensor.

    x: (B, H, L, D); positions: (L,) or (B, L) integers or floats, one per row of ``x``;
    inv_freq: (D/2,) the model's inverse frequencies (see :func:`inv_freq`).
    No attention scaling is applied (YaRN's factor is already in the rotated tensors).
    """
    pos = positions.to(device=x.device, dtype=torch.float64)
    if pos.dim() == 1:
        pos = pos[None]
    angles = pos[..., None] * inv_freq.to(device=x.device, dtype=torch.float64)  # (B, L, D/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, L, D)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = angles.cos().to(work), angles.sin().to(work)
    xf = x.to(work)
    half = xf.shape[-1] // 2
    rotated_half = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated_half * sin).to(x.dtype)


def inv_freq(model: torch.nn.Module) -> torch.Tensor:
    """The inverse frequencies a transformers model rotates with (its ``rotary_emb.inv_freq``)."""
    for name, module in model.named_modules():
        freq = getattr(module, "inv_freq", None)
        if isinstance(freq, torch.Tensor) and name.endswith("rotary_emb"):
            return freq
    raise ValueError(f"{type(model).__name__} has no rotary embedding (no rotary_emb.inv_freq)")
