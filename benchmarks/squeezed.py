"""Squeezed Attention: many questions on one document, against full attention on the same cache.

One document of ``--length`` tokens (filler sentences with ``--questions`` named 5-digit pass
keys at evenly spread depths) is prefilled once. Each question ("What is the pass key of
NAME?") is then asked on the cache cropped back to the document and answered greedily:

- **full**: the unmodified model over the whole cached document;
- **squeezed:threshold=T**: the document's keys clustered at the first question (its
  k-means time reported apart), each question reading only the clusters it scores.

``re-prefill`` is the cost without a shared cache: every question pays the document's
prefill again (the full side's measured prefill time x questions + its question times: the
same work repeated, so it is counted rather than run 20 times). Printed per
side: accuracy, the share of context keys read (``reads.share``), the first question's
clustering seconds, the seconds for all questions, and the total against re-prefilling.

    python benchmarks/squeezed.py --length 2k --questions 5 --thresholds 0.7,0.9
    python benchmarks/squeezed.py --length 32k --questions 20 --thresholds 0.7,0.9 --kmeans faiss
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

import longreach as lr
from longreach import compat
from longreach.methods import squeezed as sq

NAMES = [
    "Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jun",
    "Kofi", "Lena", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tariq",
    "Ulla", "Vikram", "Wanda", "Xavier", "Yusuf", "Zora",
]  # fmt: skip
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


def _length(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def document(tok, length: int, names: list[str], seed: int) -> tuple[torch.Tensor, dict]:
    rng = random.Random(seed)
    keys = {name: str(rng.randint(10000, 99999)) for name in names}
    filler = tok(FILLER, add_special_tokens=False).input_ids
    needles = [
        tok(f" The pass key of {n} is {k}. Remember it. ", add_special_tokens=False).input_ids
        for n, k in keys.items()
    ]
    body = length - sum(map(len, needles))
    ids = (filler * (body // len(filler) + 1))[:body]
    for i, needle in reversed(list(enumerate(needles))):
        at = int(body * (i + 0.5) / len(needles))
        ids[at:at] = needle
    return torch.tensor([ids]), keys


def ask(model, tok, cache, past: int, name: str) -> str:
    compat.crop_cache(cache, past)
    question = tok(
        f"\n\nWhat is the pass key of {name}? The pass key of {name} is",
        add_special_tokens=False,
        return_tensors="pt",
    ).input_ids
    state = lr.prefill(model, question, cache=cache, past=past)
    return tok.decode(lr.greedy(model, state, 6)[0])


def side(model, tok, ids, keys, spec: str | None) -> dict:
    seconds = {"kmeans": 0.0}
    real = sq.kmeans

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            seconds["kmeans"] += time.perf_counter() - t

    sq.kmeans = timed
    handle = lr.extend(model, spec) if spec else None
    try:
        t = time.perf_counter()
        doc = lr.prefill(model, ids, chunk=2048)
        prefill_s = time.perf_counter() - t
        if handle is not None:
            handle.method.reads.reset()
        right, times = 0, []
        for name, key in keys.items():
            t = time.perf_counter()
            answer = ask(model, tok, doc.cache, doc.length, name)
            times.append(time.perf_counter() - t)
            right += key in answer
        share = handle.method.reads.share if handle is not None else 1.0
    finally:
        sq.kmeans = real
        if handle is not None:
            handle.remove()
    return dict(
        prefill=prefill_s, questions=sum(times), accuracy=right / len(keys), share=share,
        kmeans=seconds["kmeans"],
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", default="2k")
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--thresholds", default="0.7,0.9")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--kmeans", default="sklearn", help="squeezed's k-means library: sklearn or faiss"
    )
    parser.add_argument("--out", default=None, help="append each side's row to this JSONL file")
    args = parser.parse_args()
    if not 1 <= args.questions <= len(NAMES):
        parser.error(f"--questions must be between 1 and {len(NAMES)}")
    torch.set_num_threads(args.threads)
    model, tok = lr.load(args.model)
    ids, keys = document(tok, _length(args.length), NAMES[: args.questions], args.seed)
    print(f"{args.model}: document of {ids.shape[1]} tokens, {len(keys)} questions")
    with torch.no_grad():
        model(ids[:, :256])  # warm-up: the first side's prefill must not pay the first call
        full = side(model, tok, ids, keys, None)
        rows = [("full", full)]
        for t in args.thresholds.split(","):
            spec = f"squeezed:threshold={t},kmeans={args.kmeans}"
            rows.append((spec, side(model, tok, ids, keys, spec)))
    reprefill = full["prefill"] * len(keys) + full["questions"]
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            for label, r in rows:
                f.write(json.dumps({
                    "model": args.model, "tokens": ids.shape[1], "n_questions": len(keys),
                    "side": label, "threads": args.threads, "reprefill_s": round(reprefill, 2),
                    **{f"{k}_s" if k in ("prefill", "questions", "kmeans") else k: round(v, 4) for k, v in r.items()},
                }) + "\n")  # fmt: skip
    print(f"re-prefill: {reprefill:.1f} s ({full['prefill']:.1f} s per document prefill)")
    print("side | accuracy | share read | k-means s | questions s | total s | x re-prefill")
    for label, r in rows:
        total = r["prefill"] + r["questions"]
        print(
            f"{label} | {r['accuracy']:.2f} | {r['share']:.3f} | {r['kmeans']:.1f} | "
            f"{r['questions']:.1f} | {total:.1f} | {reprefill / total:.2f}"
        )


if __name__ == "__main__":
    main()
