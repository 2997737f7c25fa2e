"""Shared plumbing of the tasks that hide statements in haystack text."""

from __future__ import annotations

import random
from collections.abc import Callable

from longreach.tasks.base import Parts, PromptFormat, Sample, Task, fit_to_length
from longreach.tasks.haystack import HaystackPiece, resolve_haystack, tokenized_haystack


def spread_depths(depth: float, count: int) -> list[float]:
    """``count`` depths from ``depth`` towards the end: d + i·(1 − d)/count, i = 0 .. count−1."""
    return [depth + i * (1.0 - depth) / count for i in range(count)]


def generate_in_haystack(
    task: Task,
    fmt: PromptFormat,
    length: int,
    depth: float | None,
    seed: int,
    index: int,
    make_parts: Callable[[HaystackPiece], Parts],
    max_new_tokens: int,
) -> Sample:
    """Fit ``make_parts(piece)`` to ``length`` tokens by choosing how much haystack the piece holds."""
    hay = tokenized_haystack(resolve_haystack(task.haystack), fmt.tokenizer)  # type: ignore[attr-defined]
    # The start depends on (seed, index) only, so all depths of a sample share their prefix.
    start = hay.start_token(random.Random(f"{task.name}|{seed}|{index}|start"), length)
    parts, prompt, ids = fit_to_length(
        lambda n: make_parts(hay.piece(start, n)), fmt, length, task.spec()
    )
    return task.make_sample(fmt, parts, prompt, ids, length, depth, seed, index, max_new_tokens)
