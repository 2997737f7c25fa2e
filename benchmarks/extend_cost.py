"""Prefill cost of each context-extension method on SmolLM2-135M, as ratios to vanilla.

For each length n, one process prefills n tokens (random ids from a fixed seed: the cost
does not depend on the text) with each method, interleaved, and prints the median time
and the peak extra memory (rise of the process's peak RSS above its RSS before the call;
glibc is told to return large blocks at once, so each call starts from a clean baseline)
as ratios to vanilla measured in the same run. Vanilla is the unmodified model with
transformers' SDPA in one forward pass (its fastest, flash path); every method runs the
same way, through ``longreach.prefill`` with ``--chunk`` tokens per forward (default: the
whole input at once, like vanilla).

    python benchmarks/extend_cost.py --quick                 # 2k, 4k
    python benchmarks/extend_cost.py --lengths 4k,16k,32k    # the issue's table (long)

Targets (issue 4): self-extend, lm-infinite and streaming use <= 1.5x vanilla's peak
memory at 32k; lm-infinite with a 4096 window is >= 2x faster than vanilla at 32k.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

METHODS = [
    "vanilla",
    "yarn:factor=4",
    "self-extend:group=8,window=1024",
    "lm-infinite:window=4096",
    "streaming:window=4092",
]


def _kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _length(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def measure(model, ids, method: str, chunk: int | None):
    import torch

    import longreach as lr
    from longreach.prefill import prefill

    with torch.no_grad(), lr.extend(model, method) as handle:
        base = _kib("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        state = prefill(model, ids, chunk=chunk or ids.shape[1], cache=handle.new_cache())
        seconds = time.perf_counter() - t0
        peak = _kib("VmHWM") - base
        del state
    return seconds, peak / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="4k,16k,32k", help="comma-separated, e.g. 4k,16k")
    parser.add_argument("--quick", action="store_true", help="2k and 4k, one repeat")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per cell")
    parser.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: all)")
    parser.add_argument("--methods", default=None, help="';'-separated specs (default: all)")
    args = parser.parse_args()

    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # return big blocks to the OS at once
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
        os.execvpe(sys.executable, [sys.executable, *sys.argv], env)

    import torch

    import longreach as lr
    from longreach import compat

    lengths = [2048, 4096] if args.quick else [_length(x) for x in args.lengths.split(",")]
    methods = args.methods.split(";") if args.methods else METHODS
    dtype = compat.default_dtype()
    torch.manual_seed(0)
    model, _ = lr.load("smollm2-135m", dtype=dtype)
    model.eval()
    print(f"SmolLM2-135M, {dtype}, {torch.get_num_threads()} threads, chunk {args.chunk or 'all'}")

    warm = torch.randint(100, 40000, (1, 1024))
    for method in methods:  # warm-up: first calls allocate and pick kernels
        measure(model, warm, method, args.chunk)

    header = f"{'method':34s} {'n':>6s} {'time s':>8s} {'x vanilla':>9s} {'peak MiB':>9s} {'x vanilla':>9s}"
    print(header)
    print("-" * len(header))
    for n in lengths:
        repeats = args.repeats or (1 if args.quick or n > 8192 else 3)
        ids = torch.randint(100, 40000, (1, n), generator=torch.Generator().manual_seed(n))
        times: dict[str, list[float]] = {m: [] for m in methods}
        peaks: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(repeats):
            for method in methods:
                seconds, peak = measure(model, ids, method, args.chunk)
                times[method].append(seconds)
                peaks[method].append(peak)
        t_ref = statistics.median(times["vanilla"]) if "vanilla" in times else None
        m_ref = max(peaks["vanilla"]) if "vanilla" in peaks else None
        for method in methods:
            t = statistics.median(times[method])
            m = max(peaks[method])
            rt = f"{t / t_ref:9.2f}" if t_ref else f"{'-':>9s}"
            rm = f"{m / m_ref:9.2f}" if m_ref else f"{'-':>9s}"
            print(f"{method:34s} {n:6d} {t:8.1f} {rt} {m:9.0f} {rm}", flush=True)


if __name__ == "__main__":
    main()
