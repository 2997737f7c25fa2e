"""Synthetic retrieval sequences mixed into the lab model's training text.

The samples come from the benchmark harness's own task generators (``longreach.tasks``), so
the lab model is trained on exactly the prompt formats it is measured on:

- ``passkey``: Mohtashami & Jaggi (2023, Landmark Attention) / LM-Infinite, a 5-digit key in
  the repeated "The grass is green. ..." filler;
- ``passkey`` in essay text, ``niah``: RULER's needle sentence "The special magic number for
  <city> is: <7 digits>." in essay text; the essay haystack is the *training* essays only, so
  the held-out essays stay unseen;

Besides these, ``copy_sequence`` writes a random list followed by the same list again: half
of its tokens can only be predicted by copying from the context, which teaches the induction
heads that retrieval needs far sooner than the sparse answers of the tasks above. Half of the
lists are random tokens of the whole vocabulary, half are random numbers. The token lists are
what makes induction heads form: measured on this model (hidden 128, 4 layers, lr 3e-3, 2048
tokens a step, pure copy data), the loss on the copied half fell from 8.3 to 0.01 within 350
steps with random-token lists, while with digit lists alone it was still at 1.83 (against
2.04 on the first half) after 1,000 steps: a digit occurs ~25 times in a list, so "find the
previous occurrence of this token and copy what followed" is ambiguous and gives no signal
to start from. The first checkpoint, trained on digit lists only (3.0M tokens), never copied.
It fits every bucket length.

``kv-retrieval`` is left out: its instructions and one UUID pair alone take about 150 of the
256 tokens of the trained length.

Each sample is written at exactly a bucket length: the prompt (at a random depth), the answer,
then filler up to the length. Samples use seeds from ``TRAIN_SEED_BASE`` on, far from the
seeds the harness and the tests evaluate with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from longreach.tasks import PromptFormat, get_task
from longreach.tasks.haystack import SYNTHETIC_FILLER

TRAIN_SEED_BASE = 1_000_000
# (task spec, share of the samples); "{essays}" is replaced by the training-essay folder.
MIX = (
    ("passkey", 0.45),
    ("passkey:haystack={essays}", 0.20),
    ("niah:haystack={essays}", 0.35),
)
MIN_LENGTH = 128  # the prompts' fixed text alone takes 60-70 tokens


def retrieval_sequence(
    tokenizer,
    rng: np.random.Generator,
    n_tokens: int,
    essays_dir: Path,
    spec: str | None = None,
    seed: int = 0,
) -> list[int]:
    """Token ids of one retrieval sample, exactly ``n_tokens`` long (``<s>`` included).

    The answer ends 1-8 tokens before ``n_tokens``, so it sits at the far end of the window,
    where retrieval is hardest; the rest is filler.
    """
    if spec is None:
        weights = np.array([w for _, w in MIX])
        spec = MIX[int(rng.choice(len(MIX), p=weights / weights.sum()))][0]
    task = get_task(spec.format(essays=essays_dir))
    fmt = PromptFormat(tokenizer)
    index = int(rng.integers(0, 2**31))
    # The answer " 12345." takes 7 tokens (digits are split one per token).
    probe = task.generate(fmt, n_tokens, 0.0, TRAIN_SEED_BASE + seed, index)
    answer = tokenizer(" " + probe.expected[0] + ".", add_special_tokens=False).input_ids
    room = n_tokens - len(answer) - int(rng.integers(1, 9))
    sample = task.generate(fmt, room, float(rng.random()), TRAIN_SEED_BASE + seed, index)
    tail = tokenizer("\n\n" + SYNTHETIC_FILLER * (n_tokens // 8 + 2), add_special_tokens=False)
    ids = list(sample.input_ids) + answer + tail.input_ids
    return ids[:n_tokens]


COPY_INSTRUCTION = "Repeat the list of numbers.\n"


def copy_sequence(tokenizer, rng: np.random.Generator, n_tokens: int) -> list[int]:
    """A random list, then "Again:" and the same list, exactly ``n_tokens`` tokens.

    Half the time the list is random tokens (:func:`token_copy_sequence`), otherwise
    random numbers (:func:`number_copy_sequence`).
    """
    if rng.random() < 0.5:
        return token_copy_sequence(tokenizer, rng, n_tokens)
    return number_copy_sequence(tokenizer, rng, n_tokens)


def _random_tokens(tokenizer, rng: np.random.Generator, count: int) -> list[int]:
    """``count`` uniform random ids of the vocabulary, special tokens (the lowest ids) excluded."""
    special = set(tokenizer.all_special_ids)
    low = max(special) + 1 if special else 0
    return [int(x) for x in rng.integers(low, len(tokenizer), count)]


def token_copy_sequence(tokenizer, rng: np.random.Generator, n_tokens: int) -> list[int]:
    """``<s>``, the instruction, random non-special token ids, "Again:", the same ids."""
    head = tokenizer("Repeat the list of words.\n", add_special_tokens=True).input_ids
    again = tokenizer("\nAgain: ", add_special_tokens=False).input_ids
    count = max(1, (n_tokens - len(head) - len(again)) // 2 + 1)
    body = _random_tokens(tokenizer, rng, count)
    return (head + body + again + body)[:n_tokens]


def repeated_tokens(tokenizer, rng: np.random.Generator, n_tokens: int) -> list[int]:
    """``<s>`` and a random list of non-special tokens repeated until ``n_tokens`` are filled.

    The list is n/4 to n/2 tokens long, so every token after its first period is a copy.
    The training's first steps use only these: the plainest signal for induction heads.
    """
    period = int(rng.integers(max(1, n_tokens // 4), max(2, n_tokens // 2) + 1))
    body = _random_tokens(tokenizer, rng, period)
    reps = -(-(n_tokens - 1) // period)
    return ([tokenizer.bos_token_id] + body * reps)[:n_tokens]


def number_copy_sequence(tokenizer, rng: np.random.Generator, n_tokens: int) -> list[int]:
    """Random numbers, then "Again:" and the same numbers, cut to exactly ``n_tokens`` tokens."""
    numbers: list[str] = []
    while True:
        # Digits are one token each: about n_tokens / 2 characters fill the first half.
        while sum(len(x) + 1 for x in numbers) < n_tokens // 2:
            numbers.append(str(int(rng.integers(10, 10**7))))
        text = " ".join(numbers)
        ids = tokenizer(COPY_INSTRUCTION + text + "\nAgain: " + text + "\n").input_ids
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
        numbers.append(str(int(rng.integers(10, 10**7))))
