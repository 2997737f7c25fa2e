"""Exact attention over a :class:`~longreach.attention.layout.Plan`, merged by log-sum-exp.

Each piece of a plan is one unmasked attention call that returns its output ``o_p`` and
the log-sum-exp ``l_p`` of its scores per query row. Pieces that share rows combine
exactly (the rescaling of FlashAttention's online softmax, Dao et al., 2022,
arXiv 2205.14135, §3.1):

    l = log(sum_p exp(l_p)),    o = sum_p exp(l_p - l) * o_p

computed per tile in two passes: ``l`` first (one value per row), then one fused
multiply-add per piece into an fp32 accumulator.

Two backends compute a piece:

- ``"flash_cpu"``: torch's CPU flash kernel (``compat.cpu_flash_attention``), which handles
  grouped-query attention natively (K/V are never repeated per query head), causal squares
  via ``is_causal`` and returns the log-sum-exp; bf16 and fp32. UPPER squares run it on
  reversed rows and keys (a copy of ``block`` rows, not of the sequence).
- ``"flex"``: the whole plan as one ``torch.nn.attention.flex_attention`` call per position
  set, its ``BlockMask`` built from the plan's regions (:mod:`longreach.attention.flex`);
  compiled into fused kernels on CUDA, the default there.
- ``"torch"``: batched matmuls in fp32 over key tiles of ``key_tile`` columns, with the
  query heads of a group stacked as rows (again no K/V repeat). The fallback anywhere the
  other two are missing; memory per call is ``block x heads x key_tile`` floats.

No tensor larger than ``block x (keys of one piece)`` scores ever exists; key padding is
applied as a ``(batch, 1, 1, keys)`` additive row per piece, and only on pieces that
contain a padded key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from longreach import compat
from longreach.attention.layout import Kind, Piece, Plan

__all__ = [
    "KeyPadding",
    "PositionSet",
    "block_attention",
    "default_backend",
    "gather_rows",
    "row_index",
]

# A finite "minus infinity" for masked keys: a row whose keys are all masked then gets a
# finite log-sum-exp far below any real one (weight 0 in the merge) instead of NaN.
_NEG = -1e30
_EMPTY = -1e29  # rows whose merged log-sum-exp stays below this saw no key: output 0


@dataclass
class PositionSet:
    """A source of (query, key, value) for regions with ``pset >= 1``.

    ``query`` has the shape of the model's query (B, Hq, Lq, D). ``key`` (B, Hkv, S', D)
    holds slots ``key_start .. key_start + S'`` only, so a set needs only the keys its
    regions touch (e.g. LM-Infinite's few global tokens). Without ``value`` the set scores
    other positions of the model's own keys and reads the model's values at the same slots;
    with ``value`` (B, Hkv, S', Dv) it is a source of its own (memory blocks gathered into one
    staging tensor, keys that are not resident in the cache) and key padding never applies.
    """

    query: torch.Tensor
    key: torch.Tensor
    key_start: int = 0
    value: torch.Tensor | None = None


class KeyPadding:
    """Which key slots are real (True) or padding (False), per batch row: (B, S) bool."""

    def __init__(self, keep: torch.Tensor) -> None:
        self.keep = keep.bool()
        pad_any = (~self.keep).any(0).to(torch.int64)
        # prefix[j] = padded slots (in any batch row) before slot j; a host list for O(1) checks
        self._prefix = [0, *torch.cumsum(pad_any, 0).tolist()]
        self._rows: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}

    @property
    def any(self) -> bool:
        return self._prefix[-1] > 0

    def touches(self, k0: int, k1: int) -> bool:
        return self._prefix[k1] - self._prefix[k0] > 0

    def additive(self, k0: int, k1: int, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, 1, k1 - k0) with 0 for real keys and a huge negative for padding."""
        key = (k0, k1, dtype)
        row = self._rows.get(key)
        if row is None:
            keep = self.keep[:, k0:k1]
            row = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, _NEG)
            row = row[:, None, None, :]
            if len(self._rows) < 256:
                self._rows[key] = row
        return row


