"""Chunked prefill: run a long input through a model ``chunk`` tokens at a time.

One forward pass over n tokens holds activations for all n (the MLP alone is
n x intermediate floats per layer, and the LM head n x vocab). Feeding the input in
chunks of C tokens with the KV cache gives the same cache and the same last logits,
with activations bounded by C; only the cache grows with n. The LM head runs on the
last position only (``logits_to_keep=1``).

That holds for methods whose computation depends on the whole input's length, too
(dynamic NTK rescales RoPE with it): :func:`prefill` and :func:`advance` announce the
length the input will have once fed (:func:`planned_length`), and such a method reads
it (:func:`current_planned_length`) instead of the length seen so far. A loop of your
own that feeds one input in several forward calls wraps them in
``with planned_length(n):`` for the same result; without it, dynamic NTK rotates each
chunk's keys with the scale of the length reached by that chunk, a different function
(max |Δ logit| 6.7e-4 against one forward on a tiny Llama at 600 tokens in chunks of
128; yarn, which does not depend on the length, 3e-8). Decoding is a
new length per token (the method's own rule), not part of the input.

Attention cost depends on the attention implementation: with transformers' ``sdpa`` a
chunk that follows a cache needs a (C x n) boolean mask and SDPA's masked path; under
``longreach.attention.use(model, layout)`` each chunk runs the block kernel with no mask
at all, so memory stays O(n) and a Λ layout costs O(n x window).

Decoding after a prefill: :func:`greedy` continues from the returned state, and
:func:`advance` feeds any further tokens (one decoded token, or a conversation's next
turn); with
``model.generate`` prefill all but the last token and pass the cache in.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from longreach import compat
from longreach.errors import LongreachError

__all__ = [
    "Prefill",
    "advance",
    "current_planned_length",
    "greedy",
    "planned_length",
    "prefill",
    "score",
]

_PLANNED: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "longreach_planned_length", default=None
)


@contextmanager
def planned_length(n: int) -> Iterator[None]:
    """Declare that the forward calls inside feed one input that ends at ``n`` positions.

    Methods whose computation depends on the input's length (dynamic NTK) then use ``n``
    rather than the length the calls have reached, so the calls compute what one forward
    over the whole input computes. Nested declarations keep the largest length.
    Thread-local (a context variable): a server's workers never see each other's.
    """
    outer = _PLANNED.get()
    token = _PLANNED.set(n if outer is None else max(n, outer))
    try:
        yield
    finally:
        _PLANNED.reset(token)


def current_planned_length() -> int | None:
    """The length declared by the innermost :func:`planned_length`, or None outside one."""
    return _PLANNED.get()


@dataclass
class Prefill:
    """The state after a prefill: the cache, the last position's logits and what decoding needs."""

    cache: Any
    logits: torch.Tensor  # (B, vocab), fp32, of the last input position
    length: int  # tokens in the cache
    attention_mask: torch.Tensor | None = None  # (B, length) when the input had padding
    next_position: torch.Tensor | None = None  # (B,) position id of the next token


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # What generate() uses for padded batches: count real tokens, padding gets position 1.
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def _forward(model, ids, cache, past, attention_mask=None, position_ids=None, keep=1):
    # The logits of the last ``keep`` positions (0: all), and the cache.
    kwargs = compat.forward_kwargs(
        model, cache, past_length=past, query_length=ids.shape[1], device=ids.device
    )
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
        kwargs["position_ids"] = position_ids
    if compat.takes_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    out = model(input_ids=ids, use_cache=True, **kwargs)
    logits = out.logits[:, -1].float() if keep == 1 else out.logits[:, -keep:].float()
    return logits, compat.output_cache(out)


def prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    chunk: int = 1024,
    *,
    attention_mask: torch.Tensor | None = None,
    cache: Any = None,
    past: int = 0,
) -> Prefill:
    """Fill ``model``'s KV cache with ``input_ids`` (B, n), ``chunk`` tokens per forward.

    ``attention_mask`` (B, n) marks real tokens (left padding for batches); positions then
    follow generate()'s rule. ``cache`` may be a cache object to fill (e.g. a method's
    cache policy); by default the model creates its dynamic cache. ``past`` is the number
    of tokens ``cache`` already holds (a reused prompt prefix): the input continues after
    them. Runs without gradients.
    """
    if past:
        if cache is None or attention_mask is not None:
            raise LongreachError(
                "prefill after past tokens needs the cache that holds them, and no padding."
            )
        return advance(model, Prefill(cache, torch.empty(0), past), input_ids, chunk)
    if chunk < 1:
        raise LongreachError(f"prefill chunk must be a positive number of tokens, got {chunk}.")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise LongreachError(
            f"prefill needs input_ids of shape (batch, tokens) with at least one token, "
            f"got {tuple(input_ids.shape)}."
        )
    n = input_ids.shape[1]
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    positions = _positions(attention_mask) if attention_mask is not None else None
    total = n if positions is None else int(positions[:, -1].max()) + 1
    logits = None
    with torch.no_grad(), planned_length(total):
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            logits, cache = _forward(
                model,
                input_ids[:, start:stop],
                cache,
                start,
                None if attention_mask is None else attention_mask[:, :stop],
                None if positions is None else positions[:, start:stop],
            )
    next_position = None if positions is None else positions[:, -1] + 1
    return Prefill(cache, logits, n, attention_mask, next_position)


