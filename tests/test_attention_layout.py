"""Layouts compile into pieces that cover each region's pairs exactly once (pure geometry)."""

from __future__ import annotations

import random

import pytest
import torch
from reference import region_map

from longreach.attention import (
    BlockLayout,
    CausalLayout,
    Kind,
    LambdaLayout,
    Piece,
    Region,
    RegionLayout,
    check_disjoint,
    plan,
)
from longreach.attention.layout import region_pieces
from longreach.errors import LongreachError


def coverage(pieces, q_offset: int, q_len: int, kv_len: int) -> torch.Tensor:
    """How many pieces compute each (query, key) pair."""
    count = torch.zeros(q_len, kv_len, dtype=torch.int64)
    for p in pieces:
        rows, cols = slice(p.q0 - q_offset, p.q1 - q_offset), slice(p.k0, p.k1)
        assert 0 <= p.k0 < p.k1 <= kv_len and q_offset <= p.q0 < p.q1 <= q_offset + q_len, p
        if p.kind == Kind.FULL:
            count[rows, cols] += 1
        else:
            m = p.q1 - p.q0
            assert p.k1 - p.k0 == m, f"triangle pieces must be square: {p}"
            tri = torch.ones(m, m, dtype=torch.int64)
            count[rows, cols] += tri.tril() if p.kind == Kind.LOWER else tri.triu()
    return count


def test_random_regions_are_covered_exactly_once():
    rng = random.Random(0)

    def span(n):
        return (rng.choice([None, *range(-3, n + 3)]), rng.choice([None, *range(-3, n + 3)]))

    for _ in range(3000):
        q_len, kv_len = rng.randint(1, 30), rng.randint(1, 30)
        q_offset = rng.randint(0, 10)
        d = (rng.choice([None, rng.randint(-12, 30)]), rng.choice([None, rng.randint(-12, 40)]))
        region = Region(q=span(q_offset + q_len), k=span(kv_len), d=d)
        pieces = region_pieces(region, q_offset, q_offset + q_len, kv_len)
        want = (region_map([region], q_len, kv_len, q_offset) >= 0).long()
        got = coverage(pieces, q_offset, q_len, kv_len)
        assert torch.equal(got, want), (
            f"{region} at offset {q_offset}: pieces {pieces} miss or repeat pairs"
        )


@pytest.mark.parametrize("block", [1, 3, 16, 1024])
@pytest.mark.parametrize("coalesce", [False, True])
@pytest.mark.parametrize(
    "layout_regions",
    [
        (Region(d=(0, None)),),
        LambdaLayout(sinks=4, window=9).regions(0, 0, 0),
        LambdaLayout(sinks=0, window=1).regions(0, 0, 0),
        (Region(d=(0, 6)), Region(d=(7, None), pset=1)),
        (Region(k=(3, None), d=(0, None)), Region(k=(0, 3), d=(0, None), pset=1)),
    ],
)
def test_plans_cover_layouts_exactly_once(block, coalesce, layout_regions):
    for q_len, kv_len in [(1, 1), (1, 40), (23, 23), (17, 40)]:
        q_offset = kv_len - q_len
        p = plan(layout_regions, q_len, kv_len, q_offset, block=block, coalesce=coalesce)
        pieces = [x for t in p.tiles for x in t.pieces]
        want = region_map(layout_regions, q_len, kv_len, q_offset)
        got = coverage(pieces, q_offset, q_len, kv_len)
        assert torch.equal(got, (want >= 0).long()), (
            f"block {block}, {q_len}x{kv_len}: wrong coverage"
        )
        assert p.pairs == int((want >= 0).sum()), (
            f"plan.pairs {p.pairs} != visible pairs {(want >= 0).sum()}"
        )
        for t in p.tiles:
            for x in t.pieces:
                assert t.q0 <= x.q0 < x.q1 <= t.q1, f"piece {x} leaves its tile {t.q0}..{t.q1}"
            if not coalesce:
                assert t.q1 - t.q0 <= block, f"tile {t.q0}..{t.q1} is longer than block {block}"


def test_causal_plan_coalesces_to_one_call_per_chunk():
    tiled = plan((Region(),), 4096, 4096, 0, 1024, coalesce=False)
    kinds = [sorted(x.kind.name for x in t.pieces) for t in tiled.tiles]
    assert kinds == [["LOWER"]] + [["FULL", "LOWER"]] * 3, f"unexpected causal pieces {kinds}"
    one_shot = CausalLayout(block=1024).plan(4096, 4096)
    assert [t.pieces for t in one_shot.tiles] == [(Piece(Kind.LOWER, 0, 4096, 0, 4096),)], one_shot
    chunk = CausalLayout(block=1024).plan(2048, 6000)  # a prefill chunk after 3952 cached tokens
    want = (Piece(Kind.FULL, 3952, 6000, 0, 3952), Piece(Kind.LOWER, 3952, 6000, 3952, 6000))
    assert [t.pieces for t in chunk.tiles] == [want], chunk


def test_lambda_plan_computes_only_visible_pairs():
    n, sinks, window = 65536, 4, 4096
    layout = LambdaLayout(sinks=sinks, window=window)
    block = layout.tile_rows()
    assert block == window - 1, f"Λ tiles should default to window - 1 rows, got {block}"
    p = layout.plan(n, n)
    want = sum(min(i + 1, window) + max(0, min(sinks, i - window + 1)) for i in range(n))
    assert p.pairs == want, f"Λ plan covers {p.pairs} pairs, expected {want}"
    steady = {sorted(x.kind.name for x in t.pieces).__repr__() for t in p.tiles[2:-1]}
    assert steady == {"['FULL', 'LOWER', 'UPPER']"}, (
        f"Λ tiles past the window should be sinks + UPPER + LOWER, got {steady}"
    )


def test_decode_step_is_one_call():
    p = CausalLayout().plan(1, 5000)
    (tile,) = p.tiles
    assert [(x.kind, x.k0, x.k1) for x in tile.pieces] == [(Kind.FULL, 0, 5000)], tile.pieces


def test_block_layout_sees_listed_blocks_causally():
    layout = BlockLayout(blocks=((0,), (0, 1), (0, 2), (1, 3)), block=4)
    want = region_map(layout.regions(16, 16, 0), 16, 16, 0) >= 0
    i, j = torch.arange(16)[:, None], torch.arange(16)[None, :]
    listed = torch.zeros(16, 16, dtype=torch.bool)
    for qb, kbs in enumerate(layout.blocks):
        for kb in kbs:
            listed[qb * 4 : qb * 4 + 4, kb * 4 : kb * 4 + 4] = True
    assert torch.equal(want, listed & (j <= i)), "BlockLayout regions differ from the listed blocks"
    assert len(layout.regions(16, 16, 0)) == 6, (
        "consecutive key blocks should merge into one region"
    )


def test_overlapping_regions_are_rejected():
    with pytest.raises(ValueError, match="overlap"):
        check_disjoint([Region(d=(0, 10)), Region(k=(0, 4), d=(5, None))], (0, 100), 100)
    check_disjoint([Region(d=(0, 10)), Region(k=(0, 4), d=(11, None))], (0, 100), 100)
    with pytest.raises(ValueError, match="overlap"):
        RegionLayout(fixed=(Region(), Region(q=(3, 4)))).plan(8, 8)


def test_lambda_layout_validates():
    with pytest.raises(LongreachError, match="window"):
        LambdaLayout(window=0)
