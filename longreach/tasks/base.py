"""What every task shares: the sample, the prompt format, fitting a sample to a token length.

A task is a dataclass of validated parameters with three small methods:
``generate(fmt, length, depth, seed, index) -> Sample``, ``score(sample, output) -> float`` and
``is_complete(sample, output) -> bool`` (greedy decoding stops as soon as it is true).

Samples are generated offline and deterministically: the random generator of a sample is
seeded by (task name, seed, index) only, so the same needle sits in the same haystack at every
length and depth, and the samples of one index at several depths share the text before their
shallowest needle (the runner prefills that shared prefix once).
"""

from __future__ import annotations

import dataclasses
import random
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from longreach.errors import LongreachError
from longreach.params import coerce
from longreach.tasks.haystack import HaystackTooShort

RAW, CHAT = "raw", "chat"


@dataclass
class Sample:
    """One prompt with its expected answer; ``input_ids`` are exactly what the model reads."""

    task: str  # canonical task spec, e.g. "niah:haystack=pg"
    length: int  # the target length in tokens (the actual count is len(input_ids))
    depth: float | None
    seed: int
    index: int
    prompt_format: str  # "raw" or "chat"
    prompt: str
    input_ids: list[int]
    expected: list[str]
    max_new_tokens: int
    metric: str = "accuracy"
    meta: dict[str, Any] = field(default_factory=dict)
    # The prompt before formatting (instruction, context, question, answer prefix): what a
    # reader method splits into pieces. Not stored with the cell.
    parts: Parts | None = field(default=None, repr=False, compare=False)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class Parts:
    """A prompt before formatting: the user turn is instruction + context + question."""

    instruction: str
    context: str
    question: str
    answer_prefix: str
    expected: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


class PromptFormat:
    """Renders parts as a raw prompt or through the tokenizer's chat template, and counts tokens.

    Raw: ``instruction + context + question + answer_prefix`` encoded with the tokenizer's own
    special tokens. Chat: the user turn holds instruction, context and question; the answer
    prefix follows the assistant header (``add_generation_prompt=True``).
    """

    def __init__(self, tokenizer: Any, chat: bool = False) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        if chat and not getattr(tokenizer, "chat_template", None):
            raise LongreachError(
                "--chat needs a tokenizer with a chat template and this one has none; use --no-chat."
            )

    @property
    def name(self) -> str:
        return CHAT if self.chat else RAW

    def render(self, parts: Parts) -> str:
        if not self.chat:
            return parts.instruction + parts.context + parts.question + parts.answer_prefix
        user = (parts.instruction + parts.context + parts.question).strip()
        head = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        return head + parts.answer_prefix.lstrip()

    def encode(self, text: str) -> list[int]:
        # A chat template writes its own special tokens; a raw prompt gets the tokenizer's (BOS).
        return list(
            self.tokenizer(text, add_special_tokens=not self.chat, verbose=False)["input_ids"]
        )

    def special_prefix(self) -> list[int]:
        """Tokens the tokenizer puts in front of raw text (e.g. BOS); empty for most BPE models."""
        plain = list(self.tokenizer("a", add_special_tokens=False)["input_ids"])
        full = list(self.tokenizer("a", add_special_tokens=True)["input_ids"])
        if len(full) > len(plain) and full[len(full) - len(plain) :] == plain:
            return full[: len(full) - len(plain)]
        return []


