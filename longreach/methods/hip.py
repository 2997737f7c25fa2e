"""HiP attention: a hierarchical top-k search picks the key blocks each query chunk attends."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import ClassVar

import torch

from longreach.attention import hf
from longreach.attention.kernel import PositionSet, gather_rows
from longreach.attention.layout import (
    AttentionCall,
    Kind,
    Layout,
    Piece,
    Plan,
    Region,
    Tile,
    Work,
    _tidy,
    plan,
)
from longreach.methods.base import ATTENTION, Method, Patch, param
from longreach.methods.registry import register


def search(scores_of, n_blocks: int, k: int, heads: int, device) -> torch.Tensor:
    """HiP's hierarchical top-k over ``n_blocks`` key blocks: (heads, min(k, n_blocks)) sorted.

    Start from ``2k`` equal spans of blocks; score each span by its centre token
    (``scores_of(token_index (heads, m)) -> (heads, m)``); keep the best ``k`` per head; halve
    every kept span of more than one block; repeat until every kept span is one block.
    """
    if n_blocks <= k:
        return torch.arange(n_blocks, device=device).expand(heads, -1)
    m = min(2 * k, n_blocks)
    edges = torch.div(torch.arange(m + 1, device=device) * n_blocks, m, rounding_mode="floor")
    lo = edges[:-1].expand(heads, -1).contiguous()
    hi = edges[1:].expand(heads, -1).contiguous()
    while True:
        score = scores_of(lo, hi)  # (heads, m)
        keep = score.topk(min(k, score.shape[1]), dim=-1).indices
        lo, hi = lo.gather(1, keep), hi.gather(1, keep)
        if bool(((hi - lo) <= 1).all()):
            return lo.sort(-1).values
        mid = torch.div(lo + hi + 1, 2, rounding_mode="floor")
        split = (hi - lo) > 1
        # a span of one block stays whole (its second half is empty and never wins)
        lo, hi = (
            torch.cat([lo, torch.where(split, mid, hi)], 1),
            torch.cat([torch.where(split, mid, hi), hi], 1),
        )
        empty = lo >= hi
        lo, hi = lo.masked_fill(empty, 0), hi.masked_fill(empty, 0)


@dataclasses.dataclass(frozen=True)
class HiPLayout(Layout):
    """The attention rule of HiP for one layer (see :class:`HiP`)."""

    windows: ClassVar[bool] = False  # prepare() plans its own regions, no sliding window

    k: int = 32
    block: int = 64
    sinks: int = 16
    window: int = 1024
    chunk: int = 256
    dense_layers: int = 0

    def prepare(self, call: AttentionCall) -> Iterator[Work]:
        q_len, kv_len = call.query.shape[-2], call.key.shape[-2]
        if call.layer < self.dense_layers:
            yield Work(plan((Region(d=(0, None)),), q_len, kv_len, call.q_offset,
                            block=max(1024, q_len), check=False))  # fmt: skip
            return
        for r0 in range(0, q_len, self.chunk):
            r1 = min(q_len, r0 + self.chunk)
            yield self._chunk(call, r0, r1)

    def candidates(self, s: int) -> tuple[int, int]:
        """(number of key blocks to search, first key of the always-seen gap) for a chunk at ``s``."""
        far_end = max(self.sinks, s - self.window + 1)  # keys every query of the chunk sees far
        n_blocks = (far_end - self.sinks) // self.block
        return n_blocks, self.sinks + n_blocks * self.block

    def _chunk(self, call: AttentionCall, r0: int, r1: int) -> Work:
        key, value = call.key, call.value
        s, e = call.q_offset + r0, call.q_offset + r1  # slots (= positions: a plain cache)
        kv_len = key.shape[-2]
        n_blocks, gap = self.candidates(s)
        # Query i of the chunk sees its window (distance < window) and every key from ``gap``
        # on that is farther: together, all of [gap, i]. So the chunk's keys are the sinks,
        # the chosen blocks and [gap, s) for every query, plus the causal square [s, e):
        # one gathered piece and one triangle (two kernel calls instead of seven pieces).
        query = call.query[:, :, r0:r1]
        sources = []
        if n_blocks == 0:  # nothing to search: every earlier key is seen
            pieces = [Piece(Kind.FULL, s, e, 0, s, 0)] if s > 0 else []
        else:
            chosen = self.choose(query, key, n_blocks)  # (Hkv, kept)
            offsets = torch.arange(self.block, device=key.device)
            blocks = (self.sinks + chosen[..., None] * self.block + offsets).flatten(1)
            heads = blocks.shape[0]
            sinks = torch.arange(self.sinks, device=key.device).expand(heads, -1)
            near = torch.arange(gap, s, device=key.device).expand(heads, -1)
            tokens = torch.cat([sinks, blocks, near], 1)
            staged_k, staged_v = gather_rows(key, tokens), gather_rows(value, tokens)
            pieces = [Piece(Kind.FULL, s, e, 0, staged_k.shape[-2], 1)]
            sources.append(PositionSet(query, staged_k, 0, staged_v))
        pieces.append(Piece(Kind.LOWER, s, e, s, e, 0))
        work_plan = Plan(r1 - r0, kv_len, s, (Tile(s, e, _tidy(pieces)),))
        return Work(work_plan, sources, (r0, r1))

    def choose(self, query: torch.Tensor, key: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """Each KV head's key blocks for a query chunk: centre tokens scored by the chunk's
        queries (the best query of the chunk, summed over the query heads of the KV head)."""
        hq, hkv = query.shape[1], key.shape[1]
        q = query[0].float().view(hkv, hq // hkv, query.shape[-2], -1)  # (Hkv, g, r, D)

        def scores_of(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
            centre = self.sinks + torch.div((lo + hi) * self.block, 2, rounding_mode="floor")
            centre = torch.minimum(
                centre, torch.full_like(centre, self.sinks + n_blocks * self.block - 1)
            )
            # gather the centre keys first, then widen them: converting the whole cache to
            # fp32 for every query chunk cost more than the attention at 64k
            k = gather_rows(key[:1], centre)[0].float()  # (Hkv, m, D)
            dots = torch.einsum("hgrd,hmd->hgrm", q, k)
            score = dots.amax(2).sum(1)  # best query, summed over the group
            return score.masked_fill(hi <= lo, float("-inf"))

        return search(scores_of, n_blocks, self.k, hkv, key.device)


@register
@dataclasses.dataclass
class HiP(Method):
    """HiP attention (Lee et al., 2024, A Training-free Sub-quadratic Cost Transformer Model Serving Framework With Hierarchically Pruned Attention, arXiv 2406.09827).

    Each chunk of ``chunk`` queries attends exactly to: the ``sinks`` first keys, a local
    ``window`` of the newest keys, the keys between the searched range and the window (fewer
    than ``chunk + block``), and ``k`` key blocks of ``block`` tokens found by a hierarchical
    top-k search per KV head. The search splits the older keys into ``2k`` spans, scores each
    span by its centre token against the chunk's queries (the best query, summed over the
    query heads of the KV head), keeps the best ``k``, halves them and repeats until the spans
    are single blocks: O(log n) rounds of 2k scores, so the prefill costs O(n log n) instead
    of O(n^2). Every key stays reachable; keys keep their true positions. The first
    ``dense_layers`` layers run full attention. With ``k`` at least the number of key
    blocks, every key is attended: dense attention.

    The defaults are set for CPU kernels (query chunks of 256 rather than the paper's small
    GPU blocks); they are not the reference code's, which is under a non-commercial licence
    and was not read.

    Parameters:
        k: key blocks kept per query chunk and KV head (default 32).
        block: tokens per key block (default 64).
        sinks: first tokens always attended (default 16).
        window: newest tokens always attended (default 1024).
        chunk: queries sharing one search (default 256).
        dense_layers: first layers with full attention (default 0).
    """

    name: ClassVar[str] = "hip"
    paper: ClassVar[str] = (
        "Lee et al., 2024, A Training-free Sub-quadratic Cost Transformer Model Serving "
        "Framework With Hierarchically Pruned Attention, arXiv 2406.09827"
    )
    summary: ClassVar[str] = "hierarchical top-k block search: O(n log n) exact sparse attention"
    touches: ClassVar[frozenset[str]] = frozenset({ATTENTION})

    k: int = param(32, "key blocks kept per query chunk and KV head")
    block: int = param(64, "tokens per key block")
    sinks: int = param(16, "first tokens always attended")
    window: int = param(1024, "newest tokens always attended")
    chunk: int = param(256, "queries sharing one search")
    dense_layers: int = param(0, "first layers with full attention")

    def validate(self) -> None:
        for name in ("k", "block", "window", "chunk"):
            if getattr(self, name) < 1:
                self.fail(f"{name} must be >= 1 (got {getattr(self, name)}).")
        if self.sinks < 0 or self.dense_layers < 0:
            self.fail("sinks and dense_layers must be >= 0.")

    def check_model(self, model: torch.nn.Module) -> None:
        if not hf.attention_modules(model):
            self.fail(f"{type(model).__name__} has no attention modules that longreach recognises.")

    def layout(self) -> HiPLayout:
        return HiPLayout(self.k, self.block, self.sinks, self.window, self.chunk, self.dense_layers)

    def install(self, model: torch.nn.Module, patch: Patch) -> None:
        handle = hf.use(model, self.layout())
        patch.on_undo(handle.restore)


__all__ = ["HiP", "HiPLayout", "search"]
