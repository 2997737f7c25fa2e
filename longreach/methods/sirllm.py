"""SirLLM: keep the tokens the model found most surprising, plus the first and the newest."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from longreach import compat
from longreach.errors import LongreachError
from longreach.memory.evicting import EvictingCache, EvictingLayer
from longreach.methods.base import Patch, param
from longreach.methods.eviction import EvictionMethod
from longreach.methods.registry import register

_HEAD_ROWS = 64  # LM-head rows per step when scoring a chunk's tokens (64 x vocab fp32)


@register
@dataclasses.dataclass
class SirLLM(EvictionMethod):
    """SirLLM (Yao et al., 2024, SirLLM: Streaming Infinite Retentive LLM, arXiv 2405.12528).

    A token's score is its surprisal, ``-log p(token | what came before)``, read from the
    logits the model computes anyway (the LM head is also applied to every position of a
    prefill chunk, a chunk x vocabulary product); the first token of a sequence scores
    highest. After each call, when more than ``budget`` tokens are held, every layer keeps
    the same tokens: the ``sinks`` first, the ``recent`` newest and the most surprising
    others. :meth:`new_turn` (called by :class:`longreach.Session` at each user turn)
    multiplies the stored scores by ``decay``, so old key tokens slowly give way.
    Positions are StreamingLLM's, inside the cache (the authors' ``pos_shift``): keys are
    cached un-rotated and rotated by their slot, queries sit at the next slots, so a
    position never exceeds ``budget + chunk - 1``; keep that within the trained length.

    Parameters:
        budget: tokens kept (default 1024).
        sinks: first tokens always kept (default 4, the authors' start size).
        recent: newest tokens always kept (default: half of budget - sinks, the authors'
            1000 + 1000 split).
        decay: factor applied to the stored scores at each new turn (default 1: no decay).
    """

    name: ClassVar[str] = "sirllm"
    paper: ClassVar[str] = (
        "Yao et al., 2024, SirLLM: Streaming Infinite Retentive LLM, arXiv 2405.12528"
    )
    summary: ClassVar[str] = "evict to a budget: most surprising tokens + sinks + recent"
    cache_positions: ClassVar[bool] = True

    budget: int = param(1024, "tokens kept")
    sinks: int = param(4, "first tokens always kept")
    recent: int | None = param(None, "newest tokens always kept (default: (budget - sinks) / 2)")
    decay: float = param(1.0, "score factor at each new turn (1: none)")

    def validate(self) -> None:
        if not 0.0 <= self.decay <= 1.0:
            self.fail(f"decay must be between 0 and 1 (got {self.decay}).")
        super().validate()

    def recent_kept(self) -> int:
        return (self.budget - self.sinks) // 2 if self.recent is None else self.recent

    def check_model(self, model: torch.nn.Module) -> None:
        super().check_model(model)
        self.rotary(model)
        length = self.trained_length(model)
        if self.budget > length:
            self.fail(
                f"budget ({self.budget}) must not exceed the trained length {length}: positions "
                "inside the cache would leave the trained range."
            )
        if model.get_output_embeddings() is None:
            self.fail(f"{type(model).__name__} has no output embeddings to score tokens with.")

    def evict(self, state: EvictingLayer, q_len: int) -> None:
        return None  # after the whole call, once the logits exist (see install)

    def new_turn(self, cache: Any) -> None:
        """Multiply every stored score by ``decay``: a new dialogue turn begins."""
        if not isinstance(cache, EvictingCache) or self.decay == 1.0:
            return
        for layer in cache.layers:
            if layer.scores is not None:
                layer.scores.mul_(self.decay)

    def install(self, model: torch.nn.Module, patch: Patch) -> None:
        super().install(model, patch)
        key = compat.cache_kwarg(model)
        head = model.get_output_embeddings()
        calls: list[dict[str, Any]] = []

        def before(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            cache = kwargs.get(key)
            if not isinstance(cache, EvictingCache):
                return None
            ids = kwargs.get("input_ids")
            if ids is None and args:
                ids = args[0]
            if ids is None:
                raise LongreachError(
                    "sirllm scores tokens, so it needs input_ids (not embeddings)."
                )
            past = cache.layer(0).resident
            count = ids.shape[1]
            kwargs["position_ids"] = torch.arange(past, past + count, device=ids.device)[None]
            calls.append({"cache": cache, "ids": ids, "hidden": None})
            return args, kwargs

        def hidden(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if calls and calls[-1]["hidden"] is None:
                state = output[0] if isinstance(output, tuple) else output.last_hidden_state
                calls[-1]["hidden"] = state

        def after(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not calls or calls[-1]["cache"] is not kwargs.get(key):
                return
            call = calls.pop()
            if call["hidden"] is None:
                return
            self._score_and_evict(call["cache"], head, call["ids"], call["hidden"])

        def forget(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if calls and calls[-1]["cache"] is kwargs.get(key) and output is None:
                calls.pop()

        patch.forward_pre_hook(model, before)
        h1 = model.get_decoder().register_forward_hook(hidden)
        h2 = model.register_forward_hook(after, with_kwargs=True)
        patch.on_undo(h1.remove)
        patch.on_undo(h2.remove)
        del forget

    def _score_and_evict(
        self, cache: EvictingCache, head: torch.nn.Module, ids: torch.Tensor, hidden: torch.Tensor
    ) -> None:
        count = ids.shape[1]
        scores = torch.empty(count, device=hidden.device)
        last = cache.extra.get("last_logprobs")
        scores[0] = float("inf") if last is None else -last[ids[0, 0]]
        with torch.no_grad():
            for r0 in range(0, count, _HEAD_ROWS):
                r1 = min(count, r0 + _HEAD_ROWS)
                logits = head(hidden[0, r0:r1]).float()  # (rows, vocab)
                norm = torch.logsumexp(logits, dim=-1)  # -log p = norm - logit, no second copy
                if r1 == count:
                    cache.extra["last_logprobs"] = logits[-1] - norm[-1]
                    logits, norm = logits[:-1], norm[:-1]
                targets = ids[0, r0 + 1 : r0 + 1 + logits.shape[0]]
                picked = logits.gather(1, targets[:, None])[:, 0]
                scores[r0 + 1 : r0 + 1 + targets.shape[0]] = norm - picked
        for layer in cache.layers:
            layer.scores[:, -count:] = scores
        first = cache.layer(0)
        if first.resident <= self.budget:
            return
        index = self.choose(first)
        for layer in cache.layers:
            layer.keep(index)
