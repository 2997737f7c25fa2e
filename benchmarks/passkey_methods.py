"""SmolLM2-135M passkey accuracy per context-extension method and length (a few samples).

Each sample is ``longreach.tasks.Passkey`` (raw prompt, synthetic filler, the key at an
evenly spread depth) generated from a fixed seed with the model's own tokenizer, prefilled
in chunks through ``longreach.prefill`` and answered greedily (at most 10 new tokens).

    python benchmarks/passkey_methods.py --lengths 8k,16k --samples 3
"""

from __future__ import annotations

import argparse
import time

METHODS = [
    "vanilla",
    "yarn:factor=4",
    "self-extend:group=8,window=1024",
    "lm-infinite:window=4096",
    "streaming:window=4092",
]


def _length(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="8k,16k")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--methods", default=None, help="';'-separated specs (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    import longreach as lr
    from longreach import compat
    from longreach.prefill import greedy, prefill
    from longreach.tasks import Passkey
    from longreach.tasks.base import PromptFormat

    model, tok = lr.load("smollm2-135m", dtype=compat.default_dtype())
    model.eval()
    fmt = PromptFormat(tok)
    task = Passkey()
    methods = args.methods.split(";") if args.methods else METHODS
    lengths = [_length(x) for x in args.lengths.split(",")]
    print(f"{'method':34s} {'tokens':>7s} {'correct':>8s}  outputs", flush=True)
    for n in lengths:
        samples = [
            task.generate(fmt, n, (i + 0.5) / args.samples, args.seed, i)
            for i in range(args.samples)
        ]
        for method in methods:
            t0 = time.perf_counter()
            correct, outputs = 0, []
            for sample in samples:
                ids = torch.tensor([sample.input_ids])
                with torch.no_grad(), lr.extend(model, method) as handle:
                    state = prefill(model, ids, chunk=args.chunk, cache=handle.new_cache())
                    new = greedy(model, state, sample.max_new_tokens, tok.eos_token_id)
                text = tok.decode(new[0], skip_special_tokens=True)
                correct += int(task.score(sample, text))
                outputs.append(text.strip()[:16])
            print(
                f"{method:34s} {ids.shape[1]:7d} {correct:4d}/{len(samples):<3d}  "
                f"{outputs} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
