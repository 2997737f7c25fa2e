"""LongChat's line retrieval (Li et al., 2023, "How Long Can Open-Source LLMs Truly Promise on
Context Length?"), as LongChat-Lines extends it for Giraffe (Pal et al., 2023): a record of
lines ``line <adjective-noun>: REGISTER_CONTENT is <number>`` (numbers 1..50000, the
``LRT-NL`` variant: word indices), and a question for the number of one line.

The number of lines sets the length; the asked line sits at ``depth`` of the record. Score:
Giraffe's exact match of the first number in the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from longreach.tasks.base import Parts, PromptFormat, Sample, Task, complete_numbers, fit_to_length
from longreach.tasks.scorers import first_number
from longreach.tasks.words import adj_noun

HEADER = (
    "Below is a record of lines I want you to remember. Each line begins with 'line <line "
    "index>' and contains a '<REGISTER_CONTENT>' at the end of the line as a numerical value. "
    "For each line index, memorize its corresponding <REGISTER_CONTENT>. At the end of the "
    "record, I will ask you to retrieve the corresponding <REGISTER_CONTENT> of a certain line "
    "index. Now the record start:\n\n"
)


@dataclass
class LongChatLines(Task):
    """Retrieve the REGISTER_CONTENT of one line among many (no parameters)."""

    name: ClassVar[str] = "longchat-lines"
    summary: ClassVar[str] = "LongChat-Lines: the number of one line of a long record of lines"

    max_new_tokens: ClassVar[int] = 35

    def generate(
        self, fmt: PromptFormat, length: int, depth: float | None, seed: int, index: int
    ) -> Sample:
        rng = self.rng(seed, index)
        lines: list[tuple[str, int]] = []
        seen: set[str] = set()

        def grow(n: int) -> None:
            while len(lines) < n:
                idx = adj_noun(rng)
                if idx not in seen:
                    seen.add(idx)
                    lines.append((idx, rng.randint(1, 50000)))

        def build(n: int) -> Parts:
            grow(max(n, 1))
            record = lines[: max(n, 1)]
            at = min(len(record) - 1, round((depth or 0.0) * (len(record) - 1)))
            idx, number = record[at]
            return Parts(
                HEADER,
                "".join(f"line {i}: REGISTER_CONTENT is <{v}>\n" for i, v in record),
                f"\nNow the record is over. Tell me what is the <REGISTER_CONTENT> in line "
                f"{idx}? I need the number.",
                f" Line <{idx}>: <REGISTER_CONTENT> is",
                [str(number)],
                {"line": idx, "line_index": at, "lines": len(record)},
            )

        grow(16)
        per = sum(
            len(
                fmt.tokenizer(f"line {i}: REGISTER_CONTENT is <{v}>\n", add_special_tokens=False)[
                    "input_ids"
                ]
            )
            for i, v in lines[:16]
        )
        parts, prompt, ids = fit_to_length(build, fmt, length, self.spec(), per / 16)
        return self.make_sample(
            fmt, parts, prompt, ids, length, depth, seed, index, self.max_new_tokens
        )

    def score(self, sample: Sample, output: str) -> float:
        return first_number(output, sample.expected)

    def is_complete(self, sample: Sample, output: str) -> bool:
        return bool(complete_numbers(output)) or super().is_complete(sample, output)
