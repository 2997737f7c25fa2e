"""The moonshot: SmolLM2-135M finds a passkey in 1,048,576 tokens with infllm's disk tier.

Per depth (default 0.25, 0.5, 0.75): build the passkey prompt (synthetic haystack; the
PG essays hold about 150k tokens), prefill it in 8192-token calls with
``infllm:budget=4GiB`` and an offload folder, print one progress line per call (tokens,
elapsed, tokens/s, RSS, blocks on disk), answer greedily and score. One JSON line per
depth goes to ``--out``; a rerun skips the depths already there. Target: peak RSS <= 8 GiB.

    python benchmarks/infllm_million.py --out benchmarks/results/infllm_million.jsonl
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path


def rss_mib() -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1_048_576)
    parser.add_argument("--depths", default="0.25,0.5,0.75")
    parser.add_argument("--budget", default="4GiB")
    parser.add_argument("--offload-dir", default=None, help="default: a temporary folder")
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/infllm_million.jsonl")
    args = parser.parse_args()

    import torch

    import longreach as lr
    from longreach import compat
    from longreach.prefill import greedy
    from longreach.tasks import PromptFormat, get_task

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    done = set()
    if out.exists():
        done = {json.loads(x)["depth"] for x in out.read_text().splitlines() if x.strip()}
    model, tok = lr.load("smollm2-135m")
    model.eval()
    task = get_task("passkey", haystack="synthetic")
    offload = args.offload_dir or tempfile.mkdtemp(prefix="longreach-offload-")
    spec = f"infllm:budget={args.budget},offload_dir={offload}"
    for depth in (float(d) for d in args.depths.split(",")):
        if depth in done:
            continue
        t0 = time.perf_counter()
        sample = task.generate(PromptFormat(tok), args.tokens, depth, 0, 0)
        ids = torch.tensor([sample.input_ids])
        n = ids.shape[1]
        print(f"depth {depth}: {n} tokens built in {time.perf_counter() - t0:.0f} s", flush=True)
        with torch.no_grad(), lr.extend(model, spec) as handle:
            cache = handle.new_cache()
            start = time.perf_counter()
            logits = None
            for a in range(0, n, args.chunk):
                b = min(n, a + args.chunk)
                kw = compat.forward_kwargs(model, cache, a, b - a)
                res = model(input_ids=ids[:, a:b], use_cache=True, logits_to_keep=1, **kw)
                logits, cache = res.logits[:, -1].float(), compat.output_cache(res)
                el = time.perf_counter() - start
                print(
                    f"  {b:8d}/{n} tokens  {el:7.0f} s  {b / el:6.0f} tok/s  RSS {rss_mib():6.0f} MiB"
                    f"  disk blocks {cache.disk_blocks}",
                    flush=True,
                )
            seconds = time.perf_counter() - start
            from longreach.prefill import Prefill

            state = Prefill(cache, logits, n)
            new = greedy(model, state, sample.max_new_tokens, tok.eos_token_id)
            disk = cache.disk_blocks
            cache.close()
        text = tok.decode(new[0], skip_special_tokens=True)
        rec = {
            "tokens": n,
            "depth": depth,
            "spec": spec,
            "prefill_s": round(seconds, 1),
            "tok_per_s": round(n / seconds, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "disk_blocks": disk,
            "expected": sample.expected[0],
            "output": text.strip()[:40],
            "correct": int(task.score(sample, text) >= 1.0),
            "dtype": str(model.dtype),
        }
        print(json.dumps(rec), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    sys.exit(main())
