"""A lab-model grid on 2 Ray workers against the local executor: wall time ratio in one run.

The grid (24 cells by default: 2 methods × passkey at 16k tokens × 12 samples) runs first
in this process (``run_bench``, the local executor: it loads the model and computes every
cell on one torch thread), then on a local Ray cluster with ``--workers`` actors of one CPU
and one torch thread each (``RayExecutor``). The "whole run" time counts starting the worker
processes and loading the model in each, not starting the cluster (on a real cluster it is
already up; that time is printed apart); "cells only" starts once the model is loaded and
the grid planned (the progress callback's ``plan`` event), in both runs. Both runs write fresh databases, whose scores and
token counts are checked to be equal.

    python benchmarks/ray_grid.py                  # about two minutes on 2 cores
    python benchmarks/ray_grid.py --lengths 4k,8k --samples 3

The Ray workers need the machine's cores to themselves: the load average before and after
is printed, since other jobs on the cores make the ratio meaningless.

A worker needs a few seconds to start (a Python process that imports torch and transformers
and loads the model), so the grid must hold enough work to amortize it: with S seconds of
start-up and T seconds of local work, 2 workers reach at most T / (T / 2 + S).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from longreach.bench import BenchConfig, ResultStore, parse_lengths, run_bench


def _rows(db: Path) -> dict[str, tuple]:
    with ResultStore(db, create=False) as store:
        return {c.key: (c.score, c.context_tokens, c.new_tokens) for c in store.cells()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="16k")
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--method", action="append", default=None)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import ray

    from longreach.bench.ray_executor import RayExecutor

    methods = args.method or ["vanilla", "lm-infinite:window=256"]
    grid = dict(
        model="lab",
        methods=methods,
        tasks=["passkey"],
        lengths=parse_lengths(args.lengths),
        depths=[0.5],
        samples=args.samples,
        # Which cells run one after another (and so share a prefix) differs between the
        # executors; without sharing both compute the same work and the ratio is scheduling.
        share_prefix=False,
    )
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        local_db, ray_db = Path(tmp) / "local.db", Path(tmp) / "ray.db"

        marks: dict[str, float] = {}

        def planned(name: str):
            def on_event(event) -> None:
                if event.kind == "plan":
                    marks[name] = time.perf_counter()

            return on_event

        t0 = time.perf_counter()
        local = run_bench(BenchConfig(db=str(local_db), **grid), progress=planned("local"))
        local_s = time.perf_counter() - t0
        local_cells_s = time.perf_counter() - marks["local"]

        t0 = time.perf_counter()
        ray.init(
            num_cpus=args.workers,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
        )
        cluster_s = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            distributed = run_bench(
                BenchConfig(db=str(ray_db), **grid),
                executor=RayExecutor(workers=args.workers),
                progress=planned("ray"),
            )
            ray_s = time.perf_counter() - t0
            ray_cells_s = time.perf_counter() - marks["ray"]
        finally:
            ray.shutdown()
        same = _rows(local_db) == _rows(ray_db)

    print(f"grid: {local.total} cells ({', '.join(methods)} × passkey × {args.lengths} × "
          f"{args.samples} samples), lab model, 1 torch thread per process")  # fmt: skip
    print(
        f"cells computed: local {local.computed}, ray {distributed.computed}; "
        "columns: whole run, cells only (after the model is loaded)"
    )
    print(f"{'local executor':<22}{local_s:7.1f} s   {local_cells_s:7.1f} s")
    print(
        f"{f'ray, {args.workers} workers':<22}{ray_s:7.1f} s   {ray_cells_s:7.1f} s   "
        f"(cluster start {cluster_s:.1f} s, not counted)"
    )
    print(
        f"{'speed-up':<22}{local_s / ray_s:7.2f}x   {local_cells_s / ray_cells_s:7.2f}x "
        "   (goal >= 1.6x)"
    )
    print(f"scores and token counts equal: {'yes' if same else 'NO'}")
    print(f"load average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
