"""Ada-LEval's length-adaptable tasks (Wang et al., 2024, "Ada-LEval: Evaluating long-context
LLMs with length-adaptable benchmarks"), generated at any length.

- ``tsort``: a passage of real text (the Paul Graham essays, or ``haystack=`` any text) cut
  into ``segments`` consecutive segments, shown shuffled between the text just before and just
  after the passage (the paper's hints); the answer is the segments' original order as a list
  of their numbers. The length sets the passage's size. Parsed as Ada-LEval parses it: the text
  after "Answer:" as JSON, else the one permutation of 1..N found as a subsequence of its
  characters; exact match.
- ``bestanswer``: one question and many answers ``A1:``, ``A2:``, ...; the model names the most
  helpful one (the accepted answer). Distractors are the question's other answers, then the
  answers of the file's other questions (the paper takes them from questions with the same
  tags); their number sets the length. Extraction as Ada-LEval's: the highest-numbered
  designation ``Ai`` found in the output, else the highest bare number.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from longreach.errors import LongreachError
from longreach.tasks.base import Parts, PromptFormat, Sample, Task, fit_to_length
from longreach.tasks.haystack import resolve_haystack, sentence_boundary, tokenized_haystack
from longreach.tasks.ruler import SourceTooShort, fit_ruler

SHIPPED_ANSWERS = Path(__file__).parent / "data" / "bestanswer_tiny.jsonl"


def parse_permutation(output: str, n: int) -> list[int] | None:
    """Ada-LEval's TSort parser: JSON after "Answer:", else the unique permutation subsequence."""
    text = output.split("Answer:", 1)[1].strip() if "Answer:" in output else output
    try:
        value = json.loads(text)
        if isinstance(value, list):
            return value
    except (json.JSONDecodeError, ValueError):
        pass
    found = [
        p
        for p in itertools.permutations(range(1, n + 1))
        if _is_subsequence("".join(map(str, p)), text)
    ]
    return list(found[0]) if len(found) == 1 else None


def _is_subsequence(needle: str, text: str) -> bool:
    pos = 0
    for ch in needle:
        pos = text.find(ch, pos) + 1
        if pos == 0:
            return False
    return True


@dataclass
class TSort(Task):
    """Order ``segments`` shuffled segments of a passage (2 to 9 segments, default 4)."""

    segments: int = 4
    haystack: str = "pg"

    name: ClassVar[str] = "tsort"
    summary: ClassVar[str] = "Ada-LEval TSort: put shuffled segments of a text back in order"
    uses_depth: ClassVar[bool] = False
    uses_haystack: ClassVar[bool] = True
    max_new_tokens: ClassVar[int] = 32

    def validate(self) -> None:
        if not 2 <= self.segments <= 9:
            raise LongreachError(f"tsort segments={self.segments} is out of range; use 2 to 9.")

    def generate(
        self, fmt: PromptFormat, length: int, depth: float | None, seed: int, index: int
    ) -> Sample:
        rng = self.rng(seed, index)
        hay = tokenized_haystack(resolve_haystack(self.haystack), fmt.tokenizer)
        start = hay.start_token(random.Random(f"{self.name}|{seed}|{index}|start"), length)
        order = list(range(self.segments))
        while order == sorted(order):
            rng.shuffle(order)
        # answer[i]: the number shown on the i-th segment of the original text
        answer = [order.index(i) + 1 for i in range(self.segments)]

        def build(n: int) -> Parts:
            text = hay.piece(start, n).text
            # hints: a tenth of the text before and after; the passage in between, cut into
            # segments at sentence starts near equal shares
            k = self.segments
            cuts = [
                sentence_boundary(text, round(len(text) * (0.1 + 0.8 * i / k)))
                for i in range(k + 1)
            ]
            cuts[0] = min(cuts[0], cuts[1])
            parts = [text[cuts[i] : cuts[i + 1]].strip() for i in range(k)]
            shown = [parts[order[j]] for j in range(k)]
            context = (
                f"Text before the passage:\n{text[: cuts[0]].strip()}\n\n"
                + "".join(f"Segment {j + 1}:\n{s}\n\n" for j, s in enumerate(shown))
                + f"Text after the passage:\n{text[cuts[-1] :].strip()}\n"
            )
            return Parts(
                f"Below are the text before and after a passage, and the passage itself cut "
                f"into {k} segments shown in a shuffled order. Find the original order of the "
                "segments.\n\n",
                context,
                "\nGive the segment numbers in their original order as a JSON list, e.g. "
                f"{json.dumps(list(range(k, 0, -1)))}.",
                " Answer:",
                [json.dumps(answer)],
                {"segment_chars": [len(p) for p in parts]},
            )

        gen = self.max_new_tokens
        base = len(fmt.encode(fmt.render(build(0))))
        if base + gen > length:
            raise LongreachError(
                f"length {length} is too short for task 'tsort': its prompt without text takes "
                f"{base} tokens and it answers in up to {gen}; ask for at least {base + gen + 64}."
            )
        parts, prompt, ids = fit_to_length(build, fmt, length - gen, self.spec())
        return self.make_sample(fmt, parts, prompt, ids, length, None, seed, index, gen)

    def score(self, sample: Sample, output: str) -> float:
        want = json.loads(sample.expected[0])
        got = parse_permutation(output, len(want))
        return 1.0 if got is not None and list(got)[: len(want)] == want else 0.0

    def is_complete(self, sample: Sample, output: str) -> bool:
        return "]" in output or super().is_complete(sample, output)


