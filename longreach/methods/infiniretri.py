"""InfiniRetri: the model's own attention from the question picks the sentences to keep."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch

from longreach.attention import hf
from longreach.attention.layout import AttentionCall, Layout, Region, Work, plan
from longreach.methods.base import param
from longreach.methods.reader import (
    Reader,
    Reading,
    Sentence,
    count_pieces,
    frame,
    iter_pieces,
    question_of,
    right_padded,
    tokenize_sentences,
    whole_if_fits,
)
from longreach.methods.registry import register


class _Scored(Exception):
    """Raised once the scoring layer's attention has run: the rest of the forward is skipped."""


def _stop_forward(module: torch.nn.Module, args: Any, output: Any) -> None:
    raise _Scored


@dataclasses.dataclass(frozen=True)
class _QuestionAttention(Layout):
    """Causal attention that also records what each of the ``rows`` queries before the last
    ``pad`` gave each key (summed over heads), over the keys before the padding."""

    windows: ClassVar[bool] = False  # prepare() plans its own regions, no sliding window

    rows: int = 1
    pad: int = 0
    sink: Any = dataclasses.field(default=None, compare=False, hash=False)

    def prepare(self, call: AttentionCall) -> Iterator[Work]:
        q_len, kv_len = call.query.shape[-2], call.key.shape[-2]
        q_offset = kv_len - q_len
        work_plan = plan((Region(d=(0, None)),), q_len, kv_len, q_offset, block=max(1024, q_len))
        scale = call.scale if call.scale is not None else call.query.shape[-1] ** -0.5

        def done(out: torch.Tensor, lse: torch.Tensor) -> None:
            r1 = q_len - self.pad
            r0 = max(0, r1 - self.rows)
            q = call.query[0, :, r0:r1]  # (Hq, r, D): only the question's rows
            hq, hkv = q.shape[0], call.key.shape[1]
            k = call.key[0].repeat_interleave(hq // hkv, dim=0)  # (Hq, S, D)
            logits = torch.matmul(q, k.transpose(-1, -2)).float() * scale
            p = (logits - lse[0, :, r0:r1, None]).exp_()
            slots = torch.arange(kv_len, device=p.device)
            rows = torch.arange(q_offset + r0, q_offset + r1, device=p.device)
            p = p.masked_fill_(slots[None, None, :] > rows[None, :, None], 0.0)
            # (r, S'): each question row's attention, over heads; S' = the keys before the pad
            self.sink.append(p.sum(0)[:, : q_offset + r1])

        yield Work(work_plan, (), None, done)


@register
@dataclasses.dataclass
class InfiniRetri(Reader):
    """InfiniRetri (Ye et al., 2025, Infinite Retrieval: Attention Enhanced LLMs in Long-Context Processing, arXiv 2502.12962).

    The context is read in chunks of at most ``chunk`` tokens cut at sentence ends. Each
    chunk is fed after the sentences cached so far and before the question. At layer
    ``layer`` each question token's attention over the context (summed over heads) is
    smoothed by a 1-D convolution of width ``window`` over neighbouring tokens; the rows are
    summed, each weighted by w_q^2, where w_q is the attention that question token gives
    the question's own tokens, measured at the first step and kept (``question_weight``;
    off: every row weighs 1). The sentences holding the ``topk`` best-scored tokens become
    the cache (at most ``cache`` tokens, best first, kept in reading order). What is cached
    is token ids, not KV: memory is one chunk's forward whatever the input length. The
    answer comes from the last step's prompt: cache, last chunk, question. Only the
    question's rows of attention are computed (question x context), at one layer. A prompt
    that fits one chunk is answered as it is (the model's own answer).

    The defaults follow the authors' code (the ``infini-retri`` package 0.0.3 on PyPI, by
    the first author): chunks of 1024 tokens (``window_length``), ``topk=300``, a
    convolution of 8 tokens (``phrase_token_num``), question weights on
    (``use_question_weight``, score method 3), and the question here is the prompt's tail
    after the context (question, answer prefix and chat template). Departures: the chunk
    is at most half the trained length (the authors ran 32k-token models); the cache is
    bounded by ``cache`` tokens (their cache is every sentence holding a top-k token,
    unbounded), so that every forward fits the trained length; and the scoring layer is
    two thirds of the way up (layer 20 of SmolLM2's 30), not the authors' last. On
    SmolLM2-135M, passkey in the PG essays at 32k tokens, one sample at each of three
    depths, the key was kept and found in 0/3 cells at the last layer (29) and at layer 10,
    2/3 at 15, 3/3 at 20 and 0/3 at 25 (docs/readers.md, "Which layer scores"). A
    scoring forward stops after its layer's attention: the layers above change nothing the
    scores read, so a lower layer is also cheaper (21 of 30 layers run).

    Parameters:
        chunk: context tokens read per step (default: 1024, at most trained length / 2).
        cache: tokens of kept sentences (default: trained length / 4).
        topk: best-scored tokens whose sentences are kept (default 300).
        window: width of the smoothing convolution (default 8).
        layer: the layer whose attention scores (default: two thirds of the way up,
            ``2 * layers // 3``; -1 is the last, the authors' choice).
        question_weight: weigh each question token by its attention to the question,
            squared (default true).
        original_max: L, the trained length (default: the model's).
        pad: pad every scoring forward on the right to a multiple of ``pad`` tokens (at
            most the longest prompt, head + cache + chunk + tail), so that the runtime sees
            few shapes and memory stays flat over a long read (default 256; 0: each forward
            has its own length). The scores are the same: attention is causal (see
            ``reader.right_padded``).
    """

    name: ClassVar[str] = "infiniretri"
    paper: ClassVar[str] = (
        "Ye et al., 2025, Infinite Retrieval: Attention Enhanced LLMs in Long-Context "
        "Processing, arXiv 2502.12962"
    )
    summary: ClassVar[str] = "reader: chunks + the question's attention keep sentences (ids)"

    chunk: int | None = param(None, "context tokens per step (default: 1024, at most L / 2)")
    cache: int | None = param(None, "tokens of kept sentences (default: trained length / 4)")
    topk: int = param(300, "best-scored tokens whose sentences are kept")
    window: int = param(8, "width of the smoothing convolution")
    layer: int | None = param(None, "layer whose attention scores (default: 2/3 up; -1: the last)")
    question_weight: bool = param(True, "weigh question tokens by their attention to the question")
    original_max: int | None = param(None, "L, the trained length (default: the model's)")
    pad: int = param(256, "round scoring forwards up to a multiple of this (0: off)")

    def validate(self) -> None:
        for name in ("chunk", "cache"):
            value = getattr(self, name)
            if value is not None and value < 1:
                self.fail(f"{name} must be a positive number of tokens (got {value}).")
        if self.topk < 1:
            self.fail(f"topk must be >= 1 token (got {self.topk}).")
        if self.window < 1:
            self.fail(f"window must be >= 1 token (got {self.window}).")
        if self.pad < 0:
            self.fail(f"pad must be >= 0 tokens (got {self.pad}).")

    def sizes(self, model: torch.nn.Module) -> tuple[int, int]:
        length = self.trained_length(model)
        chunk = self.chunk if self.chunk is not None else min(1024, length // 2)
        cache = self.cache if self.cache is not None else length // 4
        if chunk + cache > length:
            self.fail(
                f"chunk + cache ({chunk} + {cache}) must fit the trained length {length}, with "
                "room for the question."
            )
        return chunk, cache

    def check_model(self, model: torch.nn.Module) -> None:
        self.sizes(model)
        layers = model.config.num_hidden_layers
        if self.layer is not None and not -layers <= self.layer < layers:
            self.fail(f"layer {self.layer} does not exist: the model has {layers} layers.")
        if not hf.attention_modules(model):
            self.fail(f"{type(model).__name__} gives no attention rows longreach can read.")

    def answer(self, model, tokenizer, fmt, parts, max_new_tokens, is_complete=None,
               progress: Callable[[int, int], None] | None = None) -> Reading:  # fmt: skip
        chunk, cache_size = self.sizes(model)
        parts = question_of(parts)
        whole = whole_if_fits(tokenizer, fmt, parts, chunk + cache_size)
        if whole is not None:  # it fits: the model reads it as it is
            return self.generate(model, tokenizer, whole, max_new_tokens, is_complete)
        around = frame(fmt, parts)
        room = self.trained_length(model) - len(around.head) - len(around.tail) - max_new_tokens
        if room < chunk + cache_size:
            self.fail(
                f"the question and instruction take {len(around.head) + len(around.tail)} "
                f"tokens: chunk + cache ({chunk} + {cache_size}) leave no room in the trained "
                f"length {self.trained_length(model)}; lower chunk or cache."
            )
        sentences = tokenize_sentences(tokenizer, parts.context)
        steps = count_pieces(sentences, chunk)
        layer = self.scoring_layer(model)
        kept: list[Sentence] = []
        read = 0
        weights = None  # the question rows' weights, measured at the first step
        longest = len(around.head) + cache_size + chunk + len(around.tail)
        for i, piece in enumerate(iter_pieces(sentences, chunk)):  # one piece held at a time
            context = [*kept, *piece]
            ids = around.around([t for s in context for t in s.ids])
            if i == steps - 1:
                reading = self.generate(model, tokenizer, ids, max_new_tokens, is_complete)
                reading.meta.update(steps=steps, read_tokens=read + len(ids),
                                    kept_sentences=[s.index for s in kept])  # fmt: skip
                return reading
            kept, weights = self._keep(model, ids, around, context, layer, cache_size, weights,
                                       longest)  # fmt: skip
            read += len(ids)
            if progress is not None:
                progress(i + 1, steps)
        raise AssertionError("unreachable: the last step answers")

    def scoring_layer(self, model: torch.nn.Module) -> int:
        """The index of the layer whose attention scores: ``layer``, or 2/3 of the way up."""
        layers = model.config.num_hidden_layers
        return 2 * layers // 3 if self.layer is None else self.layer % layers

    def _keep(self, model, ids, around, context: list[Sentence], layer: int, size: int,
              weights: torch.Tensor | None, longest: int
              ) -> tuple[list[Sentence], torch.Tensor]:  # fmt: skip
        sink: list[torch.Tensor] = []
        x, pad = right_padded(ids, self.pad, longest, model.device)
        layout = _QuestionAttention(rows=len(around.tail), pad=pad, sink=sink)
        # the layers above ``layer`` change nothing the scores read: the forward stops there
        # (so it never reaches the LM head)
        scorer = next(m for m in hf.attention_modules(model) if m.layer_idx == layer)
        stop = scorer.register_forward_hook(_stop_forward)
        try:
            with hf.use(model, layout, layers=[layer]), torch.inference_mode():
                model(input_ids=x, use_cache=False)
        except _Scored:
            pass
        finally:
            stop.remove()
        c0 = len(around.head)
        c1 = len(ids) - len(around.tail)
        rows = sink[-1].float()  # (question rows, slots)
        if weights is None:
            weights = rows[:, c1:].sum(-1) if self.question_weight else torch.ones(len(rows))
        # the convolution is linear: weighting the rows, summing, then smoothing is the same
        # as smoothing each row first (the authors' order)
        scores = (weights.square()[:, None] * rows[:, c0:c1]).sum(0)
        if self.window > 1:
            kernel = torch.ones(1, 1, self.window, device=scores.device)
            scores = torch.nn.functional.conv1d(
                scores[None, None], kernel, padding=self.window // 2
            )[0, 0, : c1 - c0]
        owner = torch.tensor([j for j, s in enumerate(context) for _ in s.ids])
        best: dict[int, float] = {}
        for t in scores.topk(min(self.topk, scores.numel())).indices.tolist():
            j = int(owner[t])
            best[j] = max(best.get(j, float("-inf")), float(scores[t]))
        chosen, total = [], 0
        for j in sorted(best, key=lambda j: -best[j]):
            if total + len(context[j].ids) <= size:
                chosen.append(j)
                total += len(context[j].ids)
        return [context[j] for j in sorted(chosen)], weights
