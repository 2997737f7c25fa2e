"""How fast infllm's prefill could be on this CPU, against how fast it is, in one run.

The speed targets of infllm (2x vanilla at 32k, 3.5x at 64k) assume that what is not
attention costs little. This script measures, in one process (SmolLM2-135M, random token
ids, one thread, the model's default dtype):

- ``vanilla``: the model's own SDPA prefill in one call (as ``benchmarks/infllm.py`` runs
  it: SDPA's fastest form; a prefill in calls of 8192 tokens took 196 s at 32k against
  infllm's 68 on an AMX Xeon);
- ``infllm``: the method at its defaults, in calls of ``--chunk`` tokens;
- ``attention-free``: the same prefill with every attention call returning zeros. What is
  left is the MLP, projections, norms, rotary embedding and LM head: a floor that no
  attention method goes under;
- ``kernel-ideal``: the time of the kernel calls that infllm's attention span needs at
  best: per layer, one causal call for the dense prefix (``dense`` tokens, the trained
  length) and, per sparse chunk of ``chunk`` queries, one full call over ``window`` keys and
  one over ``init + topk * block + chunk / 2`` keys (the memory plus the average of the
  tokens between the memory and the band). This is the band and the memory at the CPU
  flash kernel's best rate, with no triangles, merges, rotations or gathers.

It prints the measured ratio vanilla / infllm and the ceiling
vanilla / (attention-free + kernel-ideal): what a flawless infllm with these parameters
would reach here. One JSON line per length goes to ``--out`` (a rerun skips what is there).

    python benchmarks/infllm_ceiling.py --lengths 16k,32k --out benchmarks/results/infllm_ceiling.jsonl
    python benchmarks/infllm_ceiling.py --table benchmarks/results/infllm_ceiling.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

PARTS = ("attention-free", "kernel-ideal", "infllm", "vanilla")


def _zero_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention function that costs nothing: (B, Lq, Hq, D) zeros, no weights."""
    import torch

    b, h, q, d = query.shape
    return torch.zeros(b, q, h, d, dtype=query.dtype, device=query.device), None


def _timed(fn, repeats: int = 5) -> float:
    """Median seconds of ``fn`` after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def kernel_ideal(model, method, n: int) -> float:
    """Seconds of the fewest, largest kernel calls that infllm's attention span needs at n."""
    import torch

    from longreach import compat

    op = compat.cpu_flash_attention()
    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    dtype = next(model.parameters()).dtype
    g = method.geometry(model)
    dense, chunk, window = min(n, g["dense"]), g["chunk"], g["window"]
    memory = g["init"] + method.topk * g["block"] + chunk // 2

    def call(rows: int, keys: int, causal: bool) -> float:
        q = torch.randn(1, hq, rows, dim, dtype=dtype)
        k = torch.randn(1, hkv, keys, dim, dtype=dtype)
        return _timed(lambda: op(q, k, k, 0.0, causal, scale=dim**-0.5), repeats=3)

    per_layer = call(dense, dense, True)
    sparse = n - dense
    if sparse > 0:
        per_chunk = call(chunk, window, False) + call(chunk, memory, False)
        per_layer += per_chunk * sparse / chunk
    return per_layer * cfg.num_hidden_layers


def run_length(n: int, chunk: int, seed: int = 0) -> dict:
    import torch
    from transformers import AttentionInterface

    import longreach as lr
    from longreach.methods import build_method

    torch.set_num_threads(1)
    model, _ = lr.load("smollm2-135m")
    ids = torch.randint(100, 20000, (1, n), generator=torch.Generator().manual_seed(seed))
    step = min(chunk, n)
    out: dict = {"n": n, "chunk": step, "dtype": str(next(model.parameters()).dtype)}
    AttentionInterface.register("longreach_zero", _zero_attention)

    def once(label, fn):
        t = time.perf_counter()
        with torch.inference_mode():
            fn()
        out[label] = round(time.perf_counter() - t, 2)
        print(f"  {n}: {label} {out[label]} s", flush=True)

    own = model.config._attn_implementation
    model.set_attn_implementation("longreach_zero")
    try:
        once("attention-free", lambda: lr.prefill(model, ids, chunk=step))
    finally:
        model.set_attn_implementation(own)
    method = build_method("infllm")
    out["kernel-ideal"] = round(kernel_ideal(model, method, n), 2)
    print(f"  {n}: kernel-ideal {out['kernel-ideal']} s", flush=True)
    with lr.extend(model, "infllm") as handle:
        once("infllm", lambda: lr.prefill(model, ids, chunk=step, cache=handle.new_cache()))
    once("vanilla", lambda: lr.prefill(model, ids, chunk=n))
    out["measured"] = round(out["vanilla"] / out["infllm"], 2)
    out["ceiling"] = round(out["vanilla"] / (out["attention-free"] + out["kernel-ideal"]), 2)
    out["cpu"] = platform.processor() or platform.machine()
    return out


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = [
        "| n | vanilla s | infllm s | attention-free s | kernel-ideal s | vanilla / infllm "
        "| ceiling: vanilla / (free + ideal) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=lambda r: r["n"]):
        lines.append(
            f"| {r['n'] // 1024}k | {r['vanilla']} | {r['infllm']} | {r['attention-free']} "
            f"| {r['kernel-ideal']} | {r['measured']}× | {r['ceiling']}× |"
        )
    return "\n".join(lines)


def main() -> None:
    from longreach.bench.grid import parse_length

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="16k,32k")
    parser.add_argument("--chunk", type=int, default=8192, help="prefill tokens per call")
    parser.add_argument("--out", default="runs/infllm_ceiling.jsonl")
    parser.add_argument("--table", default=None, help="print the table of a results file")
    args = parser.parse_args()
    if args.table:
        print(table(Path(args.table)))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        done = {json.loads(line)["n"] for line in out.read_text().splitlines() if line.strip()}
    for n in (parse_length(x) for x in args.lengths.split(",")):
        if n in done:
            print(f"{n}: done, skipped")
            continue
        row = run_length(n, args.chunk)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    print(table(out))


if __name__ == "__main__":
    main()