# ---- BestAnswer


@dataclass(frozen=True)
class AnswerRow:
    question: str
    answers: tuple[str, ...]
    accepted: int


@functools.lru_cache(maxsize=8)
def load_answers_file(path: str) -> tuple[tuple[AnswerRow, ...], str]:
    """Rows ``{"question", "answers": [...], "accepted": i}`` (i counts from 0); one-line errors."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise LongreachError(
            f"cannot read answers file {p} ({exc.strerror or exc}); check the path."
        ) from None
    rows = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"answers file {p} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise LongreachError(f"{where} is not JSON; write one JSON object per line.") from None
        if not isinstance(row, dict):
            raise LongreachError(f"{where} is not a JSON object; write one object per line.")
        missing = [f for f in ("question", "answers", "accepted") if f not in row]
        if missing:
            raise LongreachError(
                f"{where} has no {', '.join(repr(f) for f in missing)}; each row needs "
                "'question', 'answers' and 'accepted'."
            )
        answers = row["answers"]
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise LongreachError(f"{where}: 'question' must be a non-empty string.")
        if (
            not isinstance(answers, list)
            or not answers
            or not all(isinstance(a, str) and a.strip() for a in answers)
        ):
            raise LongreachError(
                f"{where}: 'answers' must be a non-empty list of non-empty strings."
            )
        accepted = row["accepted"]
        if (
            isinstance(accepted, bool)
            or not isinstance(accepted, int)
            or not 0 <= accepted < len(answers)
        ):
            raise LongreachError(
                f"{where}: 'accepted' must be the index (from 0) of one of its {len(answers)} answers."
            )
        rows.append(AnswerRow(row["question"], tuple(answers), accepted))
    if not rows:
        raise LongreachError(f"answers file {p} has no rows; write one JSON object per line.")
    return tuple(rows), hashlib.sha256(raw).hexdigest()[:10]


def extract_designation(output: str, n: int) -> str | None:
    """Ada-LEval's BestAnswer extraction: the highest ``Ai`` found, else the highest bare ``i``."""
    for prefix in ("A", ""):
        found = [i for i in range(1, n + 1) if f"{prefix}{i}" in output]
        if found:
            return f"A{max(found)}"
    return None


@dataclass
class BestAnswer(Task):
    """Name the most helpful of many answers to a question (``file``: a user's answers file)."""

    file: str = "tiny"

    name: ClassVar[str] = "bestanswer"
    summary: ClassVar[str] = "Ada-LEval BestAnswer: pick the accepted answer among many"
    uses_depth: ClassVar[bool] = False
    max_new_tokens: ClassVar[int] = 16

    def _path(self) -> Path:
        return (SHIPPED_ANSWERS if self.file == "tiny" else Path(self.file).expanduser()).resolve()

    def validate(self) -> None:
        load_answers_file(str(self._path()))

    def params(self) -> dict[str, Any]:
        if self.file == "tiny":
            return {"file": "tiny"}
        return {"file": f"{self._path().name}@{load_answers_file(str(self._path()))[1]}"}

    def generate(
        self, fmt: PromptFormat, length: int, depth: float | None, seed: int, index: int
    ) -> Sample:
        rows, _ = load_answers_file(str(self._path()))
        row = rows[index % len(rows)]
        rng = self.rng(seed, index)
        best = row.answers[row.accepted]
        own = [a for i, a in enumerate(row.answers) if i != row.accepted]
        rng.shuffle(own)
        others = [a for r in rows if r is not row for a in r.answers if a != best and a not in own]
        rng.shuffle(others)
        pool = own + others
        key = f"{self.name}|{seed}|{index}|order"

        def build(n: int) -> Parts:
            if n > len(pool):
                raise SourceTooShort(
                    f"answers file {self._path().name}", len(pool) + 1, n + 1,
                    "answers for this length; give a file with more answers or ask for a "
                    "shorter length.",
                )  # fmt: skip
            shown = [best, *pool[:n]]
            random.Random(f"{key}|{n}").shuffle(shown)
            at = shown.index(best) + 1
            context = "".join(f"A{i + 1}:\n\n{a}\n\n" for i, a in enumerate(shown))
            return Parts(
                "Find the most helpful answer to the question below. Each answer begins with "
                "its designation: 'A' and a number (e.g. A4).\n\nThe question is given below.\n"
                f"{row.question}\n\nPossible answers are given below.\n",
                context,
                "Now the answers are over, please decide which answer is the most helpful one to "
                "the question. You must give me only the designation of the MOST helpful answer.",
                "\nAnswer:",
                [f"A{at}"],
                {"answers": len(shown)},
            )

        per = sum(len(fmt.encode(f"A9:\n\n{a}\n\n")) for a in pool[:8]) / max(1, len(pool[:8]))
        parts, prompt, ids = fit_ruler(self, fmt, length, build, per)
        return self.make_sample(
            fmt, parts, prompt, ids, length, None, seed, index, self.max_new_tokens
        )

    def score(self, sample: Sample, output: str) -> float:
        got = extract_designation(output, int(sample.meta["answers"]))
        return 1.0 if got == sample.expected[0] else 0.0