def fit_to_length(
    build: Callable[[int], Parts],
    fmt: PromptFormat,
    target: int,
    task: str,
    tokens_per_unit: float = 1.0,
) -> tuple[Parts, str, list[int]]:
    """Find the largest filler amount n whose rendered prompt has at most ``target`` tokens.

    ``build(n)`` makes the parts with n units of filler (tokens of haystack, or JSON pairs).
    Secant steps from an estimate, then bisection: usually 2-4 renders of the full prompt.
    """

    def measure(n: int) -> tuple[Parts, str, list[int]]:
        parts = build(n)
        text = fmt.render(parts)
        return parts, text, fmt.encode(text)

    best = measure(0)
    base = len(best[2])
    if base > target:
        raise LongreachError(
            f"length {target} is too short for task {task!r}: its instructions, question and "
            f"needles alone take {base} tokens with this tokenizer; ask for a longer length."
        )
    lo, hi = 0, None  # lo fits; hi (if known) does not
    exhausted: HaystackTooShort | None = None
    per = max(tokens_per_unit, 1e-3)
    guess = max(1, int((target - base) / per))
    for _ in range(40):
        if hi is not None and hi - lo <= 1:
            break
        if guess <= lo or (hi is not None and guess >= hi):
            guess = (lo + hi) // 2 if hi is not None else lo * 2 + 1
        try:
            attempt = measure(guess)
        except HaystackTooShort as exc:
            exhausted, hi = exc, guess
            guess = (lo + guess) // 2
            continue
        count = len(attempt[2])
        if count <= target:
            lo, best = guess, attempt
            if count == target:
                break
        else:
            hi = guess
        if guess > 0 and count != base:
            per = max((count - base) / guess, 1e-3)
        guess = guess + int((target - count) / per) + (1 if count < target else -1)
    if exhausted is not None and target - len(best[2]) > max(16, target // 50):
        raise HaystackTooShort(exhausted.source_key, exhausted.available, target - base)
    return best


def parse_params(text: str, what: str) -> dict[str, str]:
    """``"k=4,haystack=pg"`` -> ``{"k": "4", "haystack": "pg"}``."""
    params: dict[str, str] = {}
    if not text.strip():
        return params
    for item in text.split(","):
        if "=" not in item:
            raise LongreachError(
                f"bad parameter {item.strip()!r} in {what}; write name=value pairs separated by commas."
            )
        key, value = item.split("=", 1)
        if key.strip() in params:
            raise LongreachError(f"{what} sets {key.strip()!r} twice.")
        params[key.strip()] = value.strip()
    return params


class Task:
    """Base of every task dataclass. Subclasses set ``name`` and implement the three methods."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    uses_depth: ClassVar[bool] = True
    uses_haystack: ClassVar[bool] = False
    default_haystack: ClassVar[str] = "pg"
    metric: ClassVar[str] = "accuracy"
    # A task parameter the table and report break results down by (long-icl: "labels").
    reported_by: ClassVar[str | None] = None

    @classmethod
    def from_params(cls, params: dict[str, str], default_haystack: str | None = None) -> Task:
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, raw in params.items():
            if key not in fields:
                known = ", ".join(fields) or "none"
                raise LongreachError(
                    f"task {cls.name!r} has no parameter {key!r}; its parameters: {known}."
                )
            kwargs[key] = coerce(cls.name, key, raw, hints[key])
        if "haystack" in fields and "haystack" not in kwargs:
            kwargs["haystack"] = default_haystack or cls.default_haystack
        task = cls(**kwargs)
        task.validate()
        return task

    def validate(self) -> None:
        """Raise a LongreachError for a parameter out of range."""

    def for_model(self, trained_length: int | None) -> Task:
        """This task with the defaults that depend on the model filled in (here: none)."""
        return self

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def spec(self) -> str:
        """Canonical spec with every parameter, so that a changed default never reuses a cell."""
        values = self.params()
        if "haystack" in values:
            from longreach.tasks.haystack import resolve_haystack

            values["haystack"] = resolve_haystack(str(values["haystack"])).key()
        inner = ",".join(f"{k}={_format(v)}" for k, v in sorted(values.items()))
        return f"{self.name}:{inner}" if inner else self.name

    def rng(self, seed: int, index: int) -> random.Random:
        return random.Random(f"{self.name}|{seed}|{index}")

    def generate(
        self, fmt: PromptFormat, length: int, depth: float | None, seed: int, index: int
    ) -> Sample:
        raise NotImplementedError

    def score(self, sample: Sample, output: str) -> float:
        raise NotImplementedError

    def is_complete(self, sample: Sample, output: str) -> bool:
        return _line_done(output)

    def make_sample(
        self,
        fmt: PromptFormat,
        parts: Parts,
        prompt: str,
        ids: list[int],
        length: int,
        depth: float | None,
        seed: int,
        index: int,
        max_new_tokens: int,
    ) -> Sample:
        meta = dict(parts.meta)
        meta["context_chars"] = len(parts.context)
        meta["context_words"] = len(parts.context.split())
        return Sample(
            task=self.spec(),
            length=length,
            depth=depth,
            seed=seed,
            index=index,
            prompt_format=fmt.name,
            prompt=prompt,
            input_ids=ids,
            expected=list(parts.expected),
            max_new_tokens=max_new_tokens,
            metric=self.metric,
            meta=meta,
            parts=parts,
        )


def _format(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def _line_done(output: str) -> bool:
    """True once the output has some text followed by a line break."""
    stripped = output.lstrip()
    return bool(stripped) and "\n" in stripped


_NUMBER_DONE = re.compile(r"\d+(?=\D)")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)


def complete_numbers(output: str) -> list[str]:
    """Digit runs that are finished (followed by a non-digit)."""
    return _NUMBER_DONE.findall(output)


def uuids_in(output: str) -> list[str]:
    return [u.lower() for u in _UUID.findall(output)]
