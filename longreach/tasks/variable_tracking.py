"""Variable tracking from RULER (Hsieh et al., 2024): chains of assignments
"VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE", ... hidden in filler; the question asks for every
variable that holds the first chain's value. Score = fraction of those variables named
(RULER's ``string_match_all``, here on whole words)."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import ClassVar

from longreach.errors import LongreachError
from longreach.tasks.base import Parts, PromptFormat, Sample, Task
from longreach.tasks.haystack import HaystackPiece, insert_needles
from longreach.tasks.scorers import words_all
from longreach.tasks.text import generate_in_haystack, spread_depths

_NAME = re.compile(r"\b[A-Z]{5}\b")


@dataclass
class VariableTracking(Task):
    """``chains`` chains of ``hops`` assignments each; the first statement sits at ``depth``."""

    chains: int = 1
    hops: int = 4
    haystack: str = "synthetic"

    name: ClassVar[str] = "variable-tracking"
    summary: ClassVar[str] = (
        "RULER's chains of variable assignments; name every variable with a value"
    )
    uses_haystack: ClassVar[bool] = True
    default_haystack: ClassVar[str] = "synthetic"

    def validate(self) -> None:
        if not 1 <= self.chains <= 16 or not 1 <= self.hops <= 64:
            raise LongreachError(
                f"variable-tracking chains={self.chains}, hops={self.hops} is out of range; "
                "use 1-16 chains and 1-64 hops."
            )

    def generate(
        self, fmt: PromptFormat, length: int, depth: float | None, seed: int, index: int
    ) -> Sample:
        rng = self.rng(seed, index)
        names: list[str] = []
        while len(names) < self.chains * (self.hops + 1):
            name = "".join(rng.choices(string.ascii_uppercase, k=5))
            if name not in names:
                names.append(name)
        values: list[str] = []
        while len(values) < self.chains:
            value = str(rng.randint(10000, 99999))
            if value not in values:
                values.append(value)
        chains = [
            names[c * (self.hops + 1) : (c + 1) * (self.hops + 1)] for c in range(self.chains)
        ]
        statements = []
        for j in range(self.hops + 1):  # interleave the chains, keeping each in order
            for c, chain in enumerate(chains):
                rhs = values[c] if j == 0 else f"VAR {chain[j - 1]}"
                statements.append(f"VAR {chain[j]} = {rhs}.")
        query, wanted = values[0], chains[0]

        def parts(piece: HaystackPiece) -> Parts:
            context, at = insert_needles(
                piece, statements, spread_depths(depth or 0.0, len(statements))
            )
            return Parts(
                "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
                context,
                f"\nQuestion: Find all variables that are assigned the value {query} in the text above.",
                " Answer: According to the chain(s) of variable assignment in the text above, "
                f"{len(wanted)} variables are assigned the value {query}, they are:",
                list(wanted),
                {"needle_depths": at},
            )

        return generate_in_haystack(self, fmt, length, depth, seed, index, parts, 30)

    def score(self, sample: Sample, output: str) -> float:
        return words_all(output, sample.expected)

    def is_complete(self, sample: Sample, output: str) -> bool:
        found = set(_NAME.findall(output))
        return len(found) >= len(sample.expected) or super().is_complete(sample, output)
