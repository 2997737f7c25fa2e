"""Readers: methods that take over the whole read and answer of a long input.

A reader never shows the model more than fits in its trained length. It reads the context
in pieces, keeps what the model itself finds relevant to the question and answers from
that (InfiniRetri, XL3M). It patches nothing: ``longreach.extend`` installs nothing for it,
and the bench, seeing the ``reader`` trait, calls :meth:`Reader.answer` with the sample's
parts instead of prefilling the prompt. ``longreach.read`` is the Python entry point.

Shared here: sentence splitting (deterministic; each sentence keeps its trailing
whitespace, so the sentences joined give the context back exactly), the tokens of a
context as the concatenation of its sentences' tokens, pieces of at most ``n`` tokens cut
at sentence ends (a longer sentence is cut into token runs; no token is dropped or
repeated), and greedy answering from a rendered prompt.
"""

from __future__ import annotations

import array
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from longreach.errors import LongreachError
from longreach.methods.base import Method, Patch

__all__ = [
    "Reader", "Reading", "Sentence", "Sentences", "count_pieces", "iter_pieces", "pieces", "read",
    "split_sentences",
]  # fmt: skip

# A sentence ends at . ! ? (with closing quotes or brackets) followed by whitespace, or at a
# line break; the whitespace stays with the sentence it ends.
_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n+")


@dataclass
class Sentence:
    """A sentence's text, its tokens and its index in the context."""

    index: int
    text: str
    ids: list[int]


@dataclass
class Reading:
    """What a reader answered and how: the answer text and the reader's own measurements."""

    text: str
    new_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)
    prompt_ids: list[int] = field(default_factory=list)  # the prompt the answer came from


def _sentence_ends(text: str) -> Iterator[int]:
    """The end offset of each sentence of ``text``, in order (the last is ``len(text)``)."""
    start = 0
    for match in _END.finditer(text):
        if match.end() > start:
            yield match.end()
            start = match.end()
    if start < len(text):
        yield len(text)


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``; ``"".join(split_sentences(t)) == t`` always."""
    out, start = [], 0
    for end in _sentence_ends(text):
        out.append(text[start:end])
        start = end
    return out


class Sentences(Sequence[Sentence]):
    """A context's sentences and their tokens, held compactly.

    Every token id sits in one 4-byte array and each sentence is two offsets (characters and
    tokens); a :class:`Sentence` is made when one is asked for. At 1M tokens a list of
    Sentence objects, each with its own list of ints, held about 100 MB for the whole read;
    this holds about 8 MB. Sentences are tokenized in batches, each on its own (no special
    tokens), so a sentence's ids are what the tokenizer gives for it alone.
    """

    _BATCH = 1024

    def __init__(self, tokenizer: Any, text: str) -> None:
        self.text = text
        self._chars = array.array("q", [0])  # sentence i is text[_chars[i] : _chars[i + 1]]
        self._tokens = array.array("q", [0])  # and its ids _ids[_tokens[i] : _tokens[i + 1]]
        self._ids = array.array("i")
        batch: list[str] = []
        start = 0
        for end in _sentence_ends(text):
            batch.append(text[start:end])
            self._chars.append(end)
            start = end
            if len(batch) == self._BATCH:
                self._encode(tokenizer, batch)
                batch = []
        if batch:
            self._encode(tokenizer, batch)

    def _encode(self, tokenizer: Any, batch: list[str]) -> None:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            self._ids.extend(ids)
            self._tokens.append(len(self._ids))

    def __len__(self) -> int:
        return len(self._chars) - 1

    def __getitem__(self, i: int) -> Sentence:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return Sentence(i, self.text[self._chars[i] : self._chars[i + 1]],
                        self._ids[self._tokens[i] : self._tokens[i + 1]].tolist())  # fmt: skip

    def lengths(self) -> list[int]:
        """Each sentence's token count."""
        t = self._tokens
        return [t[i + 1] - t[i] for i in range(len(self))]

    def part(self, i: int, a: int, b: int) -> Sentence:
        """Tokens ``a:b`` of sentence ``i``: the sentence itself when that is all of it."""
        t0 = self._tokens[i]
        if a == 0 and t0 + b == self._tokens[i + 1]:
            return self[i]
        return Sentence(i, "", self._ids[t0 + a : t0 + b].tolist())


