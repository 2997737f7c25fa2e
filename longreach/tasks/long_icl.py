"""Long in-context learning with extreme label spaces, after LongICLBench (Li et al., 2024,
"Long-context LLMs Struggle with Long In-context Learning").

Demonstrations come from a labelled file (JSON lines ``{"text", "label"}``) in rounds: each
round adds one demonstration per label, round-robin in file order (LongICLBench's
``select_data``); the number of whole rounds that fit sets the length. The test item is row
``index`` of the file (modulo its rows), never one of its own demonstrations. Score: the first
line of the output, lower-cased and stripped, equals the label (LongICLBench's exact match).
``labels=K`` keeps the first K labels of the file (default: all), to measure accuracy against
the number of labels as well as the length.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from longreach.errors import LongreachError
from longreach.tasks.base import Parts, PromptFormat, Sample, Task
from longreach.tasks.ruler import SourceTooShort, fit_ruler

SHIPPED = Path(__file__).parent / "data" / "icl_intents_tiny.jsonl"


@functools.lru_cache(maxsize=8)
def load_labelled(path: str) -> tuple[tuple[tuple[str, str], ...], str]:
    """(text, label) rows and the file's digest; a bad file is a one-line error."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise LongreachError(
            f"cannot read labelled file {p} ({exc.strerror or exc}); check the path."
        ) from None
    rows = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"labelled file {p} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise LongreachError(f"{where} is not JSON; write one JSON object per line.") from None
        if not isinstance(row, dict) or not all(
            isinstance(row.get(f), str) and row[f].strip() for f in ("text", "label")
        ):
            raise LongreachError(
                f"{where} needs a non-empty string 'text' and a non-empty string 'label'."
            )
        rows.append((row["text"].strip(), row["label"].strip()))
    if len({label for _, label in rows}) < 2:
        raise LongreachError(
            f"labelled file {p} has fewer than two labels; in-context classification needs more."
        )
    return tuple(rows), hashlib.sha256(raw).hexdigest()[:10]


@dataclass
class LongIcl(Task):
    """Classify one text after rounds of one demonstration per label (``file``, ``labels``)."""

    file: str = "tiny"
    labels: int = 0

    name: ClassVar[str] = "long-icl"
    summary: ClassVar[str] = (
        "LongICLBench: extreme-label classification after rounds of one demo per label"
    )
    uses_depth: ClassVar[bool] = False
    max_new_tokens: ClassVar[int] = 24
    # Results are also reported per number of labels (the cells' ``meta.labels``).
    reported_by: ClassVar[str] = "labels"

    def _path(self) -> Path:
        return (SHIPPED if self.file == "tiny" else Path(self.file).expanduser()).resolve()

    def _rows(self) -> list[tuple[str, str]]:
        rows, _ = load_labelled(str(self._path()))
        names = list(dict.fromkeys(label for _, label in rows))
        if self.labels:
            if not 2 <= self.labels <= len(names):
                raise LongreachError(
                    f"long-icl labels={self.labels} is out of range; {self._path().name} has "
                    f"{len(names)} labels (use 2 to {len(names)}, or 0 for all)."
                )
            keep = set(names[: self.labels])
            return [r for r in rows if r[1] in keep]
        return list(rows)

    def validate(self) -> None:
        self._rows()

    def params(self) -> dict[str, Any]:
        name = (
            "tiny"
            if self.file == "tiny"
            else f"{self._path().name}@{load_labelled(str(self._path()))[1]}"
        )
        return {"file": name, "labels": self.labels}

    def generate(
        self, fmt: PromptFormat, length: int, depth: float | None, seed: int, index: int
    ) -> Sample:
        rows = self._rows()
        test = index % len(rows)
        text, label = rows[test]
        names = list(dict.fromkeys(lab for _, lab in rows))
        pools = {lab: [r for i, r in enumerate(rows) if r[1] == lab and i != test] for lab in names}
        rounds = min(len(p) for p in pools.values())

        def build(n: int) -> Parts:
            if n > rounds:
                raise SourceTooShort(
                    f"labelled file {self._path().name}",
                    rounds,
                    n,
                    "rounds of one demonstration per label for this length; give more "
                    "examples per label or ask for a shorter length.",
                )
            demos = [pools[lab][r] for r in range(n) for lab in names]
            context = "".join(f"text: {t}\nlabel: {lab}\n" for t, lab in demos)
            return Parts(
                "Given a text, please predict its label. The predicted answer must come from "
                "the demonstration examples with the exact format. The examples are as "
                "follows: \n",
                context,
                f"text: {text}\n",
                "label:",
                [label],
                {"rounds": n, "labels": len(names), "demonstrations": len(demos)},
            )

        per = len(
            fmt.encode("".join(f"text: {t}\nlabel: {lab}\n" for t, lab in rows[: len(names)]))
        )
        parts, prompt, ids = fit_ruler(self, fmt, length, build, per)
        if parts.meta["rounds"] < 1:
            raise LongreachError(
                f"length {length} is too short for task 'long-icl': not one round of "
                f"{len(names)} demonstrations fits; ask for a longer length or fewer labels."
            )
        return self.make_sample(
            fmt, parts, prompt, ids, length, None, seed, index, self.max_new_tokens
        )

    def score(self, sample: Sample, output: str) -> float:
        first = output.strip().split("\n", 1)[0].strip().lower() if output.strip() else ""
        return 1.0 if first == sample.expected[0].lower() else 0.0
