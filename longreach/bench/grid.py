"""The benchmark grid: parsing lengths and depths, and the run configuration."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from longreach.errors import LongreachError

_LENGTH = re.compile(r"^(\d+(?:\.\d+)?)([kKmM]?)$")


def parse_length(text: str) -> int:
    """``"2k"`` -> 2048, ``"1.5k"`` -> 1536, ``"1m"`` -> 1048576, ``"3000"`` -> 3000 (tokens)."""
    match = _LENGTH.match(text.strip())
    if not match:
        raise LongreachError(
            f"malformed length {text.strip()!r}; write token counts like 512, 2k, 8k, 1.5k."
        )
    number, unit = float(match.group(1)), match.group(2).lower()
    value = number * {"": 1, "k": 1024, "m": 1024 * 1024}[unit]
    if value < 1 or not value.is_integer():
        raise LongreachError(f"length {text.strip()!r} is not a whole positive number of tokens.")
    return int(value)


def parse_lengths(text: str | list[str]) -> list[int]:
    """A comma-separated list of lengths, sorted, duplicates dropped."""
    items = text if isinstance(text, list) else [text]
    parts = [p for item in items for p in item.split(",") if p.strip()]
    if not parts:
        raise LongreachError("no lengths given; write e.g. --lengths 2k,8k,16k.")
    return sorted({parse_length(p) for p in parts})


def parse_depths(text: str | list[str]) -> list[float]:
    """A comma-separated list of depths in [0, 1] (0 = start of the context, 1 = its end)."""
    items = text if isinstance(text, list) else [text]
    parts = [p.strip() for item in items for p in item.split(",") if p.strip()]
    if not parts:
        raise LongreachError("no depths given; write e.g. --depths 0.1,0.5,0.9.")
    depths = []
    for p in parts:
        try:
            value = float(p)
        except ValueError:
            raise LongreachError(
                f"malformed depth {p!r}; write fractions like 0.1,0.5,0.9."
            ) from None
        if not 0.0 <= value <= 1.0:
            raise LongreachError(
                f"depth {p} is outside [0, 1]; 0 puts the needle at the start of the context, 1 at its end."
            )
        depths.append(value)
    return sorted(set(depths))


def format_length(n: int) -> str:
    """2048 -> '2k', 1536 -> '1.5k', 3000 -> '3000', 2**20 -> '1m'."""
    if n >= 1024 * 1024 and (n * 2) % (1024 * 1024) == 0:
        return f"{n / (1024 * 1024):g}m"
    if n >= 1024 and (n * 2) % 1024 == 0:
        k = n / 1024
        return f"{k:g}k"
    return str(n)


@dataclass
class BenchConfig:
    """Everything a bench run needs; stored as JSON with each run."""

    model: str = "smollm2-135m"
    methods: list[str] = field(default_factory=lambda: ["vanilla"])
    tasks: list[str] = field(default_factory=lambda: ["passkey"])
    task_files: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    depths: list[float] = field(default_factory=lambda: [0.5])
    samples: int = 3
    seed: int = 0
    chat: bool = False
    haystack: str | None = None
    db: str = "runs.db"
    dtype: str | None = None
    device: str | None = None
    chunk: int | None = None  # chunked prefill size (tokens); None = one forward
    share_prefix: bool = True
    questions_per_context: int = 1  # >1: one context encoded once, asked this many questions

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise LongreachError(problems[0] + ".")

    def problems(self) -> list[str]:
        """Every problem of the configuration itself, each a sentence without its full stop."""
        out = []
        if self.samples < 1:
            out.append(f"--samples {self.samples} must be at least 1")
        if not self.methods:
            out.append("no method given; pass --method vanilla (repeatable)")
        if not self.tasks and not self.task_files:
            out.append("no task given; pass --task passkey (repeatable) or --task-file")
        if not self.lengths:
            out.append("no lengths given; write e.g. --lengths 2k,8k")
        if any(d < 0 or d > 1 for d in self.depths):
            out.append("depths must lie in [0, 1]")
        if self.questions_per_context < 1:
            out.append(f"--questions-per-context {self.questions_per_context} must be at least 1")
        if self.chunk is not None and self.chunk < 1:
            out.append(f"--chunk {self.chunk} must be a positive number of tokens")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