def row_index(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Indices into ``x.reshape(-1, D)`` of ``slots`` of each (batch, head) of ``x`` (B, H, S, D).

    ``slots`` is (H, m) (the same for every batch row) or (B, H, m); returns (B, H, m).
    """
    bsz, heads, length = x.shape[:3]
    base = torch.arange(bsz * heads, device=slots.device).view(bsz, heads, 1) * length
    return base + slots


def gather_rows(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``x`` (B, H, S, D) at ``slots`` ((H, m) or (B, H, m)) of each head: (B, H, m, D).

    Whole rows of D channels are copied (``index_select`` on the (B * H * S, D) view): on
    CPU much faster than an element-wise ``gather`` with an index expanded over D. A
    non-contiguous ``x`` is copied to contiguous first.
    """
    bsz, heads, _, dim = x.shape
    rows = row_index(x, slots).flatten()
    return x.reshape(-1, dim).index_select(0, rows).view(bsz, heads, -1, dim)


def default_backend(device: torch.device) -> str:
    """``flash_cpu`` on CPU, ``flex`` (flex attention, compiled) on CUDA, else ``torch``."""
    if device.type == "cpu" and compat.cpu_flash_attention() is not None:
        return "flash_cpu"
    if device.type == "cuda" and compat.flex_attention(device) is not None:
        return "flex"
    return "torch"


def block_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: Plan,
    *,
    scale: float | None = None,
    padding: KeyPadding | torch.Tensor | None = None,
    position_sets: Sequence[PositionSet] = (),
    backend: str = "auto",
    key_tile: int = 1024,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` over ``key``/``value`` restricted to the pairs of ``plan``.

    query (B, Hq, Lq, D), key and value (B, Hkv, S, D) with Hkv dividing Hq; ``plan`` made
    for ``Lq`` queries and ``S`` keys. ``padding``: (B, S) bool, True for real keys.
    ``position_sets[p - 1]`` supplies the tensors of regions with ``pset = p``. Returns
    (B, Hq, Lq, Dv) in the query's dtype, laid out so that ``.transpose(1, 2)`` is
    contiguous (what transformers' attention modules expect). Rows that see no key are 0.
    With ``return_lse`` also returns each row's log-sum-exp of its scaled scores (B, Hq, Lq),
    fp32; rows that see no key get a huge negative value.
    """
    bsz, hq, q_len, _ = query.shape
    hkv, kv_len, dv = key.shape[1], key.shape[2], value.shape[-1]
    if plan.q_len != q_len or plan.kv_len != kv_len:
        raise ValueError(
            f"plan is for {plan.q_len} queries x {plan.kv_len} keys, got {q_len} x {kv_len}"
        )
    if hq % hkv:
        raise ValueError(f"{hq} query heads cannot share {hkv} key/value heads")
    if scale is None:
        scale = query.shape[-1] ** -0.5
    if isinstance(padding, torch.Tensor):
        padding = KeyPadding(padding)
    if padding is not None and not padding.any:
        padding = None
    if backend == "auto":
        backend = default_backend(query.device)
    if backend == "flash_cpu":
        # a tile of one piece runs unsplit: a lone causal square is then SDPA's own call
        run, whole = _piece_flash_cpu_split, _piece_flash_cpu
    elif backend in ("torch", "flex"):
        run = whole = _piece_torch
    else:
        raise ValueError(
            f"unknown attention backend {backend!r}; choose 'auto', 'flash_cpu', 'flex' or 'torch'"
        )
    sets = [PositionSet(query, key, 0), *position_sets]
    missing = plan.psets - set(range(len(sets)))
    if missing:
        raise ValueError(
            f"the plan uses position sets {sorted(missing)} but only {len(sets) - 1} extra were given"
        )
    if backend == "flex":
        from longreach.attention.flex import flex_block_attention

        return flex_block_attention(query, key, value, plan, sets, scale, padding, return_lse)

    out = torch.empty(bsz, q_len, hq, dv, dtype=query.dtype, device=query.device).transpose(1, 2)
    lse_out = (
        torch.empty(bsz, hq, q_len, dtype=torch.float32, device=query.device)
        if return_lse
        else None
    )
    q_off = plan.q_offset
    for tile in plan.tiles:
        r0, r1 = tile.q0 - q_off, tile.q1 - q_off
        if not tile.pieces:
            out[:, :, r0:r1] = 0
            if lse_out is not None:
                lse_out[:, :, r0:r1] = _NEG
            continue
        if len(tile.pieces) == 1 and (tile.pieces[0].q0, tile.pieces[0].q1) == (tile.q0, tile.q1):
            # One piece (e.g. a whole causal chunk): write its output directly.
            piece = tile.pieces[0]
            o, lse = whole(sets[piece.pset], value, piece, q_off, scale, padding, key_tile)
            out[:, :, r0:r1] = o if padding is None else _zero_empty_rows(o, lse)
            if lse_out is not None:
                lse_out[:, :, r0:r1] = lse
            continue
        # Two passes: the tile's log-sum-exp per row first (small), then every piece's output
        # weighted by exp(l_p - l) straight into one fp32 accumulator (one fused pass each).
        # Few, larger ops on purpose: on a busy machine each small parallel op costs a thread
        # wake-up (milliseconds), more than its arithmetic.
        results = [
            run(sets[p.pset], value, p, q_off, scale, padding, key_tile) for p in tile.pieces
        ]
        rows = [(p.q0 - tile.q0, p.q1 - tile.q0) for p in tile.pieces]
        if all(ab == (0, r1 - r0) for ab in rows):
            lses = torch.stack([lse for _, lse in results])
            total = torch.logsumexp(lses, dim=0)
            weights = (lses - total).exp_()[..., None]
            acc = torch.mul(results[0][0], weights[0])  # fp32: the weight promotes bf16
            for (o, _), weight in zip(results[1:], weights[1:], strict=True):
                acc.addcmul_(o, weight)
        else:
            total = torch.full((bsz, hq, r1 - r0), float("-inf"), device=query.device)
            for (a, b), (_, lse) in zip(rows, results, strict=True):
                total[:, :, a:b] = torch.logaddexp(total[:, :, a:b], lse)
            acc = torch.zeros(bsz, hq, r1 - r0, dv, dtype=torch.float32, device=query.device)
            for (a, b), (o, lse) in zip(rows, results, strict=True):
                acc[:, :, a:b].addcmul_(o, torch.exp(lse - total[:, :, a:b])[..., None])
        out[:, :, r0:r1] = acc if padding is None and tile.covered else _zero_empty_rows(acc, total)
        if lse_out is not None:
            lse_out[:, :, r0:r1] = total.clamp(min=_NEG)
    return (out, lse_out) if return_lse else out


def _zero_empty_rows(o: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Rows that saw no real key (log-sum-exp near our finite -inf) output 0, as SDPA does."""
    empty = lse < _EMPTY
    if o.device.type != "cpu":
        return o.masked_fill(empty[..., None], 0.0)  # no host sync
    return o.masked_fill(empty[..., None], 0.0) if bool(empty.any()) else o


def _slices(pset: PositionSet, value: torch.Tensor, p: Piece, q_off: int):
    k0, k1 = p.k0 - pset.key_start, p.k1 - pset.key_start
    if k0 < 0 or k1 > pset.key.shape[-2]:
        raise ValueError(
            f"a piece needs key slots [{p.k0}, {p.k1}) but its position set holds "
            f"[{pset.key_start}, {pset.key_start + pset.key.shape[-2]})"
        )
    q = pset.query[:, :, p.q0 - q_off : p.q1 - q_off]
    if pset.value is not None:
        return q, pset.key[:, :, k0:k1], pset.value[:, :, k0:k1]
    return q, pset.key[:, :, k0:k1], value[:, :, p.k0 : p.k1]


# torch's CPU flash kernel computes a triangle of up to ~768 rows at the cost of the whole
# square (its key blocks are 512 wide; measured one thread, SmolLM2's heads, fp32: a 512-row
# causal square 6.2 ms, the full square 5.7). Such a triangle runs as two triangles of half
# the size plus the full rectangle between them (4.9 ms); larger ones are left to the kernel
# (1024 rows: 19.1 ms causal against 20.6 split), smaller ones gain nothing. A tile of one
# piece is never split: a lone causal square stays the call SDPA makes, bit for bit.
_SPLIT_TRIANGLE = (384, 768)


def _piece_flash_cpu_split(pset, value, p: Piece, q_off, scale, padding, key_tile):
    """:func:`_piece_flash_cpu`, with a 384-768-row triangle run as halves (above)."""
    if p.kind != Kind.FULL and _SPLIT_TRIANGLE[0] <= p.q1 - p.q0 <= _SPLIT_TRIANGLE[1]:
        return _split_triangle(pset, value, p, q_off, scale, padding, key_tile)
    return _piece_flash_cpu(pset, value, p, q_off, scale, padding, key_tile)


def _piece_flash_cpu(pset, value, p: Piece, q_off, scale, padding, key_tile):
    op = compat.cpu_flash_attention()
    q, k, v = _slices(pset, value, p, q_off)
    mask = None
    if padding is not None and pset.value is None and padding.touches(p.k0, p.k1):
        mask = padding.additive(p.k0, p.k1, q.dtype)
    if p.kind == Kind.UPPER:
        q, k, v = q.flip(-2), k.flip(-2), v.flip(-2)
        if mask is not None:
            mask = mask.flip(-1)
    o, lse = op(q, k, v, 0.0, p.kind != Kind.FULL, attn_mask=mask, scale=scale)
    if p.kind == Kind.UPPER:
        o, lse = o.flip(-2), lse.flip(-1)
    return o, lse


def _split_triangle(pset, value, p: Piece, q_off, scale, padding, key_tile):
    """A LOWER or UPPER square as two half-size triangles and the rectangle between them.

    LOWER: the first half of the rows is a triangle of its own; the second half sees the
    first half of the keys fully plus a triangle. UPPER mirrors it: the first half of the
    rows is a triangle plus the rectangle. The merged half is combined by log-sum-exp in
    fp32, as tiles are; the output is fp32.
    """
    h = (p.q1 - p.q0) // 2
    qm, km = p.q0 + h, p.k0 + h
    first = Piece(p.kind, p.q0, qm, p.k0, km, p.pset)
    second = Piece(p.kind, qm, p.q1, km, p.k1, p.pset)
    if p.kind == Kind.LOWER:
        rect, rows = Piece(Kind.FULL, qm, p.q1, p.k0, km, p.pset), (second, first)
    else:
        rect, rows = Piece(Kind.FULL, p.q0, qm, km, p.k1, p.pset), (first, second)
    (ot, lt), (oa, la), (orr, lrr) = (
        _piece_flash_cpu(pset, value, x, q_off, scale, padding, key_tile) for x in (*rows, rect)
    )
    total = torch.logaddexp(lt, lrr)
    merged = torch.mul(ot, (lt - total).exp_()[..., None])  # fp32: the weight promotes bf16
    merged.addcmul_(orr, (lrr - total).exp_()[..., None])
    if p.kind == Kind.LOWER:
        return torch.cat((oa.float(), merged), dim=-2), torch.cat((la, total), dim=-1)
    return torch.cat((merged, oa.float()), dim=-2), torch.cat((total, la), dim=-1)


def _piece_torch(pset, value, p: Piece, q_off, scale, padding, key_tile):
    q, k, v = _slices(pset, value, p, q_off)
    if pset.value is not None:
        padding = None
    bsz, hq, m, d = q.shape
    hkv, s_len = k.shape[1], k.shape[-2]
    g = hq // hkv
    o = torch.empty(bsz, hkv, g, m, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(bsz, hkv, g, m, dtype=torch.float32, device=q.device)
    # Stack the g query heads that share a K/V head as rows: (B, Hkv, g, rows, D).
    qg = q.reshape(bsz, hkv, g, m, d)
    for r0 in range(0, m, key_tile):
        r1 = min(m, r0 + key_tile)
        # Key columns any of these rows can see: LOWER rows see [0, row], UPPER [row, m).
        c_lo = (r0 // key_tile) * key_tile if p.kind == Kind.UPPER else 0
        c_hi = r1 if p.kind == Kind.LOWER else s_len
        o[:, :, :, r0:r1], lse[:, :, :, r0:r1] = _rows_torch(
            qg[:, :, :, r0:r1], k, v, p, r0, c_lo, c_hi, scale, padding, key_tile
        )
    return o.view(bsz, hq, m, -1), lse.view(bsz, hq, m)


def _rows_torch(q, k, v, p: Piece, r0, c_lo, c_hi, scale, padding, key_tile):
    """Online softmax of query rows r0.. of a piece over its key columns [c_lo, c_hi), in fp32."""
    bsz, hkv, g, rows, _ = q.shape
    # Few rows (decoding) take wider key steps: a score tile stays <= key_tile^2 per KV head,
    # and one token against a long cache is a handful of launches, not one per key_tile.
    step = max(key_tile, key_tile * key_tile // (g * rows))
    qf = q.float() * scale
    row = torch.arange(r0, r0 + rows, device=q.device)
    run_max = torch.full((bsz, hkv, g, rows), _NEG, device=q.device)
    run_sum = torch.zeros(bsz, hkv, g, rows, device=q.device)
    run_o = torch.zeros(bsz, hkv, g, rows, v.shape[-1], device=q.device)
    for c0 in range(c_lo, c_hi, step):
        c1 = min(c_hi, c0 + step)
        s = qf @ k[:, :, None, c0:c1].float().transpose(-1, -2)  # (B, Hkv, g, rows, cols)
        if p.kind != Kind.FULL:
            col = torch.arange(c0, c1, device=q.device)
            hide = (
                col[None, :] > row[:, None] if p.kind == Kind.LOWER else col[None, :] < row[:, None]
            )
            s = s.masked_fill(hide, _NEG)
        if padding is not None and padding.touches(p.k0 + c0, p.k0 + c1):
            s = s + padding.additive(p.k0 + c0, p.k0 + c1, torch.float32)[:, :, None]
        new_max = torch.maximum(run_max, s.amax(-1))
        w = torch.exp(s - new_max[..., None])
        corr = torch.exp(run_max - new_max)
        run_sum = run_sum * corr + w.sum(-1)
        run_o = run_o * corr[..., None] + w @ v[:, :, None, c0:c1].float()
        run_max = new_max
    return run_o / run_sum[..., None], run_max + torch.log(run_sum)
