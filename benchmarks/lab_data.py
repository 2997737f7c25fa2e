"""Dataset Decomposition vs concat-and-chunk at equal steps: tokens/s and validation loss.

Both pipelines train the lab model's recipe (same model, same data, same seed, same token
budget per step) for the same number of steps from one shared data preparation; only the
packing differs (Pouransari et al., 2024). Prints each run and the ratios DD / baseline.

Throughput is also measured interleaved (one DD step, one baseline step, ... on the batches
of the same step numbers), so that a load that changes during the run (a shared machine)
hits both pipelines alike; that ratio is the number to trust.

    python benchmarks/lab_data.py --steps 100          # ~10 min on 2 idle CPU cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from longreach.lab.train import Batches, TrainConfig, model_config, prepare_data, train


def interleaved_throughput(base: TrainConfig, data, steps: int) -> dict[str, float]:
    """Tokens/s of forward + backward on each pipeline's batches, alternating step by step.

    Total tokens over total seconds: a DD run saves time only on its short-bucket steps, so
    a median (a 256-token step for both) would hide the saving.
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(
        model_config(base, data.tokenizer), attn_implementation="sdpa", dtype=torch.float32
    )
    batches = {p: Batches(dataclasses.replace(base, pipeline=p), data) for p in ("dd", "concat")}
    tokens = dict.fromkeys(batches, 0)
    seconds = dict.fromkeys(batches, 0.0)
    for step in range(steps):
        for pipeline, make in batches.items():
            x = make(step)
            t0 = time.perf_counter()
            model(input_ids=x, labels=x).loss.backward()
            seconds[pipeline] += time.perf_counter() - t0
            tokens[pipeline] += x.numel()
            model.zero_grad(set_to_none=True)
    return {p: tokens[p] / seconds[p] for p in batches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        base = TrainConfig(
            out_dir=Path(tmp) / "dd", steps=args.steps, eval_every=args.steps, threads=args.threads
        )
        t0 = time.perf_counter()
        data = prepare_data(base)
        print(f"data prepared in {time.perf_counter() - t0:.0f} s")
        results = {}
        for pipeline in ("dd", "concat"):
            cfg = dataclasses.replace(base, pipeline=pipeline, out_dir=Path(tmp) / pipeline)
            r = train(cfg, data=data)
            results[pipeline] = {
                "steps": r.steps,
                "tokens": r.tokens,
                "seconds": round(r.train_seconds, 1),
                "tokens_per_s": round(r.tokens / r.train_seconds, 1),
                "val_loss": round(r.val_loss, 4),
            }
            print(f"{pipeline:>6}: {results[pipeline]}")
        rates = interleaved_throughput(base, data, min(args.steps, 60))
        print(f"interleaved tokens/s: {rates}")
    dd, cc = results["dd"], results["concat"]
    ratios = {
        "tokens_per_s dd/concat (training runs)": round(dd["tokens_per_s"] / cc["tokens_per_s"], 3),
        "tokens_per_s dd/concat (interleaved)": round(rates["dd"] / rates["concat"], 3),
        "val_loss dd - concat": round(dd["val_loss"] - cc["val_loss"], 4),
    }
    print(ratios)
    if args.json:
        out = {"runs": results, "interleaved_tokens_per_s": rates, "ratios": ratios}
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
