"""CUDA check of the block kernel: exactness against SDPA, and the Λ speed-up at 32k and 128k.

Run by ``benchmarks/gpu_check.sh`` on a machine with an NVIDIA GPU (at most about five
minutes on one H100/H200-class GPU); CI never runs it. It checks, on CUDA:

1. exactness of both CUDA backends (``flex``, the default there, and ``torch``) against
   ``F.scaled_dot_product_attention``: causal at n = 1, 300 and 4096 in fp32 and bf16, and a
   Λ layout (window 512, 4 sinks) against SDPA with the same boolean mask at n = 4096;
2. a tiny model extended with lm-infinite: logits on the flex backend against the torch
   backend;
3. speed: one attention call of a Llama-8B-shaped layer (32 query heads, 8 KV heads, head
   dim 128, bf16) at 32k and 128k tokens, the Λ layout (window 4096, 4 sinks) on the flex
   backend against SDPA causal (flash). Median of 5 after a warm-up that includes
   compilation; the ratio is printed.

Results go to stdout and, as JSON, to ``--out`` (default ``benchmarks/results/gpu_check.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from longreach.attention import CausalLayout, LambdaLayout, block_attention  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def qkv(n, hq, hkv, dim, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape_q, shape_kv = (1, hq, n, dim), (1, hkv, n, dim)
    q = torch.randn(shape_q, generator=g, device="cuda", dtype=dtype)
    k = torch.randn(shape_kv, generator=g, device="cuda", dtype=dtype)
    v = torch.randn(shape_kv, generator=g, device="cuda", dtype=dtype)
    return q, k, v


def lambda_mask(n, window, sinks):
    i = torch.arange(n, device="cuda")[:, None]
    j = torch.arange(n, device="cuda")[None, :]
    return (j <= i) & ((i - j < window) | (j < sinks))


def exactness(rows):
    for dtype in (torch.float32, torch.bfloat16):
        for backend in ("flex", "torch"):
            for n in (1, 300, 4096):
                q, k, v = qkv(n, 8, 2, 64, dtype)
                got = block_attention(q, k, v, CausalLayout().plan(n, n), backend=backend)
                want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                err = float((got.float() - want.float()).abs().max())
                rows.append(dict(check="causal", backend=backend, dtype=str(dtype), n=n, err=err,
                                 ok=err <= TOL[dtype]))  # fmt: skip
            n = 4096
            q, k, v = qkv(n, 8, 2, 64, dtype, seed=1)
            plan = LambdaLayout(sinks=4, window=512).plan(n, n)
            got = block_attention(q, k, v, plan, backend=backend)
            mask = lambda_mask(n, 512, 4)
            want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            err = float((got.float() - want.float()).abs().max())
            rows.append(dict(check="lambda", backend=backend, dtype=str(dtype), n=n, err=err,
                             ok=err <= TOL[dtype]))  # fmt: skip


def model_check(rows):
    from tiny import tiny_model

    import longreach as lr
    from longreach.attention import kernel

    model = tiny_model("llama").cuda()
    ids = torch.randint(3, 256, (1, 600), device="cuda")
    out = {}
    original = kernel.default_backend
    try:
        for backend in ("torch", "flex"):
            kernel.default_backend = lambda device, b=backend: b
            with lr.extend(model, "lm-infinite:window=64,sinks=4"), torch.no_grad():
                out[backend] = lr.prefill(model, ids, chunk=128).logits
    finally:
        kernel.default_backend = original
    err = float((out["flex"] - out["torch"]).abs().max())
    rows.append(dict(check="model lm-infinite", backend="flex vs torch", dtype="float32",
                     n=600, err=err, ok=err <= 1e-3))  # fmt: skip


def timed(fn, repeats=5):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed_at(n):
    q, k, v = qkv(n, 32, 8, 128, torch.bfloat16, seed=2)
    plan = LambdaLayout(sinks=4, window=4096).plan(n, n)
    dense = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    flex = timed(lambda: block_attention(q, k, v, plan, backend="flex"))
    return dict(check="speed", n=n, sdpa_causal_s=dense, lambda_flex_s=flex, speedup=dense / flex)


def speed(rows, lengths):
    for n in lengths:
        rows.append(speed_at(n))
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu_check.json"))
    parser.add_argument("--lengths", default="32768,131072")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a machine with an NVIDIA GPU.")
        return 2
    warnings.filterwarnings("ignore")
    rows: list[dict] = []
    t0 = time.perf_counter()
    for step in (exactness, model_check):
        try:
            step(rows)
        except Exception as exc:  # noqa: BLE001 - report every check, then fail
            rows.append(dict(check=step.__name__, ok=False, error=f"{type(exc).__name__}: {exc}"))
    try:
        speed(rows, [int(x) for x in args.lengths.split(",")])
    except Exception as exc:  # noqa: BLE001
        rows.append(dict(check="speed", ok=False, error=f"{type(exc).__name__}: {exc}"))
    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                seconds=time.perf_counter() - t0, rows=rows)  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=1))
    for row in rows:
        print(json.dumps(row))
    failed = [r for r in rows if r.get("ok") is False]
    print(f"{info['device']}: {len(rows) - len(failed)} of {len(rows)} rows ok "
          f"in {info['seconds']:.0f} s")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