def advance(
    model: torch.nn.Module, state: Prefill, tokens: torch.Tensor, chunk: int = 1024
) -> Prefill:
    """Feed ``tokens`` (B, k) after what ``state`` holds, ``chunk`` tokens per forward.

    ``state`` is advanced in place (cache, last logits, length, mask and positions) and
    returned: the next token of a decoding loop, or the new turn of a kept conversation.
    Chunks of one call compute what one forward over all ``tokens`` computes.
    """
    if chunk < 1:
        raise LongreachError(f"prefill chunk must be a positive number of tokens, got {chunk}.")
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise LongreachError(
            f"advance needs tokens of shape (batch, tokens) with at least one token, "
            f"got {tuple(tokens.shape)}."
        )
    k_all = tokens.shape[1]
    if state.attention_mask is None:
        total = state.length + k_all
    else:
        total = int(state.next_position.max()) + k_all
    with torch.no_grad(), planned_length(total):
        for start in range(0, tokens.shape[1], chunk):
            part = tokens[:, start : start + chunk]
            k = part.shape[1]
            mask = positions = None
            if state.attention_mask is not None:
                ones = state.attention_mask.new_ones(state.attention_mask.shape[0], k)
                state.attention_mask = torch.cat([state.attention_mask, ones], dim=1)
                steps = torch.arange(k, device=state.next_position.device)
                mask, positions = state.attention_mask, state.next_position[:, None] + steps
                state.next_position = state.next_position + k
            state.logits, state.cache = _forward(
                model, part, state.cache, state.length, mask, positions
            )
            state.length += k
    return state


def score(model: torch.nn.Module, state: Prefill, tokens: torch.Tensor) -> torch.Tensor:
    """The logits (B, k, vocab), fp32, at every position of ``tokens`` (B, k) fed after ``state``.

    One forward pass (activations grow with k, so keep k to what is scored); ``state`` is
    advanced in place, as :func:`advance` does. For perplexity: prefill the context, then
    score the continuation.
    """
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise LongreachError(
            f"score needs tokens of shape (batch, tokens) with at least one token, "
            f"got {tuple(tokens.shape)}."
        )
    if state.attention_mask is not None:
        raise LongreachError("score needs a state without padding.")
    with torch.no_grad():
        logits, state.cache = _forward(model, tokens, state.cache, state.length, keep=0)
    state.length += tokens.shape[1]
    state.logits = logits[:, -1]
    return logits


def greedy(
    model: torch.nn.Module,
    state: Prefill,
    max_new_tokens: int,
    eos_token_id: int | Collection[int] | None = None,
    *,
    stop: Callable[[torch.Tensor], bool] | None = None,
) -> torch.Tensor:
    """Greedy decoding from a :class:`Prefill`; returns the new tokens (B, <= max_new_tokens).

    Stops early when every row has produced one of the ``eos_token_id`` ids, or when
    ``stop`` (given the tokens so far, (B, t)) returns True. ``state`` is advanced in place:
    the last token returned is not fed, so ``state.length`` counts the prompt and all but
    the last new token.
    """
    eos = None
    if eos_token_id is not None:
        ids = [eos_token_id] if isinstance(eos_token_id, int) else sorted(eos_token_id)
        eos = torch.tensor(ids, dtype=torch.long, device=state.logits.device) if ids else None
    tokens = []
    done = None
    for _ in range(max_new_tokens):
        token = state.logits.argmax(-1, keepdim=True)  # (B, 1)
        tokens.append(token)
        if eos is not None:
            ended = torch.isin(token[:, 0], eos)
            done = ended if done is None else done | ended
            if bool(done.all()):
                break
        if len(tokens) == max_new_tokens:
            break
        if stop is not None and stop(torch.cat(tokens, dim=1)):
            break
        advance(model, state, token)
    return torch.cat(tokens, dim=1)
