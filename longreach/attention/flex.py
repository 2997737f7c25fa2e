"""The block layouts on ``torch.nn.attention.flex_attention``: one fused kernel per position set.

The tile loop of :mod:`longreach.attention.kernel` makes one call per piece; on a GPU that
is many small launches. Here each position set of a plan becomes one flex-attention call
whose ``BlockMask`` holds exactly the plan's pairs:

- the regions (``Plan.regions``, or the pieces themselves, each of which is a region) are
  laid over a grid of 128 x 128 blocks (a table of ``q_len/128 x kv_len/128`` entries, not
  of pairs); a block that the regions cover entirely is *full* (no mask evaluated), one
  they touch is *partial*, any other is skipped, so the work is the visible pairs plus
  the partial blocks' edges;
- inside partial blocks, ``mask_mod`` tests the regions' bounds (a handful of integer
  comparisons per region; the region count is padded to a power of two so the compiled
  kernel is reused) and the key padding;
- the calls' outputs merge by log-sum-exp, as the tiles' pieces do.

The result equals the tile loop's (tests/test_attention_flex.py checks it on CPU, where
flex attention runs eagerly). On CUDA the function is compiled (``compat.flex_attention``);
that path is checked by ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from longreach import compat
from longreach.attention.layout import Kind, Plan, Region

__all__ = ["BLOCK", "flex_block_attention", "plan_regions"]

BLOCK = 128  # flex attention's block size (rows and keys)
_NEG = -1e30
_BIG = 1 << 40  # an unbounded end, small enough for int64 differences


def plan_regions(plan: Plan) -> dict[int, list[Region]]:
    """The plan's regions per position set: ``Plan.regions``, or one region per piece."""
    out: dict[int, list[Region]] = {}
    if plan.regions:
        for region in plan.regions:
            out.setdefault(region.pset, []).append(region)
        return out
    for tile in plan.tiles:
        for p in tile.pieces:
            d = {Kind.FULL: (None, None), Kind.LOWER: (p.q0 - p.k0, None)}.get(
                p.kind, (None, p.q0 - p.k0)
            )
            out.setdefault(p.pset, []).append(Region((p.q0, p.q1), (p.k0, p.k1), d, p.pset))
    return out


def _local_bounds(
    regions: Sequence[Region], q_offset: int, key_start: int, q_len: int, keys: int, kv_len: int
) -> torch.Tensor:
    """(R, 6) int64: each region as rows [a0, a1), keys [c0, c1), r - c in [e0, e1], local."""
    shift = q_offset - key_start  # slot difference i - j = (r - c) + shift
    rows = []
    for r in regions:
        a0 = max(0, (r.q[0] if r.q[0] is not None else -_BIG) - q_offset)
        a1 = min(q_len, (r.q[1] if r.q[1] is not None else _BIG) - q_offset)
        c0 = max(0, (r.k[0] if r.k[0] is not None else -_BIG) - key_start)
        c1 = min(keys, kv_len - key_start, (r.k[1] if r.k[1] is not None else _BIG) - key_start)
        e0 = (r.d[0] if r.d[0] is not None else -_BIG) - shift
        e1 = (r.d[1] if r.d[1] is not None else _BIG) - shift
        if a0 < a1 and c0 < c1 and e0 <= e1:
            rows.append((a0, a1, c0, c1, e0, e1))
    n = 1 << max(0, len(rows) - 1).bit_length()  # padded: one compiled kernel per size class
    rows += [(0, 0, 0, 0, 0, 0)] * (n - len(rows))
    return torch.tensor(rows, dtype=torch.int64)


