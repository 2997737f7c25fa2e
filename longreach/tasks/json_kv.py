"""Tasks over a JSON object of random UUID key-value pairs (the filler is the object itself).

- ``kv-retrieval``: Liu et al. (2023, "Lost in the Middle") — return the value of one key; the
  queried pair sits at ``depth``.
- ``threading``: Needle Threading (Roberts et al., 2024) — a chain of ``k`` pairs where each
  value is the next key; starting from the first key, return the last value. Hops sit at
  depths d + j·(1 − d)/k (a forward thread).
- ``multi-threading``: ``threads`` chains interleaved in the same object and asked together;
  score = fraction of final values returned.

UUID counts in tokens differ a lot between tokenizers (Roberts et al. report characters for
that reason); each cell stores the context's characters next to its tokens.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from typing import ClassVar

from longreach.errors import LongreachError
from longreach.tasks.base import Parts, PromptFormat, Sample, Task, fit_to_length, uuids_in
from longreach.tasks.scorers import contains, contains_all
from longreach.tasks.text import spread_depths


def new_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def render_object(pairs: list[tuple[str, str]]) -> str:
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in pairs]
    return "{\n" + ",\n".join(lines) + "\n}"


def place(filler: list[tuple[str, str]], items: list[tuple[str, str]], depths: list[float]):
    """Insert ``items`` into the list of filler pairs at the given fractional depths."""
    slots = [round(d * len(filler)) for d in depths]
    out: list[tuple[str, str]] = []
    order = sorted(range(len(items)), key=lambda i: (slots[i], i))
    last = 0
    for i in order:
        out.extend(filler[last : slots[i]])
        out.append(items[i])
        last = slots[i]
    out.extend(filler[last:])
    return out


def distractors(seed_text: str, n: int) -> list[tuple[str, str]]:
    """n random pairs; the first m of build(n) equal those of build(m) (stable while fitting)."""
    rng = random.Random(seed_text)
    return [(new_uuid(rng), new_uuid(rng)) for _ in range(n)]


class _JsonTask(Task):
    def fit(self, fmt, length, depth, seed, index, build, max_new_tokens) -> Sample:
        # A pair "  "k": "v",\n" is about 40-55 tokens with BPE tokenizers, 80 with bytes.
        parts, prompt, ids = fit_to_length(build, fmt, length, self.spec(), tokens_per_unit=45.0)
        return self.make_sample(fmt, parts, prompt, ids, length, depth, seed, index, max_new_tokens)


@dataclass
class KvRetrieval(_JsonTask):
    """Return the value of one key of a JSON object of UUID pairs (Liu et al., 2023)."""

    name: ClassVar[str] = "kv-retrieval"
    summary: ClassVar[str] = "a JSON object of UUID pairs; return the value of one key"

    def generate(
        self, fmt: PromptFormat, length: int, depth: float | None, seed: int, index: int
    ) -> Sample:
        rng = self.rng(seed, index)
        key, value = new_uuid(rng), new_uuid(rng)

        def build(n: int) -> Parts:
            pairs = place(
                distractors(f"{self.name}|{seed}|{index}|pairs", n), [(key, value)], [depth or 0.0]
            )
            return Parts(
                "Extract the value corresponding to the specified key in the JSON object below.\n\n"
                "JSON data:\n",
                render_object(pairs),
                f'\n\nKey: "{key}"\n',
                "Corresponding value:",
                [value],
                {"pairs": len(pairs)},
            )

        return self.fit(fmt, length, depth, seed, index, build, 40)

    def score(self, sample: Sample, output: str) -> float:
        return contains(output, sample.expected)

    def is_complete(self, sample: Sample, output: str) -> bool:
        return bool(uuids_in(output)) or super().is_complete(sample, output)


_THREAD_INSTRUCTION = (
    "Below is a JSON object of key-value pairs whose keys and values are UUIDs. A value may "
    "itself be a key of the object: following such values from key to key forms a thread.\n\n"
)


def _threads(rng: random.Random, count: int, hops: int) -> list[list[str]]:
    return [[new_uuid(rng) for _ in range(hops + 1)] for _ in range(count)]


@dataclass
class Threading(_JsonTask):
    """Follow a thread of ``k`` UUID pointers to its final value (Roberts et al., 2024)."""

    k: int = 3

    name: ClassVar[str] = "threading"
    summary: ClassVar[str] = (
        "follow a chain of k UUID pointers to the final value (Needle Threading)"
    )

    def validate(self) -> None:
        if not 1 <= self.k <= 64:
            raise LongreachError(f"threading k={self.k} is out of range; use 1 to 64 hops.")

    def generate(
        self, fmt: PromptFormat, length: int, depth: float | None, seed: int, index: int
    ) -> Sample:
        (chain,) = _threads(self.rng(seed, index), 1, self.k)
        hops = [(chain[j], chain[j + 1]) for j in range(self.k)]

        def build(n: int) -> Parts:
            pairs = place(
                distractors(f"{self.name}|{seed}|{index}|pairs", n),
                hops,
                spread_depths(depth or 0.0, self.k),
            )
            return Parts(
                _THREAD_INSTRUCTION,
                render_object(pairs),
                f'\n\nStart at the key "{chain[0]}" and follow its thread until a value is not a '
                "key of the object. What is that final value?",
                " The final value is",
                [chain[-1]],
                {"pairs": len(pairs), "hops": self.k},
            )

        return self.fit(fmt, length, depth, seed, index, build, 40)

    def score(self, sample: Sample, output: str) -> float:
        return contains(output, sample.expected)

    def is_complete(self, sample: Sample, output: str) -> bool:
        return bool(uuids_in(output)) or super().is_complete(sample, output)


@dataclass
class MultiThreading(_JsonTask):
    """``threads`` threads of ``k`` hops interleaved in one object, all asked in one question."""

    k: int = 3
    threads: int = 2

    name: ClassVar[str] = "multi-threading"
    summary: ClassVar[str] = "several interleaved UUID threads asked together; fraction followed"

    def validate(self) -> None:
        if not 1 <= self.k <= 64 or not 1 <= self.threads <= 16:
            raise LongreachError(
                f"multi-threading k={self.k}, threads={self.threads} is out of range; use 1-64 hops and 1-16 threads."
            )

    def generate(
        self, fmt: PromptFormat, length: int, depth: float | None, seed: int, index: int
    ) -> Sample:
        chains = _threads(self.rng(seed, index), self.threads, self.k)
        # Hop j of thread t is item j·threads + t, so the threads interleave.
        items = [(c[j], c[j + 1]) for j in range(self.k) for c in chains]
        depths = spread_depths(depth or 0.0, len(items))
        starts = ", ".join(f'"{c[0]}"' for c in chains)

        def build(n: int) -> Parts:
            pairs = place(distractors(f"{self.name}|{seed}|{index}|pairs", n), items, depths)
            return Parts(
                _THREAD_INSTRUCTION,
                render_object(pairs),
                f"\n\nFor each of the keys {starts}, follow its thread until a value is not a key "
                "of the object. What are the final values, in the same order?",
                " The final values are",
                [c[-1] for c in chains],
                {"pairs": len(pairs), "hops": self.k, "threads": self.threads},
            )

        return self.fit(fmt, length, depth, seed, index, build, 40 * self.threads)

    def score(self, sample: Sample, output: str) -> float:
        return contains_all(output, sample.expected)

    def is_complete(self, sample: Sample, output: str) -> bool:
        return len(uuids_in(output)) >= self.threads or super().is_complete(sample, output)
