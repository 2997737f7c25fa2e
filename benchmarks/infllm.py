"""Reach and cost of infllm (and the readers) against vanilla and dynamic NTK on SmolLM2-135M.

Every cell (method x task x haystack x length x depth x sample) runs in a fresh child
process, so its peak RSS is its own (``ru_maxrss``): the child loads the model, builds
the task's prompt with the model's tokenizer, prefills it (``longreach.prefill`` with
``--chunk`` tokens per call; vanilla runs SDPA in one pass, its fastest), times the
greedy answer token by token (decode tokens/s) and scores it. One JSON line per cell is
appended to ``--out``; a rerun skips the cells already there, so an interrupted run loses
at most the cell it was in. ``--table`` prints the tables of a file: accuracy per
(method, haystack, length), cost per (method, length) with ratios to the same run's
vanilla and to infllm's own 16k/8k rows, which is what the targets are stated in.

    python benchmarks/infllm.py --lengths 16k,32k --methods "vanilla;infllm" --out runs/infllm.jsonl
    python benchmarks/infllm.py --table runs/infllm.jsonl
    python benchmarks/infllm.py --methods "infiniretri;xl3m" --lengths 32k,128k --out runs/readers.jsonl

Time speed cells one at a time on a quiet machine: with another job on the second core an
AMD Zen 4 slowed infllm's 32k prefill by 29% and vanilla's by 12% (1.73x against 2.00x in one
quiet process, docs/memory.md).

A reader method (``infiniretri``, ``xl3m``) reads the sample's parts itself: its whole time is
the prefill column (there is no separate decode), and no KV is kept between its forwards.

Targets: infllm's accuracy at 32k, 64k and 128k >= 0.9x vanilla's at 2k (same haystack);
prefill seconds per token at 128k <= 1.3x those at 16k; decode tokens/s at 128k >=
0.7x those at 8k; prefill >= 2x faster than vanilla at 32k and >= 3.5x at 64k; peak RSS
minus the stored KV bytes flat (<= 1.2x) from 16k to 128k; with budget=4GiB peak RSS at
128k <= 6 GiB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = "vanilla;dynamic-ntk:factor=16;infllm"


def _length(text: str) -> int:
    text = text.strip().lower()
    if text.endswith("m"):
        return int(float(text[:-1]) * 1024 * 1024)
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def kv_bytes(cache) -> int:
    """Bytes of K/V the cache holds in RAM (block memories report their own)."""
    own = getattr(cache, "memory_bytes", None)
    if own is not None:
        return int(own)
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM; Linux >= 4.0), so that the peak of the work
    that follows is measured apart from the model load's. False where it cannot be.

    glibc's heap is trimmed first (``malloc_trim``): building a 1M-token prompt frees
    hundreds of MB that the allocator keeps mapped, and the RSS the work starts from should
    be what is live (the model, the prompt), not the builder's freed scratch.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mib(field: str = "VmHWM") -> float | None:
    """VmHWM (or another /proc/self/status field) of this process in MiB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def run_cell(cell: dict) -> dict:
    """Measure one cell in this process (the child).

    ``peak_rss_mib`` is the process's peak (``ru_maxrss``), which includes loading the
    model; ``work_peak_rss_mib`` is the peak from just before the prefill (or read) on,
    model included (VmHWM reset after loading and building the prompt; None if it could
    not be reset); ``work_start_rss_mib`` is the RSS at that reset, so the work's own rise is
    their difference (building a 1M-token prompt leaves the process larger before any read).
    """
    import torch

    import longreach as lr
    from longreach import compat
    from longreach.prefill import greedy, prefill
    from longreach.tasks import PromptFormat, get_task

    torch.set_num_threads(cell["threads"])
    dtype = compat.default_dtype()
    model, tok = lr.load("smollm2-135m", dtype=dtype)
    model.eval()
    task = get_task(cell["task"], haystack=cell["haystack"])
    sample = task.generate(PromptFormat(tok), cell["n"], cell["depth"], 0, cell["sample"])
    method = cell["method"]
    from longreach.methods import build_method

    built = build_method(method)
    n_tokens = sample.n_tokens
    if built.reader:
        # a reader gets the prompt's parts (text), not its ids: the harness's own list of
        # them (41 MB at 1M tokens, a Python list and a tensor) is not the reader's memory
        sample = dataclasses.replace(sample, input_ids=[])
        ids = None
    else:
        ids = torch.tensor([sample.input_ids])
    reset = _reset_peak()
    start_rss = _status_mib("VmRSS") if reset else None
    if built.reader:  # it reads the parts itself, each forward within the trained length
        built.check_model(model)
        t0 = time.perf_counter()
        shown = [0.0]

        def progress(done: int, total: int) -> None:  # one stderr line per ~10% of the steps
            if done == total or done / total - shown[0] >= 0.1:
                shown[0] = done / total
                print(f"    {cell['method']} step {done}/{total} {time.perf_counter() - t0:7.0f} s",
                      file=sys.stderr, flush=True)  # fmt: skip

        reading = built.answer(model, tok, PromptFormat(tok), sample.parts, sample.max_new_tokens,
                               lambda text: task.is_complete(sample, text), progress)  # fmt: skip
        seconds = time.perf_counter() - t0
        return {
            **cell, "tokens": n_tokens, "chars": len(sample.prompt),
            "prefill_s": round(seconds, 2), "s_per_token": seconds / n_tokens,
            "decode_tok_s": None,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "work_peak_rss_mib": _status_mib() if reset else None,
            "work_start_rss_mib": start_rss,
            "kv_mib": 0.0, "disk_blocks": 0, "dtype": str(dtype), "expected": sample.expected[0],
            "output": reading.text.strip()[:40],
            "correct": int(task.score(sample, reading.text) >= 1.0),
            # was every expected value in the prompt the answer came from?
            "shown": int(all(e in tok.decode(reading.prompt_ids) for e in sample.expected)),
            "reader": {k: v for k, v in reading.meta.items() if not isinstance(v, list)},
        }  # fmt: skip
    with torch.no_grad(), lr.extend(model, method) as handle:
        t0 = time.perf_counter()
        chunk = cell["chunk"] if method != "vanilla" else ids.shape[1]
        state = prefill(model, ids, chunk=min(chunk, ids.shape[1]), cache=handle.new_cache())
        seconds = time.perf_counter() - t0
        stored = kv_bytes(state.cache)
        t1 = time.perf_counter()
        new = greedy(model, state, sample.max_new_tokens, tok.eos_token_id)
        decode = time.perf_counter() - t1
        disk = getattr(state.cache, "disk_blocks", 0)
        if hasattr(state.cache, "close"):
            state.cache.close()
    text = tok.decode(new[0], skip_special_tokens=True)
    steps = max(1, new.shape[1] - 1)  # the first token comes from the prefill's logits
    return {
        **cell,
        "tokens": ids.shape[1],
        "chars": len(tok.decode(sample.input_ids)),
        "prefill_s": round(seconds, 2),
        "s_per_token": seconds / ids.shape[1],
        "decode_tok_s": round(steps / decode, 2) if new.shape[1] > 1 else None,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "work_peak_rss_mib": _status_mib() if reset else None,
        "work_start_rss_mib": start_rss,
        "kv_mib": round(stored / 2**20, 1),
        "disk_blocks": disk,
        "dtype": str(dtype),
        "expected": sample.expected[0],
        "output": text.strip()[:40],
        "correct": int(task.score(sample, text) >= 1.0),
    }


