"""The flex-attention backend: sparse block masks from the plan, and whole models on it.

On CPU flex attention runs eagerly (it materialises each call's scores: only for checking);
on CUDA the same block masks feed the compiled kernel (benchmarks/gpu_check.sh). The kernel
tests in tests/test_attention.py run every layout on this backend too.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny import tiny_model

import longreach as lr
from longreach.attention import LambdaLayout, block_attention
from longreach.attention import kernel as kernel_module
from longreach.attention.flex import BLOCK, _block_tables, _local_bounds, plan_regions
from longreach.attention.layout import Region, plan

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def test_a_lambda_mask_touches_only_the_band_and_the_sinks():
    n, window = 8192, 512
    p = LambdaLayout(sinks=4, window=window).plan(n, n)
    regions = plan_regions(p)[0]
    bounds = _local_bounds(regions, p.q_offset, 0, n, n, n)
    partial, full = _block_tables(bounds, n, n, None)
    nq = n // BLOCK
    touched = int((partial | full).sum())
    # per query block: the sink block and the band's window/128 + 1 blocks
    assert touched <= nq * (window // BLOCK + 2), f"{touched} blocks touched, expected a band"
    assert int(full.sum()) >= nq * (window // BLOCK - 2), "the band's inner blocks are full"
    assert touched < nq * nq // 10, f"{touched} of {nq * nq} blocks: not sparse"


def test_region_count_is_padded_to_a_power_of_two():
    regions = [Region(k=(i * 10, i * 10 + 10), d=(0, None)) for i in range(5)]
    bounds = _local_bounds(regions, 0, 0, 100, 100, 100)
    assert bounds.shape == (8, 6), f"{tuple(bounds.shape)}: 5 regions pad to 8 rows"
    assert bounds[5:].abs().sum() == 0, "padding rows are empty regions"


def test_log_sum_exp_equals_the_tile_loop():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 700, 32, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    p = plan([Region(d=(0, 99)), Region(k=(0, 8), d=(100, None))], 700, 700, block=128)
    o1, l1 = block_attention(q, k, v, p, backend="flash_cpu", return_lse=True)
    o2, l2 = block_attention(q, k, v, p, backend="flex", return_lse=True)
    assert (o1 - o2).abs().max() < 1e-5 and (l1 - l2).abs().max() < 1e-4


def test_a_plan_made_of_pieces_alone_works():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=g) for _ in range(3))
    p = plan([Region(d=(0, 49)), Region(k=(0, 4), d=(50, None))], 300, 300, block=64)
    bare = type(p)(p.q_len, p.kv_len, p.q_offset, p.tiles)  # no regions: one per piece
    want = block_attention(q, k, v, p, backend="flash_cpu")
    got = block_attention(q, k, v, bare, backend="flex")
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("spec", "n"),
    [
        ("lm-infinite:window=64,sinks=4", 300),
        ("self-extend:group=4,window=32", 300),
        ("infllm:init=4,block=8,window=64,topk=4,repr=2,chunk=16,dense=128", 600),
    ],
)
def test_models_on_flex_equal_the_cpu_kernel(monkeypatch, spec, n):
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(n))
    with lr.extend(model, spec), torch.no_grad():
        want = lr.prefill(model, ids, chunk=128).logits
        monkeypatch.setattr(kernel_module, "default_backend", lambda device: "flex")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = lr.prefill(model, ids, chunk=128).logits
    err = float((got - want).abs().max())
    assert err < 1e-4, f"{spec}: flex differs from the CPU kernel by {err:.2e}"
