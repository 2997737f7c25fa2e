"""Measure the lab model: passkey accuracy and perplexity at several lengths.

A small stand-alone measurement (the benchmark harness in ``longreach.bench`` does the same
with a store and a report); it uses the harness's own passkey generator and scorer, so the
numbers are the harness's numbers:

- ``passkey_accuracy``: greedy decoding after the Landmark / LM-Infinite passkey prompt of
  ``longreach.tasks.Passkey`` at a target length, scored by ``number_match``; depths spread
  evenly over [0, 1];
- ``perplexity``: exp of the mean negative log-likelihood of the last ``last`` tokens of
  windows of the held-out essays (never trained on), the same scored tokens at every length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from longreach import compat
from longreach.lab import corpus
from longreach.prefill import greedy, prefill
from longreach.tasks import PromptFormat, get_task

EVAL_SEED = 0


@dataclass
class PasskeyResult:
    length: int
    correct: int
    total: int
    outputs: list[tuple[str, str]]  # (expected, output)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.total)


def passkey_accuracy(
    model,
    tokenizer,
    length: int,
    samples: int = 20,
    seed: int = EVAL_SEED,
    haystack: str = "synthetic",
) -> PasskeyResult:
    return task_accuracy(model, tokenizer, f"passkey:haystack={haystack}", length, samples, seed)


def task_accuracy(
    model, tokenizer, spec: str, length: int, samples: int = 20, seed: int = EVAL_SEED
) -> PasskeyResult:
    """Accuracy of a harness task (``passkey``, ``niah``, ...) at ``length`` tokens."""
    task = get_task(spec)
    fmt = PromptFormat(tokenizer)
    correct, outputs = 0, []
    for i in range(samples):
        depth = i / max(1, samples - 1)
        sample = task.generate(fmt, length, depth, seed, i)
        ids = torch.tensor([list(sample.input_ids)])
        state = prefill(model, ids, chunk=ids.shape[1])
        new = greedy(model, state, sample.max_new_tokens, tokenizer.eos_token_id)
        text = tokenizer.decode(new[0], skip_special_tokens=True)
        score = task.score(sample, text)
        correct += int(score >= 1.0)
        outputs.append((sample.expected[0], text))
    return PasskeyResult(length, correct, samples, outputs)


@torch.no_grad()
def perplexity(model, tokenizer, length: int, last: int = 128, windows: int = 4) -> float:
    """Perplexity of the last ``last`` tokens of ``windows`` held-out windows of ``length`` tokens.

    The windows end at the same positions for every length (the end of the held-out text,
    stepping back by ``last``), so every length scores the very same tokens.
    """
    ids = np.asarray(
        tokenizer(corpus.validation_text(), add_special_tokens=False).input_ids, dtype=np.int64
    )
    bos = tokenizer.bos_token_id
    nll, count = 0.0, 0
    for w in range(windows):
        end = len(ids) - w * last
        start = end - (length - 1)
        if start < 0:
            raise ValueError(
                f"the held-out text has {len(ids)} tokens, too few for length {length}"
            )
        x = torch.from_numpy(np.concatenate([[bos], ids[start:end]]))[None]
        logits = model(input_ids=x).logits[0, -last - 1 : -1].float()
        target = x[0, -last:]
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        count += last
    return math.exp(nll / count)


def lab_numbers(
    model,
    tokenizer,
    trained_length: int,
    factors: Sequence[int] = (1, 2, 4, 8, 16),
    samples: int = 20,
) -> dict:
    """Passkey accuracy and perplexity at each ``factor`` × the trained length."""
    rows = []
    for f in factors:
        n = trained_length * f
        pk = passkey_accuracy(model, tokenizer, n, samples=samples)
        rows.append(
            {"length": n, "passkey": pk.accuracy, "perplexity": perplexity(model, tokenizer, n)}
        )
    return {"dtype": str(compat.default_dtype()), "rows": rows}


def method_specs(factor: int) -> list[str]:
    """The extension methods measured at ``factor`` × the trained length of 256."""
    return [
        "vanilla",
        f"pi:factor={factor}",
        f"ntk:factor={factor}",
        f"dynamic-ntk:factor={factor}",
        f"yarn:factor={factor}",
        f"self-extend:window=128,group={2 * factor}",
        "lm-infinite",
    ]


def main() -> None:  # pragma: no cover - a measurement script: python -m longreach.lab.evaluate
    import argparse
    import json
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longreach import extend
    from longreach.lab import CHECKPOINT_DIR, TRAINED_LENGTH

    parser = argparse.ArgumentParser(description="measure the lab model")
    parser.add_argument("--model", default=str(CHECKPOINT_DIR))
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--factors", default="1,2,4,8,16")
    parser.add_argument("--methods", action="store_true", help="also every extension method")
    parser.add_argument("--out", default=None, help="append one JSON line per cell here")
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)

    def emit(row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    for factor in (int(f) for f in args.factors.split(",")):
        n = TRAINED_LENGTH * factor
        specs = method_specs(factor) if args.methods and factor > 1 else ["vanilla"]
        for spec in specs:
            t0 = time.perf_counter()
            handle = None if spec == "vanilla" else extend(model, spec)
            try:
                row = {"length": n, "factor": factor, "method": spec}
                row["perplexity"] = round(perplexity(model, tok, n), 2)
                for task in ("passkey", "niah"):
                    r = task_accuracy(model, tok, task, n, args.samples)
                    row[task] = r.accuracy
            finally:
                if handle is not None:
                    handle.remove()
            row["seconds"] = round(time.perf_counter() - t0, 1)
            emit(row)


if __name__ == "__main__":  # pragma: no cover
    main()
