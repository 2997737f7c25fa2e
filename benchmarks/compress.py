"""Compress while reading: our eviction policies against NVIDIA kvpress, side by side.

Every cell (side x method x haystack x length x budget x depth) runs in a fresh child
process, so each one's peak RSS is its own (the model included, the same on both sides).

- **ours**: ``longreach.extend(model, policy)`` and a chunked prefill (``--chunk``, default
  1024): each chunk is scored and evicted before the next arrives.
- **kvpress**: its presses in their own virtual environment (kvpress pins transformers
  < 5.3), which ``--kvpress-venv DIR`` names and this script creates when it is missing
  (``pip install torch==2.13.0 kvpress==0.5.5 "transformers<5.3"``). A press compresses after
  the whole input is prefilled in one forward (``compression_ratio = 1 - budget / n``).
- **vanilla**: the unmodified model, chunked prefill, the whole cache kept.

Peak RSS is the process's high-water mark during the prefill (``VmHWM``, reset once the
model is loaded: the loaded model plus all the prefill adds, not the loading's transients);
``base_rss_mib`` is the RSS when the prefill starts. kvpress's forward is asked for the last
position's logits only, as ours (a 16k x vocabulary logits tensor would be 1.6 GB).

Both sides read the same token ids (passkey prompts built here with longreach's tasks,
the same SmolLM2-135M files from longreach's model cache, the same dtype), answer greedily
and decode ``--decode`` tokens (at least the task's answer length) for the decode speed; the
answer is scored on the task's own first tokens. Results append to ``--out`` (JSONL), and
a rerun skips finished cells. ``--table FILE`` prints the tables.

    python benchmarks/compress.py --lengths 8k,16k --budgets 2048,4096          # side by side
    python benchmarks/compress.py --sides ours,vanilla --lengths 32k,64k --budgets 2048

Targets: at 32k with budget 2048, peak RSS <= 0.5x vanilla's and decode >= 2x vanilla's
tokens/s; at 16k, peak RSS <= 0.6x kvpress's at the same budget with accuracy >= kvpress's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = {
    "snapkv": "snapkv:budget={b}",
    "streaming": "streaming:window={w}",
    "h2o": "h2o:budget={b}",
    "sirllm": "sirllm:budget={b}",
}
KVPRESS = {"snapkv": "SnapKVPress", "streaming": "StreamingLLMPress"}


def _length(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def _status_mib(field: str) -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no {field} in /proc/self/status")


def _start_peak() -> float:
    """Reset the RSS high-water mark to the current RSS (the loaded model); return that RSS."""
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")
    return _status_mib("VmRSS")


def _peak(base: float) -> dict:
    return {
        "peak_rss_mib": _status_mib("VmHWM"),
        "base_rss_mib": base,
        "process_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


# --------------------------------------------------------------------------- children


def ours_cell(cell: dict, prompt: dict) -> dict:
    import torch

    import longreach as lr
    from longreach.prefill import greedy, prefill

    torch.set_num_threads(cell["threads"])
    model, tok = lr.load("smollm2-135m", dtype=cell["dtype"])
    ids = torch.tensor([prompt["ids"]])
    spec = "vanilla" if cell["side"] == "vanilla" else cell["spec"]
    with torch.no_grad(), lr.extend(model, spec) as handle:
        base = _start_peak()
        t0 = time.perf_counter()
        state = prefill(
            model, ids, chunk=min(cell["chunk"], ids.shape[1]), cache=handle.new_cache()
        )
        prefill_s = time.perf_counter() - t0
        peak = _peak(base)
        resident = getattr(state.cache, "resident", None)
        t1 = time.perf_counter()
        new = greedy(model, state, cell["decode"])[0].tolist()
        decode_s = time.perf_counter() - t1
    return {
        "answer_ids": new[: prompt["max_new_tokens"]],
        "answer": tok.decode(new[: prompt["max_new_tokens"]], skip_special_tokens=True),
        "prefill_s": round(prefill_s, 2),
        "decode_tok_s": round((len(new) - 1) / decode_s, 2),
        **peak,
        "cache_tokens": max(resident) if resident else state.cache.get_seq_length(),
    }


def kvpress_cell(cell: dict, prompt: dict) -> dict:
    import kvpress
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    torch.set_num_threads(cell["threads"])
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[cell["dtype"]]
    model = AutoModelForCausalLM.from_pretrained(cell["model_dir"], dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(cell["model_dir"])
    ids = torch.tensor([prompt["ids"]])
    n = ids.shape[1]
    ratio = max(0.0, 1.0 - cell["budget"] / n)
    press_type = getattr(kvpress, KVPRESS[cell["method"]])
    press = press_type(compression_ratio=ratio)
    cache = DynamicCache()
    with torch.no_grad():
        base = _start_peak()
        t0 = time.perf_counter()
        with press(model):  # the logits of the last position only, as ours
            out = model(
                input_ids=ids[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1
            )
        prefill_s = time.perf_counter() - t0
        peak = _peak(base)
        kept = cache.layers[0].keys.shape[-2]
        token = ids[:, -1:]
        new = []
        t1 = time.perf_counter()
        for i in range(cell["decode"]):
            # true positions, as kvpress's own pipeline passes them: after a press the
            # cache holds fewer tokens than were read, so the default (the cache's
            # length) would put every decoded token thousands of positions too early
            where = torch.tensor([[n - 1 + i]])
            out = model(input_ids=token, past_key_values=cache, use_cache=True, position_ids=where)
            token = out.logits[:, -1:].argmax(-1)
            new.append(int(token))
        decode_s = time.perf_counter() - t1
    return {
        "answer_ids": new[: prompt["max_new_tokens"]],
        "answer": tok.decode(new[: prompt["max_new_tokens"]], skip_special_tokens=True),
        "prefill_s": round(prefill_s, 2),  # the last prompt token runs with the first decode
        "decode_tok_s": round(len(new) / decode_s, 2),
        **peak,
        "cache_tokens": kept + 1,
    }


# --------------------------------------------------------------------------- parent


def make_prompt(tok, haystack: str, n: int, depth: float, sample: int) -> tuple[dict, object]:
    from longreach.tasks import PromptFormat, get_task

    task = get_task("passkey", haystack=haystack)
    s = task.generate(PromptFormat(tok), n, depth, 0, sample)
    return {"ids": s.input_ids, "max_new_tokens": s.max_new_tokens}, (task, s)


def ensure_kvpress(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if python.exists():
        return python
    print(f"creating {venv} (kvpress 0.5.5, transformers < 5.3, torch 2.13.0)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "kvpress==0.5.5", "transformers<5.3"], check=True)
    return python


def key(c: dict) -> tuple:
    return (c["side"], c["method"], c["haystack"], c["n"], c["budget"], c["depth"])


def _median(rows: list[dict], field: str):
    return sorted(r[field] for r in rows)[len(rows) // 2]


def print_tables(records: list[dict], markdown: bool = False) -> None:
    groups = defaultdict(list)
    for r in records:
        groups[(r["n"], r["haystack"], r["budget"], r["side"], r["method"])].append(r)
    rows = sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0))
    cols = ["n", "haystack", "budget", "side", "method", "passkey", "prefill s", "peak MiB",
            "rise MiB", "decode t/s", "cache"]  # fmt: skip
    if markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
    else:
        print("".join(f"{c:>11s}" for c in cols))
    for (n, hay, budget, side, method), rs in rows:
        rise = [r["peak_rss_mib"] - r["base_rss_mib"] for r in rs]
        values = [
            f"{n // 1024}k", hay, str(budget or "-"), side, method,
            f"{sum(r['correct'] for r in rs)}/{len(rs)}", f"{_median(rs, 'prefill_s'):.1f}",
            f"{max(r['peak_rss_mib'] for r in rs):.0f}", f"{min(rise):.0f}-{max(rise):.0f}",
            f"{_median(rs, 'decode_tok_s'):.2f}", str(_median(rs, "cache_tokens")),
        ]  # fmt: skip
        print(
            ("| " + " | ".join(values) + " |") if markdown else "".join(f"{v:>11s}" for v in values)
        )
    # the targets, as ratios of cells measured with the same prompts
    peak = {k: max(r["peak_rss_mib"] for r in rs) for k, rs in groups.items()}
    rise = {k: max(r["peak_rss_mib"] - r["base_rss_mib"] for r in rs) for k, rs in groups.items()}
    decode = {k: _median(rs, "decode_tok_s") for k, rs in groups.items()}
    print()
    for n, hay, budget, side, method in sorted(groups, key=lambda k: (k[0], k[1], k[2] or 0)):
        if side != "ours":
            continue
        vanilla = (n, hay, None, "vanilla", "vanilla")
        if n >= 32768 and budget == 2048 and vanilla in groups:
            key = (n, hay, budget, side, method)
            print(f"{n // 1024}k {hay} {method} budget {budget}: peak RSS "
                  f"{peak[key] / peak[vanilla]:.2f}x vanilla's (target <= 0.5), decode "
                  f"{decode[key] / decode[vanilla]:.2f}x vanilla's tokens/s (target >= 2)")  # fmt: skip
        theirs = (n, hay, budget, "kvpress", method)
        if n == 16384 and theirs in groups:
            key = (n, hay, budget, side, method)
            print(f"16k {hay} {method} budget {budget}: peak RSS {peak[key] / peak[theirs]:.2f}x "
                  f"kvpress's (target <= 0.6; what the prefill adds: "
                  f"{rise[key] / rise[theirs]:.2f}x)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sides", default="ours,kvpress,vanilla")
    parser.add_argument("--methods", default="snapkv,streaming,h2o,sirllm")
    parser.add_argument("--lengths", default="8k,16k")
    parser.add_argument("--budgets", default="2048,4096")
    parser.add_argument("--haystacks", default="synthetic,pg")
    parser.add_argument("--depths", default="0.25,0.5,0.75")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--decode", type=int, default=32, help="tokens decoded per cell")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default=None, help="bf16 or fp32 (default: longreach's)")
    parser.add_argument("--kvpress-venv", default="runs/kvpress-venv")
    parser.add_argument("--out", default="runs/compress.jsonl")
    parser.add_argument("--table", default=None)
    parser.add_argument("--markdown", action="store_true", help="--table as a Markdown table")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.cell:
        cell = json.loads(Path(args.cell).read_text())
        run = kvpress_cell if cell["side"] == "kvpress" else ours_cell
        print(json.dumps(run(cell, cell["prompt"])), flush=True)
        return
    if args.table:
        records = [json.loads(x) for x in Path(args.table).read_text().splitlines() if x]
        print_tables(records, args.markdown)
        return

    from transformers import AutoTokenizer

    from longreach import compat
    from longreach.models.loader import resolve_model_dir

    model_dir = str(resolve_model_dir("smollm2-135m"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    dtype = args.dtype or {"torch.bfloat16": "bf16"}.get(str(compat.default_dtype()), "fp32")
    out = Path(args.out)
    records = (
        [json.loads(x) for x in out.read_text().splitlines() if x.strip()] if out.exists() else []
    )
    done = {key(r) for r in records}
    sides = args.sides.split(",")
    cells = []
    for n in (_length(x) for x in args.lengths.split(",")):
        for haystack in args.haystacks.split(","):
            for depth in (float(d) for d in args.depths.split(",")):
                if "vanilla" in sides:
                    cells.append(dict(side="vanilla", method="vanilla", budget=None, spec="vanilla",
                                      n=n, haystack=haystack, depth=depth))  # fmt: skip
                for budget in (int(b) for b in args.budgets.split(",")):
                    for method in args.methods.split(","):
                        for side in ("ours", "kvpress"):
                            if side not in sides or (side == "kvpress" and method not in KVPRESS):
                                continue
                            spec = OURS[method].format(b=budget, w=budget - 4)
                            cells.append(dict(side=side, method=method, budget=budget, spec=spec,
                                              n=n, haystack=haystack, depth=depth))  # fmt: skip
    todo = [c for c in cells if key(c) not in done]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} done, {len(todo)} to run", flush=True)
    python_kv = (
        ensure_kvpress(Path(args.kvpress_venv))
        if any(c["side"] == "kvpress" for c in todo)
        else None
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    for i, cell in enumerate(todo, 1):
        prompt, (task, sample) = make_prompt(tok, cell["haystack"], cell["n"], cell["depth"], 0)
        full = dict(cell, prompt=prompt, chunk=args.chunk, decode=max(args.decode, prompt["max_new_tokens"]),
                    threads=args.threads, dtype=dtype, model_dir=model_dir)  # fmt: skip
        python = python_kv if cell["side"] == "kvpress" else sys.executable
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(full, f)
        t0 = time.time()
        try:
            proc = subprocess.run(
                [str(python), __file__, "--cell", f.name], capture_output=True, text=True,
                env=env, cwd=ROOT,
            )  # fmt: skip
        finally:
            os.unlink(f.name)
        if proc.returncode != 0:
            print(f"[{i}/{len(todo)}] FAILED {key(cell)}: {proc.stderr.strip()[-800:]}", flush=True)
            continue
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        rec = dict(cell, **{k: v for k, v in got.items() if k != "answer_ids"}, tokens=len(prompt["ids"]),
                   dtype=dtype, threads=args.threads, expected=sample.expected[0],
                   correct=int(task.score(sample, got["answer"]) >= 1.0))  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(
            f"[{i}/{len(todo)}] {time.time() - t0:5.0f}s {key(cell)} prefill {rec['prefill_s']}s "
            f"peak {rec['peak_rss_mib']} MiB decode {rec['decode_tok_s']} t/s cache "
            f"{rec['cache_tokens']} -> {rec['answer'].strip()[:24]!r} "
            f"({'ok' if rec['correct'] else 'miss'})",
            flush=True,
        )


if __name__ == "__main__":
    main()
