"""Local benchmark files in LongBench's and RULER's jsonl formats (``--task-file FILE.jsonl``).

- LongBench (Bai et al., 2023): rows ``{"context", "input", "answers", "dataset"?, ...}``.
  Prompt: LongBench's generic reading-comprehension template. Metric: token F1 (``qa_f1``)
  for its QA datasets and for rows without a dataset name, else ``contains``.
- RULER (Hsieh et al., 2024): rows ``{"input", "outputs", "answer_prefix"?, ...}`` where the
  input already holds the context. Metric: ``contains_all`` (RULER's ``string_match_all``).

RULER's answer prefix is
appended without its trailing space. A row longer than the requested length is truncated in the middle of its context, keeping the
first and the last halves, as LongBench's own prediction script does; a shorter row is used
as is (every cell stores its actual token count). ``metric=`` overrides the metric.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from longreach.errors import LongreachError
from longreach.tasks.base import Parts, PromptFormat, Sample, Task, fit_to_length
from longreach.tasks.scorers import SCORERS

LONGBENCH_QA = {
    "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa",
    "musique", "triviaqa",
}  # fmt: skip


def _check_row(row: dict[str, Any], where: str) -> None:
    """Refuse rows that would run but measure nothing: no text where text belongs, no answer."""
    for name in ("input", "context", "answer_prefix"):
        if name in row and not isinstance(row[name], str):
            raise LongreachError(
                f"{where}: {name!r} is {json.dumps(row[name])[:40]}, not a string; write the text "
                "as a JSON string."
            )
    key = "answers" if "answers" in row else "outputs"
    answers = row[key]
    values = answers if isinstance(answers, list) else [answers]
    if not values or any(
        not isinstance(a, (str, int, float)) or isinstance(a, bool) for a in values
    ):
        raise LongreachError(
            f"{where}: {key!r} must be a non-empty list of strings (got "
            f"{json.dumps(answers)[:40]}); a row without an answer is always scored 0."
        )
    if not any(str(a).strip() for a in values):
        raise LongreachError(f"{where}: every entry of {key!r} is empty; give the expected answer.")


@dataclass
class FileTask(Task):
    """The rows of one jsonl file; the sample index is the row number."""

    path: str = ""
    metric_name: str = ""
    max_new_tokens: int = 32
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)
    digest: str = ""

    name: ClassVar[str] = "file"
    summary: ClassVar[str] = "rows of a local LongBench or RULER jsonl file"
    uses_depth: ClassVar[bool] = False

    @classmethod
    def load(cls, path: str | Path, metric: str = "", max_new_tokens: int = 32) -> FileTask:
        p = Path(path).expanduser()
        try:
            raw = p.read_bytes()
        except OSError as exc:
            raise LongreachError(
                f"cannot read task file {p} ({exc.strerror or exc}); check the path."
            ) from None
        rows = []
        for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise LongreachError(
                    f"task file {p} line {number} is not JSON; a task file has one JSON object per line."
                ) from None
            if (
                not isinstance(row, dict)
                or "input" not in row
                or not ("answers" in row or "outputs" in row)
            ):
                raise LongreachError(
                    f"task file {p} line {number} is neither LongBench (context, input, answers) "
                    "nor RULER (input, outputs) format."
                )
            _check_row(row, f"task file {p} line {number}")
            rows.append(row)
        if not rows:
            raise LongreachError(f"task file {p} has no rows.")
        if metric and metric not in SCORERS:
            raise LongreachError(
                f"unknown metric {metric!r} for {p.name}; choose from {', '.join(SCORERS)}."
            )
        task = cls(
            str(p.resolve()), metric, max_new_tokens, rows, hashlib.sha256(raw).hexdigest()[:10]
        )
        task.validate()
        return task

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise LongreachError("a task file's max_new_tokens must be at least 1.")

    def spec(self) -> str:
        opts = f",metric={self.metric_name}" if self.metric_name else ""
        return (
            f"file:{Path(self.path).name}@{self.digest}:max_new_tokens={self.max_new_tokens}{opts}"
        )

    def params(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "metric": self.metric_name,
            "max_new_tokens": self.max_new_tokens,
        }

    def scorer_for(self, row: dict[str, Any]) -> str:
        if self.metric_name:
            return self.metric_name
        if "outputs" in row:
            return "contains_all"
        dataset = str(row.get("dataset", "")).lower()
        return "qa_f1" if not dataset or dataset in LONGBENCH_QA else "contains"

    @staticmethod
    def _answers(row: dict[str, Any]) -> list[str]:
        answers = row.get("answers", row.get("outputs", []))
        if isinstance(answers, str):
            answers = [answers]
        return [str(a) for a in answers]

    def generate(
        self, fmt: PromptFormat, length: int, depth: float | None, seed: int, index: int
    ) -> Sample:
        row = self.rows[index]
        expected = self._answers(row)
        if "outputs" in row:  # RULER: the input is the whole prompt
            head, context, tail = "", str(row["input"]), ""
            # RULER's prefixes end in a space; a prompt ending in a space hurts BPE models.
            prefix = str(row.get("answer_prefix", "")).rstrip()
            if prefix and not prefix.startswith((" ", "\n")):
                prefix = " " + prefix
        else:
            head = "Read the following text and answer briefly.\n\n"
            context = str(row.get("context", ""))
            tail = (
                "\n\nNow, answer the question based on the above text, only give me the answer "
                f"and do not output any other words.\n\nQuestion: {row['input']}\n"
            )
            prefix = "Answer:"
        meta = {"scorer": self.scorer_for(row), "row": index}
        ctx_ids = list(fmt.tokenizer(context, add_special_tokens=False, verbose=False)["input_ids"])

        def build(n: int) -> Parts:
            if n >= len(ctx_ids):
                text = context
            else:  # LongBench's middle truncation
                half = n // 2
                text = fmt.tokenizer.decode(ctx_ids[:half]) + fmt.tokenizer.decode(
                    ctx_ids[len(ctx_ids) - (n - half) :]
                )
            return Parts(head, text, tail, prefix, expected, dict(meta, truncated=n < len(ctx_ids)))

        full = build(len(ctx_ids))
        prompt = fmt.render(full)
        ids = fmt.encode(prompt)
        if len(ids) > length:
            full, prompt, ids = fit_to_length(build, fmt, length, self.spec())
        return self.make_sample(
            fmt, full, prompt, ids, length, depth, seed, index, self.max_new_tokens
        )

    def score(self, sample: Sample, output: str) -> float:
        return SCORERS[sample.meta["scorer"]](output, sample.expected)
