"""Block-sparse attention vs dense causal SDPA: time, peak extra memory, achieved GFLOP/s.

For each length n and dtype, on SmolLM2-135M's head shape (9 query heads, 3 KV heads,
head dim 64, batch 1), one worker process times side by side, interleaved per repeat:

  sdpa      F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)   (the baseline)
  causal    (a) block_attention with the full causal layout (its plan coalesces into one
            causal call, the same work SDPA does: this row measures the wrapper)
  tiled     (a') (up to --tiled-max) the same layout kept in 1024-row tiles (a rectangle + a triangle per tile,
            merged by log-sum-exp): the cost of the block machinery itself
  lambda    (b) block_attention with the Λ layout: 4 sink tokens + a 4096-token window
            (tiles of 4095 rows: sinks + UPPER + LOWER triangles per tile)
  masked    (c) the Λ pattern as a dense boolean mask through SDPA (what peer code does;
            only up to --masked-max, it is O(n^2) in memory)

Ratios are to ``sdpa`` in the same worker, by wall time and by CPU time (all threads of
the process): on a machine shared with other jobs the CPU-time ratio is the steadier one,
since time spent descheduled does not count. Peak extra memory is the rise of the worker's
peak RSS above its RSS before the call (glibc is told to return large blocks at once,
``MALLOC_MMAP_THRESHOLD_``, so each case starts from a clean baseline). GFLOP/s counts the
useful work (4 * visible pairs * heads * head_dim) and is shown as a fraction of the
matmul peak of the same dtype and of fp32, both measured in the same worker right after
the timings (the load on a shared machine drifts; a peak from the start of a long run is stale).

    python benchmarks/attention.py              # 4k 16k 32k 64k, bf16 and fp32 (tens of minutes)
    python benchmarks/attention.py --quick      # 1k 2k 4k, small repeats (about a minute)

With ``--model-prefill 64k`` it instead loads SmolLM2-135M (``longreach.load``), and
prefills that many tokens (random ids from a fixed seed: the cost does not depend on the
text) in fp32 through ``longreach.prefill`` with the Λ layout, printing the time and the
process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
SINKS, WINDOW, BLOCK = 4, 4096, 1024  # BLOCK: tile rows of the "tiled" row
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")  # resets VmHWM to the current RSS


def matmul_peak(dtype: torch.dtype, seconds: float = 1.0) -> float:
    """GFLOP/s of a square matmul in ``dtype``; the size grows until one call takes 50 ms."""
    size = 128
    while True:
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        torch.mm(a, b)
        start = time.perf_counter()
        torch.mm(a, b)
        took = time.perf_counter() - start
        if took > 0.05 or size >= 2048:
            break
        size *= 2
    reps = max(3, int(seconds / max(took, 1e-4)))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times) / 1e9


def worker(n: int, dtype_name: str, repeats: int, masked: bool, tiled: bool, warmup: bool) -> dict:
    from longreach.attention import CausalLayout, LambdaLayout, Region, block_attention, plan

    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, n, HEAD_DIM, generator=g).to(dtype)
    k = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g).to(dtype)
    v = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g).to(dtype)
    causal_plan = CausalLayout(block=BLOCK).plan(n, n)
    tiled_plan = plan((Region(d=(0, None)),), n, n, 0, block=BLOCK, coalesce=False)
    lambda_plan = LambdaLayout(sinks=SINKS, window=WINDOW).plan(n, n)

    def lam_mask():
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        return (j <= i) & ((i - j < WINDOW) | (j < SINKS))

    cases = {
        "sdpa": (
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            causal_plan.pairs,
        ),
        "causal": (lambda: block_attention(q, k, v, causal_plan), causal_plan.pairs),
        "lambda": (lambda: block_attention(q, k, v, lambda_plan), lambda_plan.pairs),
    }
    if tiled:
        cases["tiled"] = (lambda: block_attention(q, k, v, tiled_plan), tiled_plan.pairs)
    if masked:
        cases["masked"] = (
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=lam_mask(), enable_gqa=True),
            lambda_plan.pairs,
        )
    if warmup:
        for fn, _ in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    peaks: dict[str, int] = {name: 0 for name in cases}
    for _ in range(repeats):
        for name, (fn, _) in cases.items():
            before = _kib("VmRSS")
            _reset_peak()
            start, start_cpu = time.perf_counter(), time.process_time()
            out = fn()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            peaks[name] = max(peaks[name], _kib("VmHWM") - before)
            del out
    peak = matmul_peak(dtype)
    peak_fp32 = peak if dtype == torch.float32 else matmul_peak(torch.float32)
    return {
        name: {
            "mm_peak": peak,
            "mm_peak_fp32": peak_fp32,
            "seconds": statistics.median(times[name]),
            "cpu_seconds": statistics.median(cpu[name]),
            "peak_extra_mib": peaks[name] / 1024,
            "flops": 4 * pairs * HEADS * HEAD_DIM,
        }
        for name, (_, pairs) in cases.items()
    }


def _run_worker(
    n: int, dtype: str, repeats: int, masked: bool, tiled: bool, warmup: bool, threads: int
) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        str(n),
        dtype,
        str(repeats),
        str(int(masked)),
        str(int(tiled)),
        str(int(warmup)),
    ]
    cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"worker n={n} {dtype} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def model_prefill(n: int, layout_name: str, chunk: int, model_name: str) -> None:
    import longreach
    from longreach.attention import CausalLayout, LambdaLayout, use
    from longreach.prefill import prefill

    start = time.perf_counter()
    model, _ = longreach.load(model_name)
    model = model.float().eval()
    load_s = time.perf_counter() - start
    layout = LambdaLayout(sinks=SINKS, window=WINDOW) if layout_name == "lambda" else CausalLayout()
    ids = torch.randint(
        0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0)
    )
    rss0 = _kib("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    with use(model, layout):
        state = prefill(model, ids, chunk=chunk)
    took = time.perf_counter() - start
    peak = _kib("VmHWM")
    layers = state.cache.layers if hasattr(state.cache, "layers") else None
    cache_bytes = sum(
        t.numel() * t.element_size()
        for layer in (layers or [])
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(t, torch.Tensor)
    )
    print(
        f"{model_name}: prefill of {_fmt_len(n)} tokens, layout {layout}, chunk {chunk}, fp32, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"  load {load_s:.1f} s; prefill {took:.1f} s ({n / took:.0f} tokens/s)")
    print(
        f"  RSS before prefill {rss0 / 1024:.0f} MiB, peak during prefill {peak / 1024:.0f} MiB "
        f"(+{(peak - rss0) / 1024:.0f} MiB); KV cache {cache_bytes / 2**20:.0f} MiB"
    )
    print(f"  cache holds {state.length} tokens; next token id {int(state.logits.argmax())}")


def _fmt_len(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="lengths 1k, 2k, 4k (window stays 4096)")
    ap.add_argument("--lengths", default=None, help="comma-separated, e.g. 4k,16k")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument(
        "--repeats", type=int, default=None, help="repeats per case (default 3, 1 from 32k)"
    )
    ap.add_argument(
        "--masked-max", default="16k", help="largest n for the dense-mask row (O(n^2) memory)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    ap.add_argument("--tiled-max", default="32k", help="largest n for the tiled row")
    ap.add_argument("--model-prefill", default=None, help="e.g. 64k: prefill SmolLM2 instead")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layout", default="lambda", choices=["lambda", "causal"])
    ap.add_argument("--chunk", type=int, default=2 * (WINDOW - 1), help="prefill chunk (tokens)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    def parse(s: str) -> int:
        s = s.strip().lower()
        return int(s[:-1]) * 1024 if s.endswith("k") else int(s)

    if args.worker:
        n, dtype, repeats, masked, tiled, warmup = args.worker
        result = worker(
            int(n), dtype, int(repeats), bool(int(masked)), bool(int(tiled)), bool(int(warmup))
        )
        print(json.dumps(result))
        return
    if args.model_prefill:
        model_prefill(parse(args.model_prefill), args.layout, args.chunk, args.model)
        return

    lengths = [
        parse(x)
        for x in (args.lengths or ("1k,2k,4k" if args.quick else "4k,16k,32k,64k")).split(",")
    ]
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    masked_max, tiled_max = parse(args.masked_max), parse(args.tiled_max)
    print(
        f"torch {torch.__version__}, {args.threads} threads, heads {HEADS}/{KV_HEADS} x {HEAD_DIM}, "
        f"Λ = {SINKS} sinks + {WINDOW} window"
    )
    print("matmul peaks are measured in each worker right after its timings (the load drifts)")
    print()
    print(
        "| n | dtype | case | time s | CPU s | × sdpa (wall) | × sdpa (CPU) | speed-up (CPU) "
        "| peak extra MiB | GFLOP/s | % dtype mm peak | % fp32 mm peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        for n in lengths:
            repeats = args.repeats or (3 if n <= 16 * 1024 else 1)
            if args.quick and args.repeats is None:
                repeats = 3
            res = _run_worker(
                n,
                dtype,
                repeats,
                masked=n <= masked_max,
                tiled=n <= tiled_max,
                warmup=n <= 16 * 1024,
                threads=args.threads,
            )
            base, base_cpu = res["sdpa"]["seconds"], res["sdpa"]["cpu_seconds"]
            for name, r in res.items():
                gflops = r["flops"] / r["seconds"] / 1e9
                print(
                    f"| {_fmt_len(n)} | {dtype} | {name} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} "
                    f"| {r['seconds'] / base:.2f} | {r['cpu_seconds'] / base_cpu:.2f} "
                    f"| {base_cpu / r['cpu_seconds']:.2f} | {r['peak_extra_mib']:.0f} | {gflops:.1f} | "
                    f"{100 * gflops / r['mm_peak']:.0f}% of {r['mm_peak']:.1f} "
                    f"| {100 * gflops / r['mm_peak_fp32']:.0f}% of {r['mm_peak_fp32']:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
