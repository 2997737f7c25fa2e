"""Perplexity versus length: the loss on the same last ``last`` tokens of real text while the
context before them grows, so that every length scores the very same tokens.

A sample is the ``length`` tokens that end at a position chosen from (seed, index) in the
last quarter of the haystack (moved later only when the haystack before it is too short).
The runner computes exp(mean negative log-likelihood) over the last ``last`` tokens; no
text is generated. Perplexity can stay flat while retrieval collapses, so the report shows
both for each method.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import ClassVar

from longreach.errors import LongreachError
from longreach.tasks.base import RAW, PromptFormat, Sample, Task
from longreach.tasks.haystack import HaystackTooShort, resolve_haystack, tokenized_haystack

DEFAULT_LAST = 256


@dataclass
class Perplexity(Task):
    """Perplexity of the last ``last`` tokens of ``length`` tokens of ``haystack`` text."""

    last: int | None = None  # None: 256, at most a quarter of the trained length
    haystack: str = "pg"

    name: ClassVar[str] = "perplexity"
    summary: ClassVar[str] = "perplexity of the same last N tokens as the context before them grows"
    uses_depth: ClassVar[bool] = False
    uses_haystack: ClassVar[bool] = True
    metric: ClassVar[str] = "perplexity"

    def validate(self) -> None:
        if self.last is not None and self.last < 1:
            raise LongreachError(f"perplexity last={self.last} must be at least 1 token.")

    def for_model(self, trained_length: int | None) -> Perplexity:
        """``last`` defaults to 256 tokens, or a quarter of a shorter trained length, so that
        the trained length itself has context before the scored tokens."""
        if self.last is not None:
            return self
        last = DEFAULT_LAST if not trained_length else min(DEFAULT_LAST, trained_length // 4)
        return dataclasses.replace(self, last=max(1, last))

    @property
    def scored(self) -> int:
        return self.last if self.last is not None else DEFAULT_LAST

    def generate(
        self, fmt: PromptFormat, length: int, depth: float | None, seed: int, index: int
    ) -> Sample:
        prefix = fmt.special_prefix()
        body = length - len(prefix)
        if body <= self.scored:
            raise LongreachError(
                f"length {length} is too short for perplexity with last={self.scored}: the scored "
                "tokens need some context before them; ask for a longer length or a smaller last."
            )
        hay = tokenized_haystack(resolve_haystack(self.haystack), fmt.tokenizer)
        if hay.source.synthetic:
            hay.piece(0, body)  # grows the repeated filler
        total = hay.n_tokens
        if body > total:
            raise HaystackTooShort(hay.source.key(), total, body)
        rng = random.Random(f"{self.name}|{seed}|{index}")
        end = max(body, total - rng.randrange(0, max(1, total // 4)))
        ids = prefix + hay.ids[end - body : end].tolist()
        text = fmt.tokenizer.decode(ids)
        return Sample(
            task=self.spec(),
            length=length,
            depth=None,
            seed=seed,
            index=index,
            prompt_format=RAW,
            prompt=text,
            input_ids=ids,
            expected=[],
            max_new_tokens=0,
            metric=self.metric,
            meta={
                "scored_tokens": self.scored,
                "end_token": end,
                "context_chars": len(text),
                "context_words": len(text.split()),
            },
        )

    def score(self, sample: Sample, output: str) -> float:
        raise TypeError("perplexity is scored from the model's logits by the runner, not from text")

    def is_complete(self, sample: Sample, output: str) -> bool:
        return True
