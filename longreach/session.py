"""One conversation kept in a model's KV cache, turn after turn: an endless chat.

A :class:`Session` prefills only each new turn (the earlier turns are in its cache) and
decodes greedily. Under a bounded cache policy (``streaming``, ``sirllm``, ``h2o``) the cache
stays the same size however long the conversation runs; with the plain model it grows.

    import longreach as lr
    model, tok = lr.load("smollm2-135m")
    lr.extend(model, "sirllm:budget=2048")
    chat = lr.Session(model, tok)
    print(chat.say("Remember the code word: tangerine."))
    print(chat.say("What was the code word?"), chat.cache_tokens, chat.cache_bytes)

Turns go through the tokenizer's chat template when it has one (``chat=True``, the
default then): each turn's tokens are what the template adds to the conversation so far.
Without a template the transcript is plain text (``User: ...`` / ``Assistant:``), and an
answer ends at a newline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from longreach.errors import LongreachError

__all__ = ["Session"]

_PROBE_USER, _PROBE_REPLY = "\x00user\x00", "\x00reply\x00"


class Session:
    """A conversation with ``model`` (extended or not) that keeps its cache between turns.

    ``chunk``: prefill chunk of a turn; ``max_new_tokens``: answer length limit;
    ``stop_at_eos``: end an answer at the model's end-of-turn token (False: always decode
    ``max_new_tokens``, for measuring); ``chat``: use the chat template (default: when the
    tokenizer has one).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        chunk: int = 1024,
        max_new_tokens: int = 256,
        stop_at_eos: bool = True,
        chat: bool | None = None,
    ) -> None:
        from longreach.methods import active_extensions

        if max_new_tokens < 1 or chunk < 1:
            raise LongreachError("a session needs max_new_tokens >= 1 and chunk >= 1.")
        self.model, self.tokenizer = model, tokenizer
        self.chunk, self.max_new_tokens, self.stop_at_eos = chunk, max_new_tokens, stop_at_eos
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat and not has_template:
            raise LongreachError(
                "this tokenizer has no chat template; start the session with chat=False "
                "(a plain-text transcript)."
            )
        self.chat = has_template if chat is None else chat
        self.extensions = [e for e in active_extensions(model) if e.active]
        self.cache = self._new_cache()
        self.state: Any = None
        self.messages: list[dict[str, str]] = []
        self.seen = 0  # tokens fed to the model
        self.turns = 0
        self._pending: list[int] = []  # decoded but not yet fed (the answer's last token)
        from longreach.bench.runner import _eos_ids

        self.eos = _eos_ids(model, tokenizer)
        if self.chat:
            self._closing = self._template_closing()

    # ---- what the caller reads

    @property
    def cache_tokens(self) -> int:
        """Tokens the cache holds (per layer, the largest)."""
        cache = self.cache if self.state is None else self.state.cache
        resident = getattr(cache, "resident", None)
        if isinstance(resident, list) and resident:
            return max(resident)
        return int(cache.get_seq_length()) if cache is not None else 0

    @property
    def cache_bytes(self) -> int:
        """Bytes of the cache's tensors."""
        cache = self.cache if self.state is None else self.state.cache
        if cache is None:
            return 0
        total = 0
        for layer in getattr(cache, "layers", []):
            for name in ("keys", "values", "positions", "scores"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    # ---- a turn

    def say(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add the user's ``text``, answer greedily and return the answer.

        ``on_text`` receives the answer's text as it grows (each new piece).
        """
        from longreach.prefill import Prefill, advance

        for extension in self.extensions:
            extension.method.new_turn(self.state.cache if self.state is not None else self.cache)
        ids = self._pending + self._turn_tokens(text)
        self._pending = []
        x = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        if self.state is None:
            self.state = Prefill(self.cache, torch.empty(0), 0)
        with torch.inference_mode():
            advance(self.model, self.state, x, self.chunk)
        self.seen += len(ids)
        reply, pieces = [], ""
        with torch.inference_mode():
            for step in range(self.max_new_tokens):
                token = int(self.state.logits[0].argmax())
                if self.stop_at_eos and token in self.eos:
                    self._pending = self._closing_ids(pieces)
                    break
                reply.append(token)
                text_now = self.tokenizer.decode(reply, skip_special_tokens=True)
                if on_text is not None and len(text_now) > len(pieces):
                    on_text(text_now[len(pieces) :])
                pieces = text_now
                if not self.chat and self.stop_at_eos and "\n" in text_now:
                    break
                if step + 1 == self.max_new_tokens:
                    break
                t = torch.tensor([[token]], device=self.model.device)
                advance(self.model, self.state, t, 1)
                self.seen += 1
        if not self._pending:  # the last token was not fed yet
            self._pending = [reply[-1], *self._closing_ids(pieces)] if reply else []
        answer = pieces.split("\n")[0] if not self.chat and self.stop_at_eos else pieces
        self.messages += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": answer},
        ]
        self.turns += 1
        return answer

    # ---- formatting

    def _new_cache(self) -> Any:
        for extension in self.extensions:
            cache = extension.new_cache()
            if cache is not None:
                return cache
        from transformers import DynamicCache

        return DynamicCache()

    def _render(self, messages: list[dict[str, str]], prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt
        )

    def _template_closing(self) -> str:
        """What the template writes after an assistant message's text (e.g. ``<|im_end|>\\n``)."""
        probe = [
            {"role": "user", "content": _PROBE_USER},
            {"role": "assistant", "content": _PROBE_REPLY},
        ]
        text = self._render(probe, False)
        if _PROBE_REPLY not in text:
            raise LongreachError("the chat template does not write the assistant's message back.")
        return text.split(_PROBE_REPLY, 1)[1]

    def _closing_ids(self, text: str) -> list[int]:
        """Tokens that close an answer whose text is ``text``, fed before the next turn."""
        if not self.chat:
            return [] if text.endswith("\n") else self._encode("\n")
        return self._encode(self._closing)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _turn_tokens(self, text: str) -> list[int]:
        if not self.chat:
            return self._encode(f"User: {text}\nAssistant:")
        before = self._render(self.messages, False) if self.messages else ""
        now = self._render([*self.messages, {"role": "user", "content": text}], True)
        if not now.startswith(before):
            raise LongreachError(
                "the chat template rewrites earlier turns when a turn is added, so a kept "
                "conversation cannot follow it; use chat=False."
            )
        # ``before`` ends with the last answer's closing, which was fed after the answer
        return self._encode(now[len(before) :])