def _block_tables(bounds: torch.Tensor, q_len: int, keys: int, padded: torch.Tensor | None):
    """(partial, full) bool tables (q blocks, kv blocks) of where the regions reach."""
    nq, nk = -(-q_len // BLOCK), -(-keys // BLOCK)
    r_lo = torch.arange(nq)[:, None] * BLOCK
    r_end = torch.clamp(r_lo + BLOCK, max=q_len)
    c_lo = torch.arange(nk)[None, :] * BLOCK
    c_end = torch.clamp(c_lo + BLOCK, max=keys)
    touched = torch.zeros(nq, nk, dtype=torch.bool)
    full = torch.zeros(nq, nk, dtype=torch.bool)
    for a0, a1, c0, c1, e0, e1 in bounds.tolist():
        if a0 >= a1:
            continue
        lo_r, hi_r = torch.clamp(r_lo, min=a0), torch.clamp(r_end, max=a1) - 1
        lo_c, hi_c = torch.clamp(c_lo, min=c0), torch.clamp(c_end, max=c1) - 1
        some = (lo_r <= hi_r) & (lo_c <= hi_c) & (lo_r - hi_c <= e1) & (hi_r - lo_c >= e0)
        touched |= some
        whole = (
            (lo_r == r_lo) & (hi_r == r_end - 1) & (lo_c == c_lo) & (hi_c == c_lo + BLOCK - 1)
            & (lo_r - hi_c >= e0) & (hi_r - lo_c <= e1)
        )  # fmt: skip
        full |= whole
    if padded is not None:
        full &= ~padded[None, :]
    return touched & ~full, full


def _compact(table: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Block counts (1, 1, nq) and indices (1, 1, nq, nk), the marked blocks first, in order."""
    counts = table.sum(-1, dtype=torch.int32)
    order = torch.argsort((~table).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[None, None].to(device), order[None, None].to(device)


def _mask_mod(bounds: torch.Tensor, keys: int, keep: torch.Tensor | None):
    n = bounds.shape[0]

    def mask_mod(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        seen = kv_idx < 0  # False, with the right shape
        for t in range(n):
            seen = seen | (
                (q_idx >= bounds[t, 0]) & (q_idx < bounds[t, 1])
                & (kv_idx >= bounds[t, 2]) & (kv_idx < bounds[t, 3])
                & (diff >= bounds[t, 4]) & (diff <= bounds[t, 5])
            )  # fmt: skip
        seen = seen & (kv_idx < keys)
        if keep is not None:
            seen = seen & keep[b, kv_idx]
        return seen

    return mask_mod


def _one_set(pset: Any, value: torch.Tensor, regions, plan: Plan, scale: float, padding: Any):
    q, k = pset.query, pset.key
    v = pset.value
    if v is None:
        v = value[:, :, pset.key_start : pset.key_start + k.shape[-2]]
    q_len, keys = q.shape[-2], k.shape[-2]
    bounds = _local_bounds(regions, plan.q_offset, pset.key_start, q_len, keys, plan.kv_len)
    keep = padded = None
    if padding is not None and pset.value is None:
        keep = padding.keep[:, pset.key_start : pset.key_start + keys].contiguous()
        pad_any = ~keep.all(0)
        width = -(-keys // BLOCK) * BLOCK
        padded = torch.nn.functional.pad(pad_any, (0, width - keys)).view(-1, BLOCK).any(-1).cpu()
    partial, full = _block_tables(bounds, q_len, keys, padded)
    device = q.device
    counts, indices = _compact(partial, device)
    full_counts, full_indices = _compact(full, device)
    mask = compat.flex_block_mask(
        counts, indices, full_counts, full_indices, BLOCK,
        _mask_mod(bounds.to(device), keys, keep), q_len, keys,
    )  # fmt: skip
    fn = compat.flex_attention(device)
    o, lse = fn(q, k, v, mask, scale)
    return o, lse.float().nan_to_num(nan=_NEG, neginf=_NEG).clamp(min=_NEG)


def flex_block_attention(query, key, value, plan: Plan, sets, scale, padding, return_lse):
    """``block_attention`` through flex attention: one call per position set, merged."""
    if compat.flex_attention(query.device) is None:
        raise ValueError("the 'flex' attention backend needs torch >= 2.5 (flex attention)")
    bsz, hq, q_len, _ = query.shape
    dv = value.shape[-1]
    by_set = plan_regions(plan)
    results = []
    for p in sorted(by_set):
        results.append(_one_set(sets[p], value, by_set[p], plan, scale, padding))
    out = torch.empty(bsz, q_len, hq, dv, dtype=query.dtype, device=query.device).transpose(1, 2)
    if not results:
        out.zero_()
        lse = torch.full((bsz, hq, q_len), _NEG, device=query.device)
        return (out, lse) if return_lse else out
    if len(results) == 1:
        o, lse = results[0]
        acc = o
    else:
        lses = torch.stack([lse for _, lse in results])
        lse = torch.logsumexp(lses, dim=0)
        weights = (lses - lse).exp_()[..., None]
        acc = torch.mul(results[0][0], weights[0])
        for (o, _), weight in zip(results[1:], weights[1:], strict=True):
            acc.addcmul_(o, weight)
    empty = lse < -1e29
    out.copy_(acc.masked_fill(empty[..., None], 0.0))
    return (out, lse.clamp(min=_NEG)) if return_lse else out
