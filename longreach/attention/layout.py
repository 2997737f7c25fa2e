"""Block layouts: which (query, key) pairs attend, and the exact tiles that compute them.

A layout is a list of disjoint :class:`Region` s. A region is the set of pairs

    { (i, j) : q[0] <= i < q[1],  k[0] <= j < k[1],  d[0] <= i - j <= d[1] }

scored with position set ``pset`` (see :mod:`longreach.attention`). ``i`` and ``j`` are
slots of the key tensor the attention function receives (with transformers' dynamic
cache: token indices), so a query at slot ``i`` of a causal model sees ``d = i - j >= 0``.
``None`` means unbounded. Every common pattern is a handful of regions:

- causal: ``Region(d=(0, None))``
- Λ (LM-Infinite, StreamingLLM prefill): ``Region(d=(0, window - 1))`` plus
  ``Region(k=(0, sinks), d=(window, None))`` (the sinks beyond the band, so no pair counts twice)
- Self-Extend: ``Region(d=(0, W - 1))`` plus ``Region(d=(W, None), pset=1)``
- retrieved blocks: ``Region(q=query_block, k=key_block, d=(window, None))`` per block

A model's sliding window w (Mistral, Phi-3, some Qwen2 layers) is one more bound on every
region: ``d <= w - 1`` (:func:`within_window`), so a method's layout and the model's
window combine into regions again.

:func:`plan` turns regions into a :class:`Plan`: query tiles of at most ``block`` rows,
each a list of :class:`Piece` s of three kinds, all computed without any mask:

- ``FULL``  a rectangle where every query sees every key;
- ``LOWER`` a square whose query ``q0 + t`` sees keys ``k0 .. k0 + t`` (the causal diagonal);
- ``UPPER`` a square whose query ``q0 + t`` sees keys ``k0 + t .. k1 - 1`` (the far edge of a
  band; computed as a causal square on reversed rows and keys).

Why this decomposition is exact: for one query row the visible keys of a region are the
interval ``[max(k0, i - d1), min(k1, i - d0 + 1))``. Both ends are non-decreasing in ``i``
and each is either constant or grows by one per row, so the rows split into at most three
runs where each end is one or the other; a run then is a rectangle plus at most one LOWER
and one UPPER square (a band narrower than the run is cut into runs of ``width - 1`` rows).
The work done is the number of visible pairs plus half a square per triangle.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from longreach.errors import LongreachError

__all__ = [
    "AttentionCall",
    "BlockLayout",
    "CausalLayout",
    "Kind",
    "LambdaLayout",
    "Layout",
    "Piece",
    "Plan",
    "Region",
    "RegionLayout",
    "Tile",
    "Work",
    "band_tile_rows",
    "check_disjoint",
    "plan",
    "within_window",
]

_BIG = 1 << 62  # stands for an unbounded end


class Kind(enum.IntEnum):
    FULL = 0
    LOWER = 1
    UPPER = 2


@dataclass(frozen=True)
class Region:
    """Pairs (i, j) with ``q[0] <= i < q[1]``, ``k[0] <= j < k[1]``, ``d[0] <= i - j <= d[1]``.

    ``q`` and ``k`` are half-open slot ranges, ``d`` is a closed range of ``i - j``; ``None``
    is unbounded. ``pset`` picks the (query, key) tensors the pairs are scored with: 0 is
    the model's own, 1.. are the extra position sets a layout supplies.
    """

    q: tuple[int | None, int | None] = (None, None)
    k: tuple[int | None, int | None] = (None, None)
    d: tuple[int | None, int | None] = (0, None)
    pset: int = 0


@dataclass(frozen=True)
class Piece:
    """One exact unmasked attention call: rows [q0, q1) against keys [k0, k1) (slots)."""

    kind: Kind
    q0: int
    q1: int
    k0: int
    k1: int
    pset: int = 0

    @property
    def pairs(self) -> int:
        m, s = self.q1 - self.q0, self.k1 - self.k0
        return m * s if self.kind == Kind.FULL else m * (m + 1) // 2


@dataclass(frozen=True)
class Tile:
    """Query rows [q0, q1) and the pieces whose results are merged into them."""

    q0: int
    q1: int
    pieces: tuple[Piece, ...]

    @property
    def covered(self) -> bool:
        """Whether every row sees at least one key (each piece gives each of its rows one)."""
        spans = sorted((p.q0, p.q1) for p in self.pieces)
        reach = self.q0
        for a, b in spans:
            if a > reach:
                return False
            reach = max(reach, b)
        return reach >= self.q1


@dataclass(frozen=True)
class Plan:
    """The pieces for ``q_len`` queries at slots ``q_offset ..`` against ``kv_len`` keys."""

    q_len: int
    kv_len: int
    q_offset: int
    tiles: tuple[Tile, ...]
    # The regions the plan was compiled from (what a fused backend such as flex attention
    # reads instead of the pieces); empty for a plan assembled from pieces directly.
    regions: tuple[Region, ...] = ()

    @property
    def pairs(self) -> int:
        """Visible (query, key) pairs per head: the useful work."""
        return sum(p.pairs for t in self.tiles for p in t.pieces)

    def flops(self, heads: int, head_dim: int) -> int:
        """Useful FLOPs (QK^T and PV, 2 multiply-adds each) over ``heads`` query heads."""
        return 4 * self.pairs * heads * head_dim

    @property
    def psets(self) -> frozenset[int]:
        return frozenset(p.pset for t in self.tiles for p in t.pieces)


# --------------------------------------------------------------------------- geometry


def _run(out: list[Piece], s0, s1, c0, c1, dlo, dhi, lo_grows, hi_grows, pset) -> None:
    """Pieces for rows [s0, s1) where each end of the visible interval is fixed or grows."""
    if not lo_grows and not hi_grows:  # row sees [c0, c1)
        out.append(Piece(Kind.FULL, s0, s1, c0, c1, pset))
    elif not lo_grows:  # row i sees [c0, i - dlo + 1)
        s0 = max(s0, c0 + dlo)
        if s0 >= s1:
            return
        diag = s0 - dlo  # the first row's last key
        if diag > c0:
            out.append(Piece(Kind.FULL, s0, s1, c0, diag, pset))
        out.append(Piece(Kind.LOWER, s0, s1, diag, diag + s1 - s0, pset))
    elif not hi_grows:  # row i sees [i - dhi, c1)
        s1 = min(s1, c1 + dhi)
        if s0 >= s1:
            return
        first = s0 - dhi
        out.append(Piece(Kind.UPPER, s0, s1, first, first + s1 - s0, pset))
        if s1 - dhi < c1:
            out.append(Piece(Kind.FULL, s0, s1, s1 - dhi, c1, pset))
    else:  # row i sees [i - dhi, i - dlo + 1): a band of constant width
        width = dhi - dlo + 1
        if width == 1:
            for a in range(s0, s1):
                out.append(Piece(Kind.FULL, a, a + 1, a - dhi, a - dhi + 1, pset))
            return
        step = width - 1  # an UPPER and a LOWER square of this many rows never overlap
        for a in range(s0, s1, step):
            b = min(s1, a + step)
            out.append(Piece(Kind.UPPER, a, b, a - dhi, b - dhi, pset))
            if b - dhi < a - dlo:
                out.append(Piece(Kind.FULL, a, b, b - dhi, a - dlo, pset))
            out.append(Piece(Kind.LOWER, a, b, a - dlo, b - dlo, pset))


def _cut(x: int, r0: int, r1: int) -> int:
    """x or x + 1 (equivalent cut rows), preferring one outside the open interval (r0, r1)."""
    return x + 1 if r0 < x and x + 1 >= r1 else x


def region_pieces(region: Region, r0: int, r1: int, kv_len: int) -> list[Piece]:
    """The pieces covering ``region`` restricted to rows [r0, r1) and keys [0, kv_len)."""
    q0, q1 = region.q
    k0, k1 = region.k
    r0 = max(r0, q0 if q0 is not None else r0)
    r1 = min(r1, q1 if q1 is not None else r1)
    c0 = max(0, k0 if k0 is not None else 0)
    c1 = min(kv_len, k1 if k1 is not None else kv_len)
    if r0 >= r1 or c0 >= c1:
        return []
    dlo = region.d[0] if region.d[0] is not None else -_BIG
    dhi = region.d[1] if region.d[1] is not None else _BIG
    # Clamp to the differences this rectangle can hold; this changes no pair.
    dlo = max(dlo, r0 - (c1 - 1))
    dhi = min(dhi, (r1 - 1) - c0)
    if dlo > dhi:
        return []
    # Rows >= lo_from have lower key bound i - dhi (growing), rows < hi_until upper bound
    # i - dlo + 1 (growing). At the row where a bound turns, both forms agree, so that row
    # may join either side: pick the side that avoids a cut.
    lo_from = _cut(c0 + dhi, r0, r1)
    hi_until = _cut(c1 + dlo - 1, r0, r1)
    cuts = sorted({r0, r1, *(x for x in (lo_from, hi_until) if r0 < x < r1)})
    out: list[Piece] = []
    for s0, s1 in zip(cuts, cuts[1:], strict=False):
        _run(out, s0, s1, c0, c1, dlo, dhi, s0 >= lo_from, s0 < hi_until, region.pset)
    return out


def _tidy(pieces: list[Piece]) -> tuple[Piece, ...]:
    """Turn 1x1 triangles into rectangles and join rectangles that share rows and touch."""
    full: dict[tuple[int, int, int], list[Piece]] = {}
    rest: list[Piece] = []
    for p in pieces:
        if p.kind != Kind.FULL and p.q1 - p.q0 == 1:
            p = Piece(Kind.FULL, p.q0, p.q1, p.k0, p.k1, p.pset)
        if p.kind == Kind.FULL:
            full.setdefault((p.q0, p.q1, p.pset), []).append(p)
        else:
            rest.append(p)
    merged: list[Piece] = []
    for group in full.values():
        group.sort(key=lambda p: p.k0)
        cur = group[0]
        for p in group[1:]:
            if p.k0 == cur.k1:
                cur = Piece(Kind.FULL, cur.q0, cur.q1, cur.k0, p.k1, cur.pset)
            else:
                merged.append(cur)
                cur = p
        merged.append(cur)
    return tuple(merged + rest)


def check_disjoint(regions: Sequence[Region], q_range: tuple[int, int], kv_len: int) -> None:
    """Raise ValueError when two regions share a (query, key) pair inside the given ranges."""
    boxes = []
    for r in regions:
        q0 = max(q_range[0], r.q[0] if r.q[0] is not None else q_range[0])
        q1 = min(q_range[1], r.q[1] if r.q[1] is not None else q_range[1])
        k0 = max(0, r.k[0] if r.k[0] is not None else 0)
        k1 = min(kv_len, r.k[1] if r.k[1] is not None else kv_len)
        dlo = r.d[0] if r.d[0] is not None else -_BIG
        dhi = r.d[1] if r.d[1] is not None else _BIG
        if q0 < q1 and k0 < k1 and max(dlo, q0 - k1 + 1) <= min(dhi, q1 - 1 - k0):
            boxes.append((q0, q1, k0, k1, dlo, dhi, r))
    boxes.sort(key=lambda b: b[0])
    for a, x in enumerate(boxes):
        for y in boxes[a + 1 :]:
            if y[0] >= x[1]:
                break  # sorted by first row: no later box shares rows with x
            q0, q1 = y[0], min(x[1], y[1])
            k0, k1 = max(x[2], y[2]), min(x[3], y[3])
            if k0 >= k1:
                continue
            # Every difference in [q0 - k1 + 1, q1 - 1 - k0] occurs in the shared rectangle.
            if max(x[4], y[4], q0 - k1 + 1) <= min(x[5], y[5], q1 - 1 - k0):
                raise ValueError(
                    f"layout regions overlap, so some pairs would count twice: {x[6]} and {y[6]}"
                )


def within_window(regions: Iterable[Region], window: int | None) -> tuple[Region, ...]:
    """``regions`` restricted to pairs closer than ``window`` (``i - j <= window - 1``).

    A sliding-window layer never attends a key ``window`` or more slots before the query;
    that is one more bound on each region's ``d``. Regions left empty are dropped; None
    (no window) changes nothing.
    """
    regions = tuple(regions)
    if window is None:
        return regions
    out = []
    for r in regions:
        hi = window - 1 if r.d[1] is None else min(r.d[1], window - 1)
        if r.d[0] is not None and r.d[0] > hi:
            continue
        out.append(Region(r.q, r.k, (r.d[0], hi), r.pset))
    return tuple(out)


def plan(
    regions: Sequence[Region],
    q_len: int,
    kv_len: int,
    q_offset: int | None = None,
    block: int = 1024,
    check: bool = True,
    coalesce: bool = True,
) -> Plan:
    """Compile ``regions`` into query tiles of at most ``block`` rows (aligned to multiples of it).

    ``q_offset`` is the slot of the first query (default ``kv_len - q_len``: the queries are
    the newest keys). With ``check`` the regions are verified to be disjoint. With
    ``coalesce`` consecutive tiles that are plain causal (a rectangle from a fixed first key
    plus the diagonal triangle) merge into one tile of two pieces: fewer, larger kernel calls,
    with tile memory bounded by the number of queries instead of ``block``.
    """
    if q_offset is None:
        q_offset = kv_len - q_len
    if block < 1:
        raise ValueError(f"block must be a positive number of rows, got {block}")
    if check:
        check_disjoint(regions, (q_offset, q_offset + q_len), kv_len)
    tiles = []
    start, stop = q_offset, q_offset + q_len
    t0 = start
    while t0 < stop:
        t1 = min(stop, (t0 // block + 1) * block)
        pieces: list[Piece] = []
        for region in regions:
            pieces.extend(region_pieces(region, t0, t1, kv_len))
        tiles.append(Tile(t0, t1, _tidy(pieces)))
        t0 = t1
    if coalesce:
        tiles = _coalesce(tiles)
    return Plan(q_len, kv_len, q_offset, tuple(tiles), tuple(regions))


def _causal_shape(tile: Tile) -> tuple[int, int, int] | None:
    """(first key, diagonal offset k0 - q0, pset) if the tile is a rectangle + LOWER triangle."""
    lower = [p for p in tile.pieces if p.kind == Kind.LOWER]
    full = [p for p in tile.pieces if p.kind == Kind.FULL]
    if len(lower) != 1 or len(full) > 1 or len(tile.pieces) != len(lower) + len(full):
        return None
    tri = lower[0]
    if (tri.q0, tri.q1) != (tile.q0, tile.q1):
        return None
    if not full:
        return tri.k0, tri.k0 - tri.q0, tri.pset
    rect = full[0]
    if (rect.q0, rect.q1, rect.k1, rect.pset) != (tile.q0, tile.q1, tri.k0, tri.pset):
        return None
    return rect.k0, tri.k0 - tri.q0, tri.pset


def _coalesce(tiles: list[Tile]) -> list[Tile]:
    out: list[Tile] = []
    shape_of_last = None
    for tile in tiles:
        shape = _causal_shape(tile)
        if shape is not None and shape_of_last is not None:
            first, offset, pset = shape_of_last
            if shape[1:] == (offset, pset) and shape[0] == first and out[-1].q1 == tile.q0:
                q0, q1 = out[-1].q0, tile.q1
                pieces = [Piece(Kind.LOWER, q0, q1, q0 + offset, q1 + offset, pset)]
                if first < q0 + offset:
                    pieces.insert(0, Piece(Kind.FULL, q0, q1, first, q0 + offset, pset))
                out[-1] = Tile(q0, q1, tuple(pieces))
                continue
        out.append(tile)
        shape_of_last = shape
    return out


# --------------------------------------------------------------------------- layouts


@dataclass
class AttentionCall:
    """Everything one attention call sees: what :meth:`Layout.prepare` decides from.

    ``query`` (B, Hq, Lq, D) and ``key``/``value`` (B, Hkv, S, D) are what transformers
    passes (keys and values as the cache's ``update`` returned them); ``q_offset`` is the
    slot of the first query among the keys; ``padding`` a ``KeyPadding`` or None; ``memory``
    the model call's published memory (:mod:`longreach.attention.context`), or None;
    ``window`` the layer's sliding window (keys ``window`` or more slots back are never
    attended), None for full attention.
    """

    module: Any
    layer: int
    query: Any
    key: Any
    value: Any
    q_offset: int
    padding: Any = None
    memory: Any = None
    scale: float | None = None
    window: int | None = None


@dataclass
class Work:
    """One kernel call: a plan, its extra sources, and the query rows it covers.

    ``sources[p - 1]`` feeds the pieces with ``pset = p`` (a
    :class:`~longreach.attention.kernel.PositionSet`, with values of its own when the keys
    are not resident slots). ``rows`` (r0, r1) are the query rows of the call this work
    computes (None: all); the plan and the sources' queries then cover those rows only.
    ``done(output, lse)``, if given, is called with the rows' output and log-sum-exp
    before the next work of the call is prepared: how a memory learns what a chunk saw.
    """

    plan: Plan
    sources: Sequence[Any] = ()
    rows: tuple[int, int] | None = None
    done: Callable[[Any, Any], None] | None = None


class Layout:
    """What a model's attention computes. Subclass and override :meth:`regions`.

    ``block`` is the number of query rows merged at a time (memory per tile is
    ``block x heads x head_dim`` floats; plain causal tiles coalesce). Larger tiles mean
    fewer, larger kernel calls, which is faster on CPU (measured: 1024 -> 4095 rows made a
    Λ layout 1.4x faster at 16k). A layout that scores some regions with other
    positions (``pset >= 1``) also overrides :meth:`position_sets`; one whose regions depend
    on the tensors (retrieval) overrides :meth:`plan_for`.

    On a sliding-window layer the plan also drops every pair ``window`` or more slots
    apart (:meth:`windowed_regions`). ``windows`` says whether :meth:`prepare` honours
    :attr:`AttentionCall.window`; a layout that overrides :meth:`prepare` without doing
    so sets it False, and the attention function then refuses sliding-window layers.
    """

    block: int = 1024
    windows: ClassVar[bool] = True

    def regions(self, q_len: int, kv_len: int, q_offset: int) -> Sequence[Region]:
        raise NotImplementedError

    def windowed_regions(
        self, q_len: int, kv_len: int, q_offset: int, window: int | None
    ) -> Sequence[Region]:
        """:meth:`regions` on a layer with sliding window ``window`` (None: full attention).

        The default bounds every region by ``i - j <= window - 1`` (:func:`within_window`):
        slots are the distances the model's window counts. A layout whose slots are not
        (a cache that evicts) overrides it.
        """
        return within_window(self.regions(q_len, kv_len, q_offset), window)

    def plan(
        self, q_len: int, kv_len: int, q_offset: int | None = None, window: int | None = None
    ) -> Plan:
        """The plan for these sizes; cached when the layout is hashable (a frozen dataclass)."""
        if q_offset is None:
            q_offset = kv_len - q_len
        try:
            return _cached_plan(self, q_len, kv_len, q_offset, window)
        except TypeError:  # unhashable layout
            regions = self.windowed_regions(q_len, kv_len, q_offset, window)
            return plan(regions, q_len, kv_len, q_offset, self.tile_rows())

    def tile_rows(self) -> int:
        """Query rows per tile (``block``; layouts may derive it from their parameters)."""
        return self.block

    def plan_for(self, module, query, key, q_offset: int, window: int | None = None) -> Plan:
        """The plan for one attention call; override to choose regions from the tensors."""
        return self.plan(query.shape[-2], key.shape[-2], q_offset, window)

    def position_sets(self, module, query, key, q_offset: int) -> Sequence:
        """Tensors for ``pset`` 1, 2, ...: a sequence of :class:`~longreach.attention.kernel.PositionSet`."""
        return ()

    def prepare(self, call: AttentionCall) -> Iterable[Work]:
        """The kernel calls for one attention call: the one hook a layout may override whole.

        The default is one :class:`Work` from :meth:`plan_for` and :meth:`position_sets`.
        A memory layout (InfLLM) overrides it: it sees query, key, value, layer and memory,
        and yields one work per execution chunk with sources gathered from the memory. The
        works are consumed lazily, so a chunk's ``done`` runs before the next is prepared.
        """
        return (
            Work(
                self.plan_for(call.module, call.query, call.key, call.q_offset, call.window),
                self.position_sets(call.module, call.query, call.key, call.q_offset),
            ),
        )


MAX_TILE_ROWS = 8192


def band_tile_rows(window: int, limit: int = MAX_TILE_ROWS) -> int:
    """Query rows per tile for a layout with a band ``0 <= i - j < window``.

    A band run of ``window - 1`` rows is one UPPER and one LOWER square (plus a FULL
    rectangle between them); tiles of a multiple of that many rows, aligned to multiples
    of it, cut no run in two, so no tile gets the one-row pieces a fixed tile size leaves
    where a run crosses it. The largest multiple up to ``limit`` rows (or ``limit`` for
    bands wider than that): fewer, larger kernel calls.
    """
    step = max(1, window - 1)
    return limit if step >= limit else step * (limit // step)


@functools.lru_cache(maxsize=64)
def _cached_plan(
    layout: Layout, q_len: int, kv_len: int, q_offset: int, window: int | None = None
) -> Plan:
    regions = layout.windowed_regions(q_len, kv_len, q_offset, window)
    return plan(regions, q_len, kv_len, q_offset, layout.tile_rows())


@dataclass(frozen=True)
class CausalLayout(Layout):
    """Every query sees every earlier key: exact vanilla attention in O(n) memory."""

    block: int = 1024

    def regions(self, q_len: int, kv_len: int, q_offset: int) -> Sequence[Region]:
        return (Region(d=(0, None)),)


@dataclass(frozen=True)
class LambdaLayout(Layout):
    """Λ-shaped attention: the first ``sinks`` keys plus a band of the ``window`` newest keys.

    Query ``i`` sees key ``j`` when ``0 <= i - j < window`` or ``j < sinks`` (and ``j <= i``):
    LM-Infinite's Λ mask (Han et al., 2023, arXiv 2308.16137) and StreamingLLM's attention
    pattern during prefill (Xiao et al., 2023, arXiv 2309.17453). Cost O(n (sinks + window)).
    ``block`` 0 (the default) tiles by ``window - 1`` rows (at most 8192): the largest tile
    whose band is one UPPER, one FULL and one LOWER piece.
    """

    sinks: int = 4
    window: int = 4096
    block: int = 0

    def __post_init__(self) -> None:
        if self.window < 1 or self.sinks < 0:
            raise LongreachError(
                f"the Λ layout needs window >= 1 and sinks >= 0, got window={self.window}, "
                f"sinks={self.sinks}."
            )

    def tile_rows(self) -> int:
        return self.block or max(1, min(MAX_TILE_ROWS, self.window - 1))

    def regions(self, q_len: int, kv_len: int, q_offset: int) -> Sequence[Region]:
        band = Region(d=(0, self.window - 1))
        if self.sinks == 0:
            return (band,)
        return (band, Region(k=(0, self.sinks), d=(self.window, None)))


@dataclass(frozen=True)
class BlockLayout(Layout):
    """Query block ``b`` (slots ``b*block ..``) sees the key blocks ``blocks[b]``, causally.

    Blocks are ``block`` slots wide for queries and keys alike; a query block missing from
    ``blocks`` (or with an empty tuple) sees nothing and gets zeros.
    """

    blocks: tuple[tuple[int, ...], ...] = ()
    block: int = 1024

    def regions(self, q_len: int, kv_len: int, q_offset: int) -> Sequence[Region]:
        out = []
        for qb, kbs in enumerate(self.blocks):
            q = (qb * self.block, (qb + 1) * self.block)
            if q[0] >= q_offset + q_len or q[1] <= q_offset:
                continue
            for run in _runs(sorted(set(kbs))):
                out.append(Region(q=q, k=(run[0] * self.block, (run[1] + 1) * self.block)))
        return out


def _runs(xs: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted integers as (first, last)."""
    runs: list[tuple[int, int]] = []
    for x in xs:
        if runs and x == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], x)
        else:
            runs.append((x, x))
    return runs


@dataclass(frozen=True)
class RegionLayout(Layout):
    """A fixed list of regions (absolute slots); the easiest way to try a new pattern."""

    fixed: tuple[Region, ...] = ()
    block: int = 1024

    def regions(self, q_len: int, kv_len: int, q_offset: int) -> Sequence[Region]:
        return self.fixed
