"""Why infllm misses a needle: its retrieval, or what the model does with what it retrieves?

For one needle cell (SmolLM2-135M, a task with one planted value, e.g. niah or passkey on
the PG essays) this prefills the prompt under ``infllm`` twice, each in a fresh child:

- ``as-run``: the method unchanged. At the final prefill chunk (the one that gives the first
  answer token) it records, per layer, the rank of the needle's memory block among all
  blocks under the scores that retrieval uses (the representatives against the chunk's mean
  query), under the representatives against the chunk's last ``--tail`` queries, and under
  the exact attention mass that those last queries give each block over the whole memory
  (what full attention at the memory's distance would pick; an oracle, not a method);
- ``forced``: the needle's blocks join every layer's selection from the final chunk on, in
  place of the chosen blocks with the highest indices (the selection stays ``topk`` blocks) (the decode steps included): the answer the model
  gives when retrieval cannot miss. A right answer here and a wrong one as run means the
  selection is the failure, not the positions (every memory token at distance ``window``).

Rank 0 is the best block; the method keeps the ``topk`` best (16 by default). A needle
still inside the local window at the final chunk (depth near 1) gets no ranks and nothing
to force. The exact scores hold (tail x heads x memory tokens) fp32 logits at once and use
the default 1/sqrt(d) scale: meant for 8k-128k on SmolLM2, not for 1M. One JSON line
per (cell, mode) goes to ``--out``; a rerun skips what is there.

    python benchmarks/infllm_retrieval.py --tasks niah,passkey --depths 0.25,0.5,0.75 \
        --out benchmarks/results/infllm_retrieval.jsonl
    python benchmarks/infllm_retrieval.py --table benchmarks/results/infllm_retrieval.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODES = ("as-run", "forced")


def _token_at(tok, ids: list[int], char: int) -> int:
    """Index of the token of ``ids`` whose text holds character ``char`` of their decoding."""
    lo, hi = 0, len(ids)
    while lo < hi:  # the shortest prefix whose text reaches past ``char``
        mid = (lo + hi) // 2
        if len(tok.decode(ids[:mid])) > char:
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


def run_cell(cell: dict) -> dict:
    import torch

    import longreach as lr
    from longreach import compat
    from longreach.attention import hf
    from longreach.methods import build_method
    from longreach.methods.infllm import InfLLMLayout
    from longreach.prefill import greedy, prefill
    from longreach.tasks import PromptFormat, get_task

    torch.set_num_threads(cell["threads"])
    model, tok = lr.load("smollm2-135m", dtype=compat.default_dtype())
    model.eval()
    task = get_task(cell["task"], haystack=cell["haystack"])
    sample = task.generate(PromptFormat(tok), cell["n"], cell["depth"], 0, cell["sample"])
    ids = sample.input_ids
    n = len(ids)
    text = tok.decode(ids)
    value = sample.expected[0]
    at = text.find(value)
    if at < 0:
        raise SystemExit(f"the expected value {value!r} is not in the prompt's text")
    # the needle's sentence starts after the last ". " or line break before the value (so
    # for "The special magic number for X is: V." and "The pass key is V.")
    start = max(text.rfind(". ", 0, at) + 2, text.rfind("\n", 0, at) + 1, 0)
    first, last = _token_at(tok, ids, start), _token_at(tok, ids, at + len(value) - 1)
    method = build_method(cell["method"])
    base = method.layout(model)
    needle = list(range((first - base.init) // base.block, (last - base.init) // base.block + 1))
    ranks: list[dict] = []
    tail = cell["tail"]

    @dataclasses.dataclass(frozen=True)
    class Probe(InfLLMLayout):
        """InfLLM's layout, watched (and with ``force``, helped) from the final chunk on."""

        force: bool = False
        seen: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)

        def _sparse(self, call, state, slot_base, p0, s, e):
            self.seen["layer"], self.seen["late"] = call.layer, e >= n
            self.seen["final"] = e == n
            return super()._sparse(call, state, slot_base, p0, s, e)

        def retrieve(self, state, far_query):
            chosen = super().retrieve(state, far_query)
            nb = state.n_blocks
            if not self.seen["late"] or nb <= self.topk or needle[-1] >= nb:
                return chosen
            if self.seen["final"]:
                ranks.append(self.ranks(state, far_query))
            if not self.force:
                return chosen
            keep = [b for b in chosen.tolist() if b not in needle][: self.topk - len(needle)]
            return torch.tensor(sorted(keep + needle), device=chosen.device)

        def ranks(self, state, far_query) -> dict:
            reps = state.representatives().to(far_query.device)  # (nb, Hkv, D)
            hkv, dim = reps.shape[1], reps.shape[2]

            def rep_rank(q):  # retrieval's own score, shared by the heads
                mean = q[0].float().mean(1).view(hkv, -1, dim).sum(1)
                score = torch.einsum("nhd,hd->n", reps, mean)
                return min(int((score > score[b]).sum()) for b in needle)

            keys, _ = state.store.gather(torch.arange(state.n_blocks, device=reps.device))
            keys = keys.float().view(hkv, state.n_blocks, self.block, dim)
            q = far_query[0, :, -tail:].float()
            q = q.view(hkv, q.shape[0] // hkv, q.shape[1], dim)
            logits = torch.einsum("hgqd,hnbd->hgqnb", q, keys) * dim**-0.5
            mass = logits.flatten(-2).softmax(-1).view(logits.shape).sum((0, 1, 2, 4))
            return {
                "layer": self.seen["layer"],
                "blocks": state.n_blocks,
                "rep_chunk": rep_rank(far_query),
                "rep_tail": rep_rank(far_query[:, :, -tail:]),
                "mass_tail": min(int((mass > mass[b]).sum()) for b in needle),
            }

    layout = Probe(
        **{f.name: getattr(base, f.name) for f in dataclasses.fields(InfLLMLayout)},
        force=cell["mode"] == "forced",
        seen={},
    )
    t0 = time.perf_counter()
    with torch.no_grad(), lr.extend(model, cell["method"]) as handle, hf.use(model, layout):
        state = prefill(model, torch.tensor([ids]), chunk=cell["chunk"], cache=handle.new_cache())
        new = greedy(model, state, sample.max_new_tokens, tok.eos_token_id)
        if hasattr(state.cache, "close"):
            state.cache.close()
    out = tok.decode(new[0], skip_special_tokens=True)
    return {
        **cell, "tokens": n, "needle_tokens": [first, last], "needle_blocks": needle,
        "topk": base.topk, "seconds": round(time.perf_counter() - t0, 1),
        "expected": value, "output": out.strip()[:40],
        "correct": int(task.score(sample, out) >= 1.0), "ranks": ranks,
    }  # fmt: skip


def cell_key(c: dict) -> tuple:
    return (c["method"], c["task"], c["haystack"], c["n"], c["depth"], c["sample"], c["mode"])


def print_table(records: list[dict]) -> None:
    print("answers: as run / with the needle's blocks forced into every layer's selection")
    rows: dict[tuple, dict] = {}
    for r in records:
        rows.setdefault(cell_key(r)[:-1], {})[r["mode"]] = r
    print(f"{'task':8s} {'haystack':9s} {'n':>6s} {'depth':>5s} {'as run':>16s} {'forced':>16s}"
          f"  layers with the needle in the top-k: reps (chunk) / reps (tail) / mass (tail)")  # fmt: skip
    for key in sorted(rows):
        got = rows[key]

        def show(mode: str, got: dict = got) -> str:
            r = got.get(mode)
            return "-" if r is None else f"{'✓' if r['correct'] else '✗'} {r['output'][:12]!r}"

        r = got.get("as-run")
        counts = "-"
        if r is not None and r["ranks"]:
            k = r["topk"]
            counts = " / ".join(
                str(sum(x[f] < k for x in r["ranks"])) for f in ("rep_chunk", "rep_tail", "mass_tail")
            ) + f" of {len(r['ranks'])}"  # fmt: skip
        print(f"{key[1]:8s} {key[2]:9s} {key[3]:6d} {key[4]:5.2f} {show('as-run'):>16s} "
              f"{show('forced'):>16s}  {counts}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="infllm")
    parser.add_argument("--lengths", default="32k")
    parser.add_argument("--tasks", default="niah,passkey")
    parser.add_argument("--haystacks", default="pg")
    parser.add_argument("--depths", default="0.25,0.5,0.75")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--tail", type=int, default=48, help="final queries for the tail scores")
    parser.add_argument("--chunk", type=int, default=8192, help="prefill tokens per call")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/infllm_retrieval.jsonl")
    parser.add_argument("--table", default=None)
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))), flush=True)
        return
    if args.table:
        print_table([json.loads(x) for x in Path(args.table).read_text().splitlines() if x])
        return
    from longreach.bench.grid import parse_length

    out = Path(args.out)
    records = [json.loads(x) for x in out.read_text().splitlines() if x] if out.exists() else []
    done = {cell_key(r) for r in records}
    cells = [
        dict(method=args.method, task=task, haystack=hay, n=parse_length(n), depth=float(d),
             sample=s, mode=mode, tail=args.tail, chunk=args.chunk, threads=args.threads)
        for n in args.lengths.split(",") for task in args.tasks.split(",")
        for hay in args.haystacks.split(",") for d in args.depths.split(",")
        for s in range(args.samples) for mode in args.modes.split(",")
    ]  # fmt: skip
    todo = [c for c in cells if cell_key(c) not in done]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} done, {len(todo)} to run", flush=True)
    for i, cell in enumerate(todo, 1):
        proc = subprocess.run(
            [sys.executable, __file__, "--cell", json.dumps(cell)],
            stdout=subprocess.PIPE,
            text=True,
        )
        if proc.returncode != 0:
            print(f"[{i}/{len(todo)}] {cell_key(cell)} failed (exit {proc.returncode})", flush=True)
            continue
        record = json.loads(proc.stdout.strip().splitlines()[-1])
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"[{i}/{len(todo)}] {cell_key(cell)}: {record['output']!r} "
              f"({'right' if record['correct'] else 'wrong'}, {record['seconds']} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