def tokenize_sentences(tokenizer: Any, text: str) -> Sentences:
    return Sentences(tokenizer, text)


def whole_if_fits(tokenizer: Any, fmt: Any, parts: Any, limit: int) -> list[int] | None:
    """The whole prompt's ids if it holds at most ``limit`` tokens, else None.

    A context of c characters holds at least c / m tokens, m the longest vocabulary entry
    (a token covers at most one character per symbol of its entry), so a context that
    cannot fit is never tokenized whole: at 1M tokens that one call cost several hundred
    MB of transient memory (the fast tokenizer's per-word buffers), more than the read.
    """
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    longest = max((len(t) for t in vocab), default=0)  # 0: unknown, tokenize to see
    if longest and len(parts.context) > limit * longest:
        return None
    whole = fmt.encode(fmt.render(parts))
    return whole if len(whole) <= limit else None


def _spans(lengths: list[int], size: int) -> Iterator[list[tuple[int, int, int]]]:
    """Runs of (sentence, first token, end token) of at most ``size`` tokens, in order."""
    run: list[tuple[int, int, int]] = []
    count = 0
    for i, n in enumerate(lengths):
        cuts = [(0, n)] if n <= size else [(a, min(n, a + size)) for a in range(0, n, size)]
        for a, b in cuts:  # a sentence longer than size is cut into token runs
            if count + b - a > size and run:
                yield run
                run, count = [], 0
            run.append((i, a, b))
            count += b - a
    if run:
        yield run


def iter_pieces(sentences: Sentences, size: int) -> Iterator[list[Sentence]]:
    """Consecutive runs of sentences of at most ``size`` tokens (a longer sentence is cut),
    made one at a time: the read holds one piece, not all of them."""
    for run in _spans(sentences.lengths(), size):
        yield [sentences.part(i, a, b) for i, a, b in run]


def count_pieces(sentences: Sentences, size: int) -> int:
    """How many pieces :func:`iter_pieces` gives, without making them."""
    return sum(1 for _ in _spans(sentences.lengths(), size))


def pieces(sentences: Sentences, size: int) -> list[list[Sentence]]:
    """All of :func:`iter_pieces` as a list."""
    return list(iter_pieces(sentences, size))


