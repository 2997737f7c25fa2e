"""XL3M: run each segment with the question, keep the segments the model is most certain on."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import torch

from longreach import compat
from longreach.methods.base import param
from longreach.methods.reader import (
    Reader,
    Reading,
    count_pieces,
    frame,
    iter_pieces,
    question_of,
    right_padded,
    tokenize_sentences,
    whole_if_fits,
)
from longreach.methods.registry import register

MEASURES = ("logprob", "entropy")


@register
@dataclasses.dataclass
class XL3M(Reader):
    """XL3M (Wang et al., 2024, XL3M: A Training-free Framework for LLM Length Extension Based on Segment-wise Inference, arXiv 2405.17755).

    The context is cut into segments of at most ``segment`` tokens at sentence ends. Each
    segment runs alone with the question after it (one forward, within the trained length),
    and the model's certainty on the question's tokens scores the segment: their mean
    log-probability (``logprob``, default) or minus the mean entropy of its predictions at
    those positions (``entropy``). The most certain segments, up to ``keep`` tokens, are
    spliced in their original order into the key context, and the answer comes from key
    context + question. Memory is one segment's forward whatever the input length. Without
    a question the context's last sentence serves as one (XL3M's rule). A prompt that fits
    ``keep`` is answered as it is.

    Parameters:
        segment: tokens per segment (default: trained length / 8).
        keep: tokens of kept segments (default: what the trained length leaves after the
            question and the answer).
        measure: certainty on the question: logprob or entropy.
        original_max: L, the trained length (default: the model's).
        pad: pad every segment's forward on the right to a multiple of ``pad`` tokens (at
            most the longest, head + segment + tail), so that the runtime sees few shapes
            and memory stays flat over a long read (default 256; 0: each forward has its own
            length). The scores are the same: attention is causal (see
            ``reader.right_padded``).
    """

    name: ClassVar[str] = "xl3m"
    paper: ClassVar[str] = (
        "Wang et al., 2024, XL3M: A Training-free Framework for LLM Length Extension Based on "
        "Segment-wise Inference, arXiv 2405.17755"
    )
    summary: ClassVar[str] = "reader: segments scored by certainty on the question, spliced"

    segment: int | None = param(None, "tokens per segment (default: trained length / 8)")
    keep: int | None = param(None, "tokens of kept segments (default: all that fits)")
    measure: str = param("logprob", "certainty on the question: logprob or entropy")
    original_max: int | None = param(None, "L, the trained length (default: the model's)")
    pad: int = param(256, "round scoring forwards up to a multiple of this (0: off)")

    def validate(self) -> None:
        for name in ("segment", "keep"):
            value = getattr(self, name)
            if value is not None and value < 1:
                self.fail(f"{name} must be a positive number of tokens (got {value}).")
        if self.measure not in MEASURES:
            self.fail(f"measure must be one of {', '.join(MEASURES)} (got {self.measure!r}).")
        if self.pad < 0:
            self.fail(f"pad must be >= 0 tokens (got {self.pad}).")

    def check_model(self, model: torch.nn.Module) -> None:
        length = self.trained_length(model)
        if self.segment is not None and self.segment >= length:
            self.fail(f"segment ({self.segment}) must be shorter than the trained length {length}.")

    def answer(self, model, tokenizer, fmt, parts, max_new_tokens, is_complete=None,
               progress: Callable[[int, int], None] | None = None) -> Reading:  # fmt: skip
        length = self.trained_length(model)
        segment = self.segment if self.segment is not None else max(16, length // 8)
        parts = question_of(parts)
        around = frame(fmt, parts)
        room = length - len(around.head) - len(around.tail) - max_new_tokens
        keep = min(self.keep, room) if self.keep is not None else room
        if room < segment:
            self.fail(
                f"the question and instruction take {len(around.head) + len(around.tail)} "
                f"tokens, which leaves no room for a segment of {segment} in the trained "
                f"length {length}; lower segment."
            )
        whole = whole_if_fits(tokenizer, fmt, parts, len(around.head) + len(around.tail) + keep)
        if whole is not None:  # it fits: the model reads it as it is
            return self.generate(model, tokenizer, whole, max_new_tokens, is_complete)
        sentences = tokenize_sentences(tokenizer, parts.context)
        n_segments = count_pieces(sentences, segment)
        longest = len(around.head) + segment + len(around.tail)
        scores, sizes = [], []
        for i, seg in enumerate(iter_pieces(sentences, segment)):  # one segment held at a time
            ids = [t for s in seg for t in s.ids]
            scores.append(self._certainty(model, around, ids, longest))
            sizes.append(len(ids))
            if progress is not None:
                progress(i + 1, n_segments)
        chosen, total = [], 0
        for i in sorted(range(n_segments), key=lambda i: -scores[i]):
            if total + sizes[i] <= keep:
                chosen.append(i)
                total += sizes[i]
        wanted = set(chosen)  # the kept segments, made again in order
        context = [t for i, seg in enumerate(iter_pieces(sentences, segment)) if i in wanted
                   for s in seg for t in s.ids]  # fmt: skip
        reading = self.generate(model, tokenizer, around.around(context), max_new_tokens,
                                is_complete)  # fmt: skip
        reading.meta.update(segments=n_segments, kept_segments=sorted(chosen))
        return reading

    def _certainty(self, model: torch.nn.Module, around, context: list[int], limit: int) -> float:
        """The certainty on the question after ``context``, the forward padded up to ``limit``."""
        ids = around.around(context)
        n_tail = len(around.tail)
        x, _ = right_padded(ids, self.pad, limit, model.device)
        # the predictions of the question's tokens: positions [m - n_tail - 1, m - 1)
        at = torch.arange(len(ids) - n_tail - 1, len(ids) - 1, device=model.device)
        keep = compat.takes_logits_to_keep(model)
        kwargs = {"logits_to_keep": at} if keep else {}
        with torch.inference_mode():
            logits = model(input_ids=x, use_cache=False, **kwargs).logits[0]
        logits = logits if keep else logits[at]
        logp = torch.log_softmax(logits.float(), dim=-1)  # predictions of the question's tokens
        if self.measure == "entropy":
            return float((logp.exp() * logp).sum(-1).mean())
        targets = torch.tensor(ids[-n_tail:], device=logp.device)
        return float(logp.gather(1, targets[:, None]).mean())
