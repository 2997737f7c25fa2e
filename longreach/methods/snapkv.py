"""SnapKV: the last queries of each chunk vote for the keys to keep, pooled over neighbours."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from longreach.attention.layout import AttentionCall
from longreach.memory.evicting import EvictingLayer
from longreach.methods.base import param
from longreach.methods.eviction import EvictionMethod, received_attention
from longreach.methods.registry import register


@register
@dataclasses.dataclass
class SnapKV(EvictionMethod):
    """SnapKV (Li et al., 2024, SnapKV: LLM Knows What You are Looking for Before Generation, arXiv 2404.14469).

    After each prefill chunk, the chunk's last ``window`` queries (the observation window)
    score every resident key by the attention they give it (summed over the window and over
    the query heads of each KV head); the scores are max-pooled over ``kernel`` neighbouring
    slots so that a kept token brings its context, and each KV head keeps the ``window``
    newest tokens plus the best-pooled others, ``budget`` in all. The paper compresses a
    prompt once after its prefill; here every chunk is compressed before the next arrives
    (scores from that chunk's window, not accumulated), so the memory is bounded while
    reading. Decoded tokens are not evicted (as in the paper: the cache grows by the
    answer). Pooling runs over the cache's slot order. Positions: true positions.

    Parameters:
        budget: tokens kept per layer and KV head (default 2048).
        window: observation window, the newest tokens, always kept (default 64, kvpress's).
        kernel: max-pooling width over neighbouring slots (default 5).
        sinks: first tokens always kept (default 0).
        per_head: choose per KV head (default, the paper's) or once per layer.
    """

    name: ClassVar[str] = "snapkv"
    paper: ClassVar[str] = (
        "Li et al., 2024, SnapKV: LLM Knows What You are Looking for Before Generation, "
        "arXiv 2404.14469"
    )
    summary: ClassVar[str] = "evict to a budget per chunk: observation-window votes, pooled"
    evict_while_decoding: ClassVar[bool] = False

    budget: int = param(2048, "tokens kept per layer and KV head")
    window: int = param(64, "observation window: the newest queries vote, their tokens stay")
    kernel: int = param(5, "max-pooling width over neighbouring slots (odd)")
    sinks: int = param(0, "first tokens always kept")
    per_head: bool = param(True, "choose per KV head (else once per layer)")

    def validate(self) -> None:
        if self.window < 1:
            self.fail(f"window must be >= 1 query (got {self.window}).")
        if self.kernel < 1 or self.kernel % 2 == 0:
            self.fail(f"kernel must be a positive odd width (got {self.kernel}).")
        super().validate()

    def recent_kept(self) -> int:
        return self.window

    def observe(
        self, call: AttentionCall, state: EvictingLayer, lse: torch.Tensor, q_offset: int
    ) -> None:
        q_len = call.query.shape[-2]
        if state.resident <= self.budget:
            return  # nothing will be chosen: skip the scores
        scale = call.scale if call.scale is not None else call.query.shape[-1] ** -0.5
        rows = range(max(0, q_len - self.window), q_len)
        votes = received_attention(call.query, call.key, lse, rows, q_offset, scale)
        cut = state.resident - self.window  # the window stays: pool the votes before it
        if self.kernel > 1 and cut > 0:
            pooled = torch.nn.functional.max_pool1d(
                votes[:, None, :cut], self.kernel, stride=1, padding=self.kernel // 2
            )[:, 0]
            votes = torch.cat([pooled, votes[:, cut:]], dim=1)
        state.scores = votes
