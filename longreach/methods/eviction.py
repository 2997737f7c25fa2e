"""The shared plumbing of KV-cache eviction policies that compress *while* reading.

A policy is a :class:`EvictionMethod` dataclass in its own file: its parameters, a
paper-citing docstring, and a short scoring rule (:meth:`EvictionMethod.observe`). The
base does the rest:

- the cache is an :class:`~longreach.memory.evicting.EvictingCache`; every model call
  (a prefill chunk, a decoded token) appends its tokens, and right after each layer's
  attention the policy scores the layer's resident tokens and, when more than ``budget``
  are resident, keeps ``budget`` of them: the ``sinks`` first, the ``recent`` last, and
  the best-scored in between (per KV head with ``per_head``, else one choice shared by the
  heads). The kept tokens move into new, smaller tensors: memory is freed before the next
  chunk arrives, so a chunked prefill of n tokens holds at most ``budget + chunk`` tokens
  per layer, whatever n is;
- attention runs on the block kernel with a causal rule over the cache's slots (each query
  sees what the cache kept plus the earlier tokens of its own call), and the kernel's
  log-sum-exp gives the exact attention probabilities a score needs, computed for the
  rows a policy asks for against the resident keys only (never an n x n matrix);
- ``budget`` at least the input's length evicts nothing: the model's own attention.

Positions: evicted tokens leave gaps, and the kept keys keep the rotation of their true
positions (new tokens continue at their true positions), as H2O and SnapKV do; a policy
that keeps positions inside the cache says so (``cache_positions``) and the cache then
re-rotates its keys by slot.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch

from longreach.attention import hf
from longreach.attention.layout import AttentionCall, Layout, Region, Work, plan
from longreach.errors import LongreachError
from longreach.memory.evicting import EvictingCache, EvictingLayer
from longreach.methods.base import ATTENTION, CACHE, Method, Patch

__all__ = ["EvictionLayout", "EvictionMethod", "received_attention"]

_KEY_TILE = 1024
_ROW_TILE = 256


def received_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    lse: torch.Tensor,
    rows: range,
    q_offset: int,
    scale: float,
) -> torch.Tensor:
    """Attention each resident key received from the query ``rows`` of a call: (Hkv, S) fp32.

    ``query`` (1, Hq, q, D), ``key`` (1, Hkv, S, D) with the call's queries at slots
    ``q_offset ..``, ``lse`` (1, Hq, q) the kernel's log-sum-exp. A pair counts when the
    key slot is at most the query's (causal over slots); probabilities are summed over the
    rows and over the query heads of each KV head. Work: rows x S per head, in key tiles.
    """
    hq, dim = query.shape[1], query.shape[-1]
    hkv, s_len = key.shape[1], key.shape[-2]
    total = torch.zeros(hkv, s_len, device=key.device)
    # tiles of _ROW_TILE rows x _KEY_TILE keys: the transient is a few MiB, not rows x keys
    for r0 in range(rows.start, rows.stop, _ROW_TILE):
        r1 = min(rows.stop, r0 + _ROW_TILE)
        q = query[0, :, r0:r1].reshape(hkv, hq // hkv, r1 - r0, dim)
        rows_lse = lse[0, :, r0:r1].reshape(hkv, hq // hkv, r1 - r0, 1)
        row_slot = torch.arange(q_offset + r0, q_offset + r1, device=key.device)[:, None]
        for c0 in range(0, min(s_len, q_offset + r1), _KEY_TILE):
            c1 = min(s_len, c0 + _KEY_TILE)
            k = key[0, :, c0:c1]
            logits = torch.matmul(q, k[:, None].transpose(-1, -2)).float() * scale
            seen = torch.arange(c0, c1, device=key.device)[None, :] <= row_slot
            p = logits.sub_(rows_lse).exp_().masked_fill_(~seen, 0.0)
            total[:, c0:c1] += p.sum((1, 2))
    return total


@functools.lru_cache(maxsize=512)
def _plan(regions: tuple[Region, ...], q_len: int, kv_len: int, q_offset: int):
    # decoding asks for the same few plans at every token
    return plan(regions, q_len, kv_len, q_offset, block=max(1024, q_len), check=False)


@dataclasses.dataclass(frozen=True)
class EvictionLayout(Layout):
    """Causal attention over the cache's slots, then the policy's scoring and eviction."""

    windows: ClassVar[bool] = False  # prepare() plans its own regions, no sliding window

    method: Any = dataclasses.field(default=None, compare=False, hash=False)

    def prepare(self, call: AttentionCall) -> Iterator[Work]:
        if call.query.shape[0] != 1:
            raise LongreachError(
                f"{self.method.name} keeps one sequence per cache, got a batch of "
                f"{call.query.shape[0]}; run the sequences one by one."
            )
        q_len, kv_len = call.query.shape[-2], call.key.shape[-2]
        q_offset = kv_len - q_len  # the call's tokens are the newest slots
        regions = tuple(self.method.layer_regions(call.layer))
        work_plan = _plan(regions, q_len, kv_len, q_offset)
        memory = call.memory
        if not isinstance(memory, EvictingCache) or (
            q_len == 1 and not self.method.evict_while_decoding
        ):  # no cache, or a decoded token the policy keeps: nothing to score or evict
            return iter([Work(work_plan)])
        state = memory.layer(call.layer)

        def done(out: torch.Tensor, lse: torch.Tensor) -> None:
            self.method.observe(call, state, lse, q_offset)
            self.method.evict(state, q_len)

        return iter([Work(work_plan, (), None, done)])


@dataclasses.dataclass
class EvictionMethod(Method):
    """Base of the eviction policies: keep ``budget`` tokens per layer (see the module docstring).

    Subclasses set ``name``, ``paper``, ``summary``, their parameters (``budget`` among
    them: the tokens kept per layer), and
    override :meth:`observe` (update ``state.scores`` from a call's attention) and, when
    the rule needs it, :meth:`priority` (the score the choice ranks by) or
    :meth:`layer_regions`.
    """

    touches: ClassVar[frozenset[str]] = frozenset({ATTENTION, CACHE})
    # Whether decoded tokens are evicted too (H2O, SirLLM) or only a prompt's (SnapKV).
    evict_while_decoding: ClassVar[bool] = True
    cache_positions: ClassVar[bool] = False

    # ---- what subclasses define

    def sinks_kept(self) -> int:
        return int(getattr(self, "sinks", 0))

    def recent_kept(self) -> int:
        return int(getattr(self, "recent", 0) or 0)

    def layer_regions(self, layer: int) -> Sequence[Region]:
        return (Region(d=(0, None)),)

    def observe(
        self, call: AttentionCall, state: EvictingLayer, lse: torch.Tensor, q_offset: int
    ) -> None:
        """Update ``state.scores`` (Hkv, R) after a call's attention (default: nothing)."""

    def priority(self, state: EvictingLayer) -> torch.Tensor:
        """(Hkv, R) the ranking of the resident slots: higher is kept (default: the scores)."""
        return state.scores

    # ---- shared

    def validate(self) -> None:
        if self.budget < 1:
            self.fail(f"budget must be a positive number of tokens (got {self.budget}).")
        sinks, recent = self.sinks_kept(), self.recent_kept()
        if sinks < 0 or recent < 0:
            self.fail(f"sinks and recent must be >= 0 tokens (got {sinks} and {recent}).")
        if sinks + recent > self.budget:
            self.fail(
                f"sinks + recent ({sinks} + {recent}) must not exceed the budget ({self.budget})."
            )

    def resident_tokens(self, model: torch.nn.Module, tokens: int, chunk: int | None) -> int:
        return tokens if not chunk else min(tokens, self.budget + chunk)

    def evict(self, state: EvictingLayer, q_len: int) -> None:
        """Keep ``budget`` of the layer's resident tokens when it holds more."""
        resident = state.resident
        if resident <= self.budget or (q_len == 1 and not self.evict_while_decoding):
            return
        state.keep(self.choose(state))

    def choose(self, state: EvictingLayer) -> torch.Tensor:
        """The slots kept: (Hkv, budget) per KV head, or (budget,) shared, in slot order."""
        resident = state.resident
        sinks, recent = self.sinks_kept(), self.recent_kept()
        middle = self.budget - sinks - recent
        device = state.keys.device
        head = torch.arange(sinks, device=device)
        tail = torch.arange(resident - recent, resident, device=device)
        score = self.priority(state)[:, sinks : resident - recent]
        if not getattr(self, "per_head", False):
            score = score.sum(0, keepdim=True)
        picked = score.topk(middle, dim=-1).indices.sort(-1).values + sinks
        rows = picked.shape[0]
        index = torch.cat([head.expand(rows, -1), picked, tail.expand(rows, -1)], dim=-1)
        return index[0] if rows == 1 else index

    def check_model(self, model: torch.nn.Module) -> None:
        if not hf.attention_modules(model):
            self.fail(f"{type(model).__name__} has no attention modules that longreach recognises.")

    def rotary(self, model: torch.nn.Module) -> torch.nn.Module | None:
        if not self.cache_positions:
            return None
        from longreach.methods.windowed import rotary_module

        return rotary_module(model, self.name)

    def new_cache(self, model: torch.nn.Module) -> EvictingCache:
        return EvictingCache(
            layers=model.config.num_hidden_layers, method=self.name, rotary=self.rotary(model)
        )

    def install(self, model: torch.nn.Module, patch: Patch) -> None:
        handle = hf.use(model, EvictionLayout(method=self))
        patch.on_undo(handle.restore)
        patch.cache_policy(model, lambda: self.new_cache(model))
        patch.publish_cache(
            model, EvictingCache,
            f"{self.name} keeps one unpadded sequence per cache; drop the padding (or run the "
            "rows one by one).",
        )  # fmt: skip