@dataclasses.dataclass
class Reader(Method):
    """Base of the readers: ``answer`` reads ``parts`` and answers; ``install`` patches nothing."""

    reader: ClassVar[bool] = True

    def install(self, model: torch.nn.Module, patch: Patch) -> None:
        return None

    def resident_tokens(self, model: torch.nn.Module, tokens: int, chunk: int | None) -> int:
        return min(tokens, self.trained_length(model))  # every forward fits the trained length

    def answer(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        fmt: Any,
        parts: Any,
        max_new_tokens: int,
        is_complete: Callable[[str], bool] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Reading:
        """Read ``parts`` (instruction, context, question, answer prefix) and answer greedily."""
        raise NotImplementedError

    # ---- shared

    def budget(self, model: torch.nn.Module, fmt: Any, parts: Any, wanted: int) -> int:
        """Context tokens a prompt may hold: ``wanted``, within the trained length."""
        from longreach.tasks.base import Parts

        frame = len(fmt.encode(fmt.render(Parts(parts.instruction, "", parts.question,
                                                 parts.answer_prefix, []))))  # fmt: skip
        room = self.trained_length(model) - frame - 64  # 64: the answer
        if room < 16:
            self.fail(
                f"the instruction and question take {frame} tokens, which leaves no room for "
                f"context in the trained length {self.trained_length(model)}."
            )
        return min(wanted, room)

    @staticmethod
    def prompt_ids(tokenizer: Any, fmt: Any, parts: Any, context_ids: list[int]) -> list[int]:
        from longreach.tasks.base import Parts

        context = tokenizer.decode(context_ids)
        rendered = fmt.render(
            Parts(parts.instruction, context, parts.question, parts.answer_prefix, [])
        )
        return fmt.encode(rendered)

    @staticmethod
    def generate(
        model: torch.nn.Module,
        tokenizer: Any,
        ids: list[int],
        max_new_tokens: int,
        is_complete: Callable[[str], bool] | None,
        chunk: int = 1024,
    ) -> Reading:
        from longreach.bench.runner import _eos_ids
        from longreach.prefill import greedy, prefill

        x = torch.tensor([ids], dtype=torch.long, device=model.device)
        with torch.inference_mode():
            state = prefill(model, x, chunk=min(chunk, len(ids)))

            def stop(tokens: torch.Tensor) -> bool:
                if is_complete is None:
                    return False
                return is_complete(tokenizer.decode(tokens[0], skip_special_tokens=True))

            new = greedy(model, state, max_new_tokens, _eos_ids(model, tokenizer), stop=stop)
        new_ids = new[0].tolist()
        return Reading(tokenizer.decode(new_ids, skip_special_tokens=True), len(new_ids),
                       prompt_ids=list(ids))  # fmt: skip


def read(
    model: torch.nn.Module,
    tokenizer: Any,
    context: str,
    question: str,
    method: str = "infiniretri",
    *,
    instruction: str = "",
    answer_prefix: str = "",
    max_new_tokens: int = 32,
    chat: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Answer ``question`` about ``context`` with a reader method (``infiniretri``, ``xl3m``).

    ``progress(done, total)`` is called after each step of the read (a chunk, a segment),
    before the answer: on a long input, a progress bar's hook.
    """
    from longreach.methods import build_method
    from longreach.tasks.base import Parts, PromptFormat

    built = build_method(method)
    if not built.reader:
        raise LongreachError(
            f"{built.name} is not a reader; use longreach.extend for it, or pick infiniretri or xl3m."
        )
    built.check_model(model)
    fmt = PromptFormat(tokenizer, chat=chat)
    parts = Parts(instruction, context, question, answer_prefix, [])
    return built.answer(model, tokenizer, fmt, parts, max_new_tokens, progress=progress).text


_MARK = "\x00longreach-context\x00"


@dataclass
class Frame:
    """A prompt around a context: ``head`` ids, then the context's ids, then ``tail`` ids."""

    head: list[int]
    tail: list[int]

    def around(self, context: list[int]) -> list[int]:
        return [*self.head, *context, *self.tail]


def frame(fmt: Any, parts: Any) -> Frame:
    """The prompt's tokens before and after its context (the question and answer prefix after)."""
    from longreach.tasks.base import Parts

    question = parts.question
    rendered = fmt.render(Parts(parts.instruction, _MARK, question, parts.answer_prefix, []))
    head, tail = rendered.split(_MARK, 1)
    tokenizer = fmt.tokenizer
    return Frame(fmt.encode(head), list(tokenizer(tail, add_special_tokens=False)["input_ids"]))


def right_padded(ids: list[int], bucket: int, limit: int, device: Any) -> tuple[torch.Tensor, int]:
    """``ids`` as a (1, L) tensor padded on the right, and the pad count.

    L is ``len(ids)`` rounded up to a multiple of ``bucket``, at most ``limit`` (the read's
    longest prompt) and never below ``len(ids)``; ``bucket`` 0 pads nothing. A reader's
    scoring forwards are padded so that the runtime sees few shapes: with a new shape per
    forward (every chunk cut at a sentence end has another length) torch/oneDNN keep
    per-shape state and the allocator fragments. Measured (SmolLM2, bf16, forwards of
    1024-3100 tokens): RSS grew from 865 to 1227 MiB over 60 forwards, and stayed at
    755-786 MiB with lengths rounded up to 256. Attention is causal, so the padding (copies
    of the last id) changes no output at an earlier position.
    """
    n = len(ids)
    length = min(-(-n // bucket) * bucket, limit) if bucket > 0 else n
    pad = max(0, length - n)
    x = torch.tensor([ids + ids[-1:] * pad], dtype=torch.long, device=device)
    return x, pad


def question_of(parts: Any) -> Any:
    """``parts`` with a question: its own, else the context's last sentence (XL3M's rule)."""
    if parts.question.strip():
        return parts
    sentences = split_sentences(parts.context)
    if not sentences:
        raise LongreachError("a reader needs a context or a question; both are empty.")
    return dataclasses.replace(parts, context="".join(sentences[:-1]), question=sentences[-1])