def cell_key(c: dict) -> tuple:
    return (c["method"], c["task"], c["haystack"], c["n"], c["depth"], c["sample"])


def print_tables(records: list[dict]) -> None:
    from collections import defaultdict

    acc: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        acc[(r["method"], r["task"], r["haystack"], r["n"])].append(r)
    print(
        "accuracy (correct / cells; a reader's 'shown': cells whose answer prompt held the values)"
    )
    print(f"{'method':28s} {'task':12s} {'haystack':10s} {'n':>8s} {'acc':>6s} {'shown':>6s}")
    for key in sorted(acc, key=lambda k: (k[0], k[1], k[2], k[3])):
        v = acc[key]
        right = sum(r["correct"] for r in v)
        seen = [r["shown"] for r in v if r.get("shown") is not None]
        shown = f"{sum(seen)}/{len(seen)}" if seen else "-"
        print(
            f"{key[0]:28s} {key[1]:12s} {key[2]:10s} {key[3]:8d} {right}/{len(v):<4d} {shown:>6s}"
        )
    print()
    cost: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        cost[(r["method"], r["n"])].append(r)
    van = {
        n: statistics.median(x["prefill_s"] for x in rs)
        for (m, n), rs in cost.items()
        if m == "vanilla"
    }
    print("cost (medians over cells)")
    header = (
        f"{'method':28s} {'n':>8s} {'prefill s':>10s} {'x vanilla':>10s} {'us/token':>9s} "
        f"{'decode t/s':>10s} {'peak MiB':>9s} {'KV MiB':>8s} {'peak-KV':>8s} {'work peak':>9s}"
    )
    print(header)
    for (m, n), rs in sorted(cost.items()):
        t = statistics.median(x["prefill_s"] for x in rs)
        dec = [x["decode_tok_s"] for x in rs if x.get("decode_tok_s")]
        peak = max(x["peak_rss_mib"] for x in rs)
        kv = max(x["kv_mib"] for x in rs)
        work = [x["work_peak_rss_mib"] for x in rs if x.get("work_peak_rss_mib")]
        work_s = f"{max(work):9.0f}" if work else f"{'-':>9s}"
        ratio = f"{van[n] / t:10.2f}" if n in van else f"{'-':>10s}"
        d = f"{statistics.median(dec):10.2f}" if dec else f"{'-':>10s}"
        print(
            f"{m:28s} {n:8d} {t:10.1f} {ratio} {1e6 * t / n:9.1f} {d} {peak:9.0f} {kv:8.0f} "
            f"{peak - kv:8.0f} {work_s}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="8k,16k,32k")
    parser.add_argument("--methods", default=METHODS, help="';'-separated method specs")
    parser.add_argument("--tasks", default="passkey,niah")
    parser.add_argument("--haystacks", default="synthetic,pg")
    parser.add_argument("--depths", default="0.25,0.5,0.75")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=8192, help="prefill tokens per call")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-vanilla", default="32k", help="longest cell of --quadratic methods")
    parser.add_argument(
        "--quadratic", default="vanilla,dynamic-ntk", help="methods whose cost is quadratic"
    )
    parser.add_argument("--out", default="runs/infllm.jsonl")
    parser.add_argument("--table", default=None)
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))), flush=True)
        return
    if args.table:
        print_tables([json.loads(x) for x in Path(args.table).read_text().splitlines() if x])
        return

    out = Path(args.out)
    records = (
        [json.loads(x) for x in out.read_text().splitlines() if x.strip()] if out.exists() else []
    )
    done = {cell_key(r) for r in records}
    max_dense = _length(args.max_vanilla)
    cells = []
    for n in (_length(x) for x in args.lengths.split(",")):
        for method in args.methods.split(";"):
            if n > max_dense and method.split(":")[0] in args.quadratic.split(","):
                continue  # quadratic cost: hours per cell past this
            for task in args.tasks.split(","):
                for haystack in args.haystacks.split(","):
                    for depth in (float(d) for d in args.depths.split(",")):
                        for sample in range(args.samples):
                            cells.append(
                                dict(
                                    method=method,
                                    task=task,
                                    haystack=haystack,
                                    n=n,
                                    depth=depth,
                                    sample=sample,
                                    chunk=args.chunk,
                                    threads=args.threads,
                                )
                            )
    todo = [c for c in cells if cell_key(c) not in done]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} done, {len(todo)} to run", flush=True)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    for i, cell in enumerate(todo, 1):
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, __file__, "--cell", json.dumps(cell)],
            stdout=subprocess.PIPE,  # stderr (a reader's progress, a traceback) goes to ours
            text=True,
            env=env,
        )
        if proc.returncode != 0:
            print(
                f"[{i}/{len(todo)}] FAILED {cell_key(cell)} (exit {proc.returncode}; see above)",
                flush=True,
            )
            continue
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        print(
            f"[{i}/{len(todo)}] {time.time() - t0:6.0f}s {cell_key(cell)} prefill {rec['prefill_s']}s "
            f"decode {rec['decode_tok_s']} t/s peak {rec['peak_rss_mib']} MiB "
            f"(work {rec.get('work_peak_rss_mib')}) -> {rec['output']!r} "
            f"({'ok' if rec['correct'] else 'miss'})",
            flush=True,
        )


if __name__ == "__main__":
    main()
