"""The model side of the server: tokenizing, prefill, decoding with sampling, logprobs, sessions.

One :class:`Engine` owns the model with its method applied for the server's lifetime. Its
calls run on the server's single model worker thread, never concurrently.

Decoding reuses the library's own loop: the prompt goes through :func:`longreach.prefill`
(chunked) and every chosen token through :func:`longreach.prefill.advance`; with
``temperature`` 0 the chosen token is the argmax, exactly what :func:`longreach.greedy` and
the bench runner choose. With a temperature the logits are divided by it, cut to the
smallest set whose probability reaches ``top_p`` and sampled from a generator seeded by
``seed`` (the same seed gives the same text). Logprobs are those of the model's own
distribution (before temperature and ``top_p``), as vLLM reports them by default.

Sessions keep a conversation's KV cache between requests, keyed by ``session_id``: a request
whose prompt starts with everything the kept cache holds feeds only the new tokens. This is
offered only for methods whose cache is a bounded policy (StreamingLLM's sinks + window), so
a kept conversation costs constant memory; at most ``max_sessions`` are kept, the least
recently used is dropped first.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from longreach import compat
from longreach.bench.runner import _eos_ids
from longreach.prefill import Prefill, advance, prefill

log = logging.getLogger(__name__)

__all__ = ["Cancelled", "Choice", "Delta", "Engine", "Params", "TokenInfo", "held_back"]


class Cancelled(Exception):
    """The client went away; the generation stopped."""


@dataclass
class Params:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's and the top k


@dataclass
class TokenInfo:
    id: int
    text: str
    logprob: float | None = None
    top: list[tuple[str, float]] | None = None  # (token text, logprob), best first


@dataclass
class Choice:
    text: str
    token_ids: list[int]
    tokens: list[TokenInfo]  # with logprobs when asked
    finish_reason: str  # "stop" or "length"
    stop_reason: str | None = None
    cached_tokens: int = 0  # prompt tokens taken from a kept session cache
    prefill_s: float = 0.0
    decode_s: float = 0.0


@dataclass
class Delta:
    """What a stream sends after one decoded token: new text (possibly empty) and the token."""

    text: str
    tokens: list[TokenInfo]
    finish_reason: str | None = None
    stop_reason: str | None = None


def held_back(text: str, stops: list[str]) -> str:
    """The part of ``text`` safe to stream: without a trailing incomplete UTF-8 character and
    without a suffix that may be the start of a stop string."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[end - k : end] == stop[:k]:
                end -= k
                break
    return text[:end]


@dataclass
class _Kept:
    ids: list[int]
    state: Prefill


