"""H2O: keep the heavy hitters (the most attended tokens so far) and the recent tokens."""

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
class H2O(EvictionMethod):
    """H2O (Zhang et al., 2023, H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models, arXiv 2306.14048).

    Each token's score is the attention it has received, accumulated over every query that
    saw it (summed over the query heads of its KV head); when a layer holds more than
    ``budget`` tokens it keeps the ``recent`` newest and the best-scored others, per KV
    head. Scores are computed after each call (a prefill chunk or a decoded token) from
    the kernel's exact probabilities: a chunk of C queries against R resident keys costs
    C x R per head, as much as its attention. Decoded tokens are evicted too. Positions:
    kept keys keep their true positions (gaps where tokens left).

    Parameters:
        budget: tokens kept per layer and KV head (default 2048).
        recent: newest tokens always kept (default: half the budget, the paper's split).
        sinks: first tokens always kept (default 0: the paper keeps none apart).
        per_head: choose per KV head (default, the paper's) or once per layer.
    """

    name: ClassVar[str] = "h2o"
    paper: ClassVar[str] = (
        "Zhang et al., 2023, H2O: Heavy-Hitter Oracle for Efficient Generative Inference of "
        "Large Language Models, arXiv 2306.14048"
    )
    summary: ClassVar[str] = "evict to a budget: heavy hitters (accumulated attention) + recent"

    budget: int = param(2048, "tokens kept per layer and KV head")
    recent: int | None = param(None, "newest tokens always kept (default: budget / 2)")
    sinks: int = param(0, "first tokens always kept")
    per_head: bool = param(True, "choose per KV head (else once per layer)")

    def recent_kept(self) -> int:
        return self.budget // 2 if self.recent is None else self.recent

    def observe(
        self, call: AttentionCall, state: EvictingLayer, lse: torch.Tensor, q_offset: int
    ) -> None:
        scale = call.scale if call.scale is not None else call.query.shape[-1] ** -0.5
        rows = range(call.query.shape[-2])
        state.scores += received_attention(call.query, call.key, lse, rows, q_offset, scale)
