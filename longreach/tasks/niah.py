"""Needle in a haystack with RULER's needles (Hsieh et al., 2024): "The special magic number
for <key> is: <7 digits>." in real text, so the answer cannot come from memorized facts.

- ``niah``: one needle at ``depth``; the depth × length grid is Kamradt's heatmap.
- ``multi-needle``: ``k`` needles with values for the same key (RULER's multi-value variant),
  the first at ``depth`` and the rest spread towards the end; score = fraction recovered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from longreach.errors import LongreachError
from longreach.tasks.base import Parts, PromptFormat, Sample, Task, complete_numbers
from longreach.tasks.haystack import HaystackPiece, insert_needles
from longreach.tasks.scorers import fraction_numbers, number_match
from longreach.tasks.text import generate_in_haystack, spread_depths

KEYS = (
    "Amsterdam", "Athens", "Bangkok", "Barcelona", "Berlin", "Bogota", "Budapest", "Cairo",
    "Chicago", "Copenhagen", "Dakar", "Dublin", "Havana", "Helsinki", "Istanbul", "Jakarta",
    "Kyoto", "Lagos", "Lima", "Lisbon", "Madrid", "Manila", "Melbourne", "Montreal", "Mumbai",
    "Nairobi", "Oslo", "Prague", "Quito", "Reykjavik", "Riga", "Santiago", "Seoul", "Sofia",
    "Stockholm", "Sydney", "Taipei", "Tallinn", "Toronto", "Tunis", "Valencia", "Vienna",
    "Vilnius", "Warsaw", "Zagreb", "Zurich",
)  # fmt: skip

INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize "
    "them. I will quiz you about the numbers afterwards.\n"
)


def _value(rng) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


@dataclass
class Niah(Task):
    """One needle sentence in real text (``haystack``, default the Paul Graham essays)."""

    haystack: str = "pg"

    name: ClassVar[str] = "niah"
    summary: ClassVar[str] = "one needle sentence with a 7-digit number in real text"
    uses_haystack: ClassVar[bool] = True

    def generate(
        self, fmt: PromptFormat, length: int, depth: float | None, seed: int, index: int
    ) -> Sample:
        rng = self.rng(seed, index)
        key, value = rng.choice(KEYS), _value(rng)
        needle = f"The special magic number for {key} is: {value}."

        def parts(piece: HaystackPiece) -> Parts:
            context, at = insert_needles(piece, [needle], [depth or 0.0])
            return Parts(
                INSTRUCTION,
                context,
                f"\nWhat is the special magic number for {key} mentioned in the provided text?",
                f" The special magic number for {key} mentioned in the provided text is",
                [value],
                {"needle_depths": at, "key": key},
            )

        return generate_in_haystack(self, fmt, length, depth, seed, index, parts, 12)

    def score(self, sample: Sample, output: str) -> float:
        return number_match(output, sample.expected)

    def is_complete(self, sample: Sample, output: str) -> bool:
        return bool(complete_numbers(output)) or super().is_complete(sample, output)


@dataclass
class MultiNeedle(Task):
    """``k`` needles with different numbers for one key; the question asks for all of them."""

    k: int = 4
    haystack: str = "pg"

    name: ClassVar[str] = "multi-needle"
    summary: ClassVar[str] = "k needles for one key; score = fraction of the k numbers recovered"
    uses_haystack: ClassVar[bool] = True

    def validate(self) -> None:
        if not 1 <= self.k <= 64:
            raise LongreachError(f"multi-needle k={self.k} is out of range; use 1 to 64 needles.")

    def generate(
        self, fmt: PromptFormat, length: int, depth: float | None, seed: int, index: int
    ) -> Sample:
        rng = self.rng(seed, index)
        key = rng.choice(KEYS)
        values: list[str] = []
        while len(values) < self.k:
            value = _value(rng)
            if value not in values:
                values.append(value)
        needles = [f"One of the special magic numbers for {key} is: {v}." for v in values]

        def parts(piece: HaystackPiece) -> Parts:
            context, at = insert_needles(piece, needles, spread_depths(depth or 0.0, self.k))
            return Parts(
                INSTRUCTION,
                context,
                f"\nWhat are all the special magic numbers for {key} mentioned in the provided text?",
                f" The special magic numbers for {key} mentioned in the provided text are",
                values,
                {"needle_depths": at, "key": key},
            )

        return generate_in_haystack(self, fmt, length, depth, seed, index, parts, 10 * self.k + 8)

    def score(self, sample: Sample, output: str) -> float:
        return fraction_numbers(output, sample.expected)

    def is_complete(self, sample: Sample, output: str) -> bool:
        # Only the k-th number ends the answer, not a line break: models often put a colon,
        # then list the values on the next lines (RULER's multi-value runs to its token
        # budget too). The budget (10 tokens per needle + 8) bounds a rambling answer.
        return len(complete_numbers(output)) >= self.k