class Engine:
    """A loaded model with its method, ready to tokenize, score and generate."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_model_len: int,
        chunk: int = 1024,
        chat_template: str | None = None,
        sessions: bool = False,
        max_sessions: int = 16,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.chunk = chunk
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.sessions_enabled = sessions
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, _Kept] = OrderedDict()
        self._lock = threading.Lock()
        self.vocab_size = int(getattr(model.config, "vocab_size", 0) or len(tokenizer))
        self.eos_ids = _eos_ids(model, tokenizer)

    # ---- text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(
            self.tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
        )

    def offsets(self, text: str, add_special_tokens: bool = True) -> list[list[int]] | None:
        """Character (start, end) of each token, when the tokenizer reports them."""
        try:
            enc = self.tokenizer(
                text,
                add_special_tokens=add_special_tokens,
                return_offsets_mapping=True,
                verbose=False,
            )
        except (NotImplementedError, ValueError):
            return None
        return [[int(s), int(e)] for s, e in enc["offset_mapping"]]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=self.chat_template,
        )

    # ---- scoring

    def prompt_logprobs(self, ids: list[int], top: int) -> list[TokenInfo]:
        """Each prompt token with its logprob given the tokens before it (None for the first)."""
        infos = [TokenInfo(ids[0], self.token_text(ids[0]))]
        cache = None
        device = self.model.device
        with torch.inference_mode():
            for start in range(0, len(ids) - 1, self.chunk):
                part = ids[start : start + self.chunk]
                x = torch.tensor([part], dtype=torch.long, device=device)
                kwargs = compat.forward_kwargs(self.model, cache, start, len(part), device)
                out = self.model(input_ids=x, use_cache=True, **kwargs)
                cache = compat.output_cache(out)
                logp = torch.log_softmax(out.logits[0].float(), dim=-1)
                for j in range(len(part)):
                    target = start + j + 1
                    if target >= len(ids):
                        break
                    infos.append(self._info(ids[target], logp[j], top))
        return infos

    def _info(self, token: int, logp: torch.Tensor, top: int | None) -> TokenInfo:
        info = TokenInfo(token, self.token_text(token), float(logp[token]))
        if top:
            values, indices = logp.topk(min(top, logp.shape[-1]))
            info.top = [
                (self.token_text(int(i)), float(v))
                for v, i in zip(values.tolist(), indices.tolist(), strict=True)
            ]
        return info

    # ---- generation

    def generate(
        self,
        ids: list[int],
        params: Params,
        *,
        on_delta: Callable[[Delta], None] | None = None,
        cancelled: threading.Event | None = None,
        session_id: str | None = None,
    ) -> Choice:
        """Decode one choice after ``ids``; ``on_delta`` gets every token as it comes."""
        if params.max_tokens == 0:
            choice = Choice("", [], [], "length")
            if on_delta is not None:
                on_delta(Delta("", [], "length"))
            return choice
        t0 = time.perf_counter()
        with torch.inference_mode():
            state, cached = self._start(ids, session_id)
        prefill_s = time.perf_counter() - t0
        generator = torch.Generator(device="cpu")
        generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        generated: list[int] = []
        infos: list[TokenInfo] = []
        emitted = ""
        finish: str | None = None
        stop_reason: str | None = None
        text = ""
        t1 = time.perf_counter()
        try:
            with torch.inference_mode():
                while True:
                    if cancelled is not None and cancelled.is_set():
                        raise Cancelled
                    logits = state.logits[0]
                    token = _choose(logits, params, generator)
                    generated.append(token)
                    info = None
                    if params.logprobs is not None:
                        info = self._info(token, torch.log_softmax(logits, -1), params.logprobs)
                        infos.append(info)
                    if token in self.eos_ids:
                        finish = "stop"
                    text = self.decode(generated)
                    hit = _first_stop(text, params.stop)
                    if hit is not None:
                        text, stop_reason, finish = text[: hit[0]], hit[1], "stop"
                    if finish is None and len(generated) >= params.max_tokens:
                        finish = "length"
                    if on_delta is not None:
                        safe = text if finish else held_back(text, params.stop)
                        delta = safe[len(emitted) :] if safe.startswith(emitted) else ""
                        emitted = emitted + delta
                        token_info = info if info is not None else TokenInfo(token, "")
                        on_delta(Delta(delta, [token_info], finish, stop_reason))
                    if finish is not None:
                        break
                    advance(self.model, state, _tensor([token], self.model.device))
        except BaseException:
            self._forget(session_id)
            raise
        if session_id is not None:
            self._keep(session_id, ids + generated[:-1], state)
        return Choice(
            text=text,
            token_ids=generated,
            tokens=infos,
            finish_reason=finish,
            stop_reason=stop_reason,
            cached_tokens=cached,
            prefill_s=prefill_s,
            decode_s=time.perf_counter() - t1,
        )

    def _start(self, ids: list[int], session_id: str | None) -> tuple[Prefill, int]:
        kept = self._take(session_id)
        if kept is not None:
            k = len(kept.ids)
            if len(ids) > k and ids[:k] == kept.ids:
                state = advance(
                    self.model, kept.state, _tensor(ids[k:], self.model.device), self.chunk
                )
                return state, k
            log.info(
                "session %s: the prompt does not extend the kept cache; starting afresh", session_id
            )
        return prefill(self.model, _tensor(ids, self.model.device), chunk=self.chunk), 0

    # ---- sessions

    def _take(self, session_id: str | None) -> _Kept | None:
        if session_id is None:
            return None
        with self._lock:
            return self._sessions.pop(session_id, None)

    def _keep(self, session_id: str, ids: list[int], state: Prefill) -> None:
        with self._lock:
            self._sessions[session_id] = _Kept(ids, state)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)

    def _forget(self, session_id: str | None) -> None:
        if session_id is not None:
            with self._lock:
                self._sessions.pop(session_id, None)

    @property
    def session_count(self) -> int:
        return len(self._sessions)


def _tensor(ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([ids], dtype=torch.long, device=device)


def _choose(logits: torch.Tensor, params: Params, generator: torch.Generator) -> int:
    if params.temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs
        sorted_probs[before >= params.top_p] = 0.0  # the best token always stays
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for stop in stops:
        at = text.find(stop)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, stop)
    return best
