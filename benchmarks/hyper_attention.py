"""One layer's causal attention: `hyper` (HyperAttention) or `hip` against dense SDPA, as ratios.

Random queries, keys and values with SmolLM2-135M's head shape (9 query / 3 KV heads x 64),
one pass over n tokens with hyper's defaults (or the given parameters), or hip's defaults
(``--layout hip``: its plans run through the block kernel as the attention function runs
them); CPU seconds of this process for each, interleaved, the median of ``--repeats``; the
ratio is SDPA's time over the layout's (above 1: it is faster). For hyper it also prints
the pairs it computes per head.

    taskset -c 0 python benchmarks/hyper_attention.py --lengths 16k --dtype bfloat16
    python benchmarks/hyper_attention.py --lengths 16k,32k --dtype float32 --block-size 128
    python benchmarks/hyper_attention.py --lengths 32k,64k --dtype bfloat16 --layout hip
"""

from __future__ import annotations

import argparse
import statistics
import time


def _length(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def pairs(n: int, block: int, sample: int, min_seq_len: int) -> int:
    """(query, key) pairs per head hyper computes for a causal square of n tokens."""
    if n <= min_seq_len:
        return n * (n + 1) // 2
    h = (n + 1) // 2
    rows = n - h
    rect = rows * h if rows < min_seq_len or h <= block else rows * (block + sample)
    return pairs(h, block, sample, min_seq_len) + pairs(rows, block, sample, min_seq_len) + rect


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="16k")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--sample-size", type=int, default=256)
    parser.add_argument("--min-seq-len", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layout", default="hyper", choices=["hyper", "hip"])
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from longreach.attention.kernel import block_attention
    from longreach.attention.layout import AttentionCall
    from longreach.methods.hip import HiPLayout
    from longreach.methods.hyper import HyperLayout

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.layout == "hip":
        layout = HiPLayout()

        def attend(call):  # what longreach.attention.hf.attention_forward runs
            for work in layout.prepare(call):
                r0, r1 = work.rows
                block_attention(call.query[:, :, r0:r1], call.key, call.value, work.plan,
                                position_sets=work.sources)  # fmt: skip
    else:
        layout = HyperLayout(
            block_size=args.block_size, sample_size=args.sample_size, min_seq_len=args.min_seq_len
        )
        attend = layout.attend
    print(f"{args.dtype}, {torch.get_num_threads()} threads, {layout}")
    name = f"{args.layout} s"
    print(f"{'n':>7} {'sdpa s':>8} {name:>8} {'speed-up':>9} {'pairs x dense':>14}")
    for n in (_length(x) for x in args.lengths.split(",")):
        g = torch.Generator().manual_seed(n)
        q = torch.randn(1, 9, n, 64, generator=g).to(dtype)
        k = torch.randn(1, 3, n, 64, generator=g).to(dtype)
        v = torch.randn(1, 3, n, 64, generator=g).to(dtype)
        call = AttentionCall(None, 0, q, k, v, 0)
        dense, hyper = [], []
        for _ in range(args.repeats):
            t = time.process_time()
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            dense.append(time.process_time() - t)
            t = time.process_time()
            attend(call)
            hyper.append(time.process_time() - t)
        d, h = statistics.median(dense), statistics.median(hyper)
        share = pairs(n, args.block_size, args.sample_size, args.min_seq_len) / (n * (n + 1) / 2)
        shown = f"{share:>14.3f}" if args.layout == "hyper" else f"{'-':>14}"
        print(f"{n:>7} {d:>8.2f} {h:>8.2f} {d / h:>9.2f} {shown}")


if __name__ == "__main__":
    main()
