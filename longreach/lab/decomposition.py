"""Dataset Decomposition and the concat-and-chunk baseline.

Dataset Decomposition (Pouransari et al., 2024, "Dataset Decomposition: Faster LLM
Training with Variable Sequence Length Curriculum", arXiv 2405.13226): every document is
cut into sequences whose lengths are powers of two, each sequence drawn from a single
document, and the sequences are grouped into buckets by length. Every optimisation step
samples one bucket (with a length curriculum) and takes as many of its sequences as fill
a constant token budget, so the batch size varies with the length, no sequence ever
attends across documents, and short sequences cost short attention.

Two choices of ours, where the paper leaves room:

- every sequence starts with ``<s>``, as every prompt does at inference, so a sequence of
  bucket length ``l`` holds ``l - 1`` document tokens; a document of ``n`` tokens gives
  ``n // (L - 1)`` sequences of the longest length ``L`` and its remainder is decomposed
  by the binary digits of ``remainder + 1`` into shorter buckets (pieces shorter than
  ``min_len`` are dropped);
- the curriculum is a cyclic "grow" schedule (the paper's best were cyclic grow curricula,
  section 3.2): within each of ``cycles`` equal cycles the odds of bucket ``i`` (of ``B``,
  short to long) are its token count times ``sharpness ** ((2u - 1) * i / (B - 1))`` for the
  progress ``u`` in [0, 1) through the cycle, so short buckets dominate a cycle's start
  and long ones its end.

The baseline, concat-and-chunk, concatenates all documents (each starting with ``<s>``)
in a seeded random order and cuts the stream into rows of the trained length: rows start
mid-document and attend across document boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bucket_lengths(max_len: int, min_len: int) -> list[int]:
    """Powers of two from ``min_len`` to ``max_len`` (both powers of two)."""
    for name, v in (("max_len", max_len), ("min_len", min_len)):
        if v < 2 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 2, got {v}")
    out, n = [], min_len
    while n <= max_len:
        out.append(n)
        n *= 2
    return out


def decompose(doc: np.ndarray, bos_id: int, max_len: int, min_len: int) -> list[np.ndarray]:
    """Cut one document (token ids without ``<s>``) into ``<s>``-led power-of-two sequences."""
    pieces: list[np.ndarray] = []
    step = max_len - 1
    n_long = len(doc) // step
    for i in range(n_long):
        pieces.append(doc[i * step : (i + 1) * step])
    pos = n_long * step
    length = max_len // 2
    while length >= min_len:
        if len(doc) - pos >= length - 1:
            pieces.append(doc[pos : pos + length - 1])
            pos += length - 1
        length //= 2
    return [np.concatenate([[bos_id], p]).astype(np.int64) for p in pieces]


def build_buckets(
    docs: Sequence[np.ndarray],
    bos_id: int,
    max_len: int,
    min_len: int,
    extra: Sequence[np.ndarray] = (),
) -> dict[int, np.ndarray]:
    """``{length: array (n, length)}`` from ``docs`` decomposed plus ``extra`` ready sequences.

    ``extra`` holds sequences that already start with ``<s>`` and have a bucket length
    (the synthetic retrieval samples, written at those lengths).
    """
    rows: dict[int, list[np.ndarray]] = {n: [] for n in bucket_lengths(max_len, min_len)}
    for doc in docs:
        for piece in decompose(doc, bos_id, max_len, min_len):
            rows[len(piece)].append(piece)
    for seq in extra:
        if len(seq) not in rows:
            raise ValueError(f"sequence of length {len(seq)} fits no bucket {sorted(rows)}")
        rows[len(seq)].append(np.asarray(seq, dtype=np.int64))
    return {n: np.stack(r) for n, r in rows.items() if r}


def grow_curriculum(
    bucket_tokens: dict[int, int], progress: float, cycles: int = 4, sharpness: float = 8.0
) -> dict[int, float]:
    """Sampling probability of each bucket at ``progress`` in [0, 1] through training."""
    lengths = sorted(bucket_tokens)
    u = (progress * cycles) % 1.0
    span = max(1, len(lengths) - 1)
    odds = {
        n: bucket_tokens[n] * sharpness ** ((2 * u - 1) * i / span) for i, n in enumerate(lengths)
    }
    total = sum(odds.values())
    return {n: o / total for n, o in odds.items()}


def dd_batch(
    buckets: dict[int, np.ndarray],
    rng: np.random.Generator,
    progress: float,
    token_budget: int,
    cycles: int = 4,
    sharpness: float = 8.0,
) -> np.ndarray:
    """One Dataset Decomposition batch: ``token_budget // l`` sequences of one bucket ``l``."""
    probs = grow_curriculum(
        {n: b.size for n, b in buckets.items()}, progress, cycles=cycles, sharpness=sharpness
    )
    lengths = sorted(probs)
    length = lengths[int(rng.choice(len(lengths), p=[probs[n] for n in lengths]))]
    rows = buckets[length]
    idx = rng.integers(0, len(rows), max(1, token_budget // length))
    return rows[idx]


def concat_and_chunk(
    docs: Sequence[np.ndarray], bos_id: int, seq_len: int, rng: np.random.Generator
) -> np.ndarray:
    """The baseline: documents in random order, each led by ``<s>``, cut into ``seq_len`` rows."""
    order = rng.permutation(len(docs))
    stream = np.concatenate(
        [np.concatenate([[bos_id], docs[i]]) if docs[i][0] != bos_id else docs[i] for i in order]
    ).astype(np.int64)
    n_rows = len(stream) // seq_len
    return stream[: n_rows * seq_len].reshape(n_rows, seq_len)


def chunk_batch(rows: np.ndarray, rng: np.random.Generator, token_budget: int) -> np.ndarray:
    return rows[rng.integers(0, len(rows), max(1, token_budget // rows.shape[1]))]
