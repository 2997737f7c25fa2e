"""Several questions about one haystack: the samples of ``bench --questions-per-context N``.

A task that can ask many questions of one context registers a generator here
(:data:`QUESTION_SETS`, keyed by task class): it hides ``n`` facts in one haystack and asks
each of them in its own question. :func:`question_set` turns that into a
:class:`QuestionSet`: the document's token ids (instruction + context, what
``longreach.Context`` encodes once) and, per question, the ids fed after it (question + answer
prefix, and in chat format the template's closing of the user turn). A question's full input
is ``document_ids + question ids``, exactly what a fresh prefill of the pair would read.

- ``passkey``: ``n`` numbered 5-digit pass keys in the filler; "What is pass key number i?".
- ``niah``: ``n`` needles "The special magic number for <city> is: <7 digits>." with distinct
  cities (RULER's multi-key needles, each asked alone); at most 46.
- ``kv-retrieval``: ``n`` queried pairs among the JSON object's distractor pairs.

The facts sit at depths ``d + i·(1 − d)/n`` (:func:`~longreach.tasks.text.spread_depths`) from
the grid's depth ``d``. The document is sized so that the longest question still fits the
length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from longreach.errors import LongreachError
from longreach.tasks.base import Parts, PromptFormat, Sample, Task, fit_to_length
from longreach.tasks.haystack import HaystackPiece, insert_needles
from longreach.tasks.json_kv import KvRetrieval, distractors, new_uuid, place, render_object
from longreach.tasks.niah import INSTRUCTION as NIAH_INSTRUCTION
from longreach.tasks.niah import KEYS, Niah, _value
from longreach.tasks.passkey import INSTRUCTION as PASSKEY_INSTRUCTION
from longreach.tasks.passkey import Passkey
from longreach.tasks.text import spread_depths

__all__ = ["MAX_QUESTIONS", "QUESTION_SETS", "QuestionSet", "question_set", "supports_questions"]


@dataclass
class QuestionSet:
    """One document and its questions; ``samples[i]`` is question i as a scorable Sample."""

    document: str
    document_ids: list[int]
    question_ids: list[list[int]]
    samples: list[Sample] = field(default_factory=list)


# A generator: (task, fmt, length, depth, seed, index, n) -> (parts per question, max_new_tokens,
# how to fit: "haystack" or "pairs"). Every Parts shares instruction and context.
Generator = Callable[..., tuple[Callable[[Any], list[Parts]], int, str]]


def _passkey(task: Passkey, depth: float, seed: int, index: int, n: int):
    rng = task.rng(seed, index)
    keys = [str(rng.randint(10000, 99999)) for _ in range(n)]
    needles = [
        f"The pass key number {i + 1} is {k}. Remember it. {k} is pass key number {i + 1}."
        for i, k in enumerate(keys)
    ]

    def build(piece: HaystackPiece) -> list[Parts]:
        context, at = insert_needles(piece, needles, spread_depths(depth, n))
        return [
            Parts(
                PASSKEY_INSTRUCTION,
                context,
                f"\n\nWhat is pass key number {i + 1}?",
                f" Pass key number {i + 1} is",
                [k],
                {"needle_depths": at, "question_depth": at[i]},
            )
            for i, k in enumerate(keys)
        ]

    return build, 10, "haystack"


def _niah(task: Niah, depth: float, seed: int, index: int, n: int):
    rng = task.rng(seed, index)
    cities = rng.sample(KEYS, n)
    values = [_value(rng) for _ in cities]
    needles = [
        f"The special magic number for {c} is: {v}." for c, v in zip(cities, values, strict=True)
    ]

    def build(piece: HaystackPiece) -> list[Parts]:
        context, at = insert_needles(piece, needles, spread_depths(depth, n))
        return [
            Parts(
                NIAH_INSTRUCTION,
                context,
                f"\nWhat is the special magic number for {c} mentioned in the provided text?",
                f" The special magic number for {c} mentioned in the provided text is",
                [v],
                {"needle_depths": at, "key": c, "question_depth": at[i]},
            )
            for i, (c, v) in enumerate(zip(cities, values, strict=True))
        ]

    return build, 12, "haystack"


def _kv(task: KvRetrieval, depth: float, seed: int, index: int, n: int):
    rng = task.rng(seed, index)
    queried = [(new_uuid(rng), new_uuid(rng)) for _ in range(n)]
    depths = spread_depths(depth, n)

    def build(count: int) -> list[Parts]:
        pairs = place(distractors(f"{task.name}|{seed}|{index}|pairs", count), queried, depths)
        context = render_object(pairs)
        return [
            Parts(
                "Extract the value corresponding to the specified key in the JSON object below.\n\n"
                "JSON data:\n",
                context,
                f'\n\nKey: "{key}"\n',
                "Corresponding value:",
                [value],
                {"pairs": len(pairs), "question_depth": depths[i]},
            )
            for i, (key, value) in enumerate(queried)
        ]

    return build, 40, "pairs"


QUESTION_SETS: dict[type[Task], Generator] = {Passkey: _passkey, Niah: _niah, KvRetrieval: _kv}
MAX_QUESTIONS: dict[type[Task], int] = {Passkey: 64, Niah: len(KEYS), KvRetrieval: 64}


def supports_questions(task: Task) -> bool:
    return type(task) in QUESTION_SETS


def check_questions(tasks: list[Task], n: int) -> None:
    """Refuse, in one line, tasks that cannot ask ``n`` questions of one context."""
    for task in tasks:
        if not supports_questions(task):
            names = ", ".join(sorted(cls.name for cls in QUESTION_SETS))
            raise LongreachError(
                f"--questions-per-context needs tasks that ask several questions of one "
                f"context ({names}); {task.name} does not: run it without the flag."
            )
        limit = MAX_QUESTIONS[type(task)]
        if n > limit:
            raise LongreachError(
                f"{task.name} asks at most {limit} questions of one context; got "
                f"--questions-per-context {n}."
            )


def _split(fmt: PromptFormat, parts: Parts) -> tuple[str, str]:
    """The rendered prompt cut where the context ends: (document text, question text)."""
    text = fmt.render(parts)
    at = text.find(parts.context)
    if at < 0 or not parts.context:
        raise LongreachError("a question set's context does not appear in its prompt.")
    cut = at + len(parts.context)
    return text[:cut], text[cut:]


def question_set(
    task: Task, fmt: PromptFormat, length: int, depth: float | None, seed: int, index: int, n: int
) -> QuestionSet:
    """The document and ``n`` questions of sample ``index`` at ``length`` tokens and ``depth``."""
    check_questions([task], n)
    build, max_new, unit = QUESTION_SETS[type(task)](task, depth or 0.0, seed, index, n)
    tok = fmt.tokenizer

    def question_tokens(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False, verbose=False)["input_ids"])

    def longest(all_parts: list[Parts]) -> Parts:
        return max(all_parts, key=lambda p: len(question_tokens(_split(fmt, p)[1])))

    if unit == "haystack":
        import random

        from longreach.tasks.haystack import resolve_haystack, tokenized_haystack

        hay = tokenized_haystack(resolve_haystack(task.haystack), tok)  # type: ignore[attr-defined]
        start = hay.start_token(random.Random(f"{task.name}|{seed}|{index}|start"), length)

        def make(count: int) -> list[Parts]:
            return build(hay.piece(start, count))

        per = 1.0
    else:
        make, per = build, 45.0
    first = make(0)
    probe = longest(first)
    which = first.index(probe)
    built: dict[str, list[Parts]] = {}  # each fitting attempt's questions, by its context

    def attempt(count: int) -> Parts:
        every = make(count)
        built[every[which].context] = every
        return every[which]

    parts, _, _ = fit_to_length(attempt, fmt, length, task.spec(), per)
    all_parts = built[parts.context]
    document, _ = _split(fmt, all_parts[0])
    document_ids = fmt.encode(document)
    question_ids, samples = [], []
    for i, p in enumerate(all_parts):
        doc_i, q_text = _split(fmt, p)
        if doc_i != document:
            raise LongreachError("the questions of one context do not share their document.")
        ids = question_tokens(q_text)
        question_ids.append(ids)
        meta = dict(p.meta)
        meta.update(
            context_chars=len(p.context),
            context_words=len(p.context.split()),
            document_tokens=len(document_ids),
            question=i,
        )
        samples.append(
            Sample(
                task=task.spec(),
                length=length,
                depth=depth,
                seed=seed,
                index=index,
                prompt_format=fmt.name,
                prompt=document + q_text,
                input_ids=document_ids + ids,
                expected=list(p.expected),
                max_new_tokens=max_new,
                metric=task.metric,
                meta=meta,
                parts=p,
            )
        )
    return QuestionSet(document, document_ids, question_ids, samples)
