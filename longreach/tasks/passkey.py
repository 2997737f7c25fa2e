"""Passkey retrieval in the format of Mohtashami & Jaggi (2023, Landmark Attention), used by
LM-Infinite (Han et al., 2023): a 5-digit key stated once inside filler text, asked at the end."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from longreach.tasks.base import Parts, PromptFormat, Sample, Task, complete_numbers
from longreach.tasks.haystack import HaystackPiece, insert_needles
from longreach.tasks.scorers import number_match
from longreach.tasks.text import generate_in_haystack

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there.\n\n"
)


@dataclass
class Passkey(Task):
    """A 5-digit pass key hidden at ``depth`` in filler (``haystack``, default: the synthetic filler).

    Score 1 when the key is one of the digit runs of the answer.
    """

    haystack: str = "synthetic"

    name: ClassVar[str] = "passkey"
    summary: ClassVar[str] = "a 5-digit key in filler text (Landmark / LM-Infinite format)"
    uses_haystack: ClassVar[bool] = True
    default_haystack: ClassVar[str] = "synthetic"

    def generate(
        self, fmt: PromptFormat, length: int, depth: float | None, seed: int, index: int
    ) -> Sample:
        key = str(self.rng(seed, index).randint(10000, 99999))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."

        def parts(piece: HaystackPiece) -> Parts:
            context, at = insert_needles(piece, [needle], [depth or 0.0])
            return Parts(
                INSTRUCTION,
                context,
                "\n\nWhat is the pass key?",
                " The pass key is",
                [key],
                {"needle_depths": at},
            )

        return generate_in_haystack(self, fmt, length, depth, seed, index, parts, 10)

    def score(self, sample: Sample, output: str) -> float:
        return number_match(output, sample.expected)

    def is_complete(self, sample: Sample, output: str) -> bool:
        return bool(complete_numbers(output)) or super().is_complete(sample, output)
