"""The block kernel equals SDPA (causal) and the dense masked reference (sparse layouts)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import causal_map, dense_attention, region_map
from torch.utils._python_dispatch import TorchDispatchMode

from longreach.attention import (
    BlockLayout,
    CausalLayout,
    LambdaLayout,
    PositionSet,
    Region,
    RegionLayout,
    block_attention,
    rotate,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (device, backend): every backend on CPU (flex attention runs eagerly there: the same
# block masks as on CUDA, without the compiled kernel); on CUDA the flex and torch paths.
BACKENDS = [("cpu", "flash_cpu"), ("cpu", "torch"), ("cpu", "flex")] + [
    ("cuda", "flex"),
    ("cuda", "torch"),
] * torch.cuda.is_available()
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def qkv(batch, heads, kv_heads, q_len, kv_len, dim=32, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=g)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("n", [1, 17, 300, 2049])
def test_full_causal_equals_sdpa_fp32(device, backend, n):
    q, k, v = qkv(2, 4, 2, n, n, device=device)
    plan = CausalLayout(block=256).plan(n, n)
    got = block_attention(q, k, v, plan, backend=backend)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    err = (got - want).abs().max().item()
    assert err <= 1e-5, f"fp32 causal n={n} ({backend}): max error {err:.2e}, expected <= 1e-5"


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("n", [1, 17, 300])
def test_full_causal_equals_sdpa_bf16(device, backend, n):
    q, k, v = qkv(1, 6, 2, n, n, dtype=torch.bfloat16, device=device)
    got = block_attention(q, k, v, CausalLayout(block=64).plan(n, n), backend=backend)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert got.dtype == torch.bfloat16, f"output dtype {got.dtype}, expected bfloat16"
    err = (got.float() - want.float()).abs().max().item()
    assert err <= 2e-2, f"bf16 causal n={n} ({backend}): max error {err:.2e}, expected <= 2e-2"


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize(("q_len", "kv_len"), [(1, 300), (37, 300), (64, 129)])
def test_queries_after_a_cache_equal_sdpa(device, backend, q_len, kv_len):
    """Chunked prefill and decoding: the queries are the newest q_len of kv_len keys."""
    q, k, v = qkv(1, 4, 2, q_len, kv_len, device=device)
    got = block_attention(q, k, v, CausalLayout(block=32).plan(q_len, kv_len), backend=backend)
    mask = (causal_map(q_len, kv_len) >= 0).to(device)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    err = (got - want).abs().max().item()
    assert err <= 1e-5, (
        f"{q_len} queries after {kv_len - q_len} cached ({backend}): error {err:.2e} > 1e-5"
    )


SPARSE = {
    "lambda": LambdaLayout(sinks=4, window=50, block=32),
    "lambda-no-sinks": LambdaLayout(sinks=0, window=33, block=16),
    "lambda-window-beyond-length": LambdaLayout(sinks=4, window=1000, block=64),
    "random-blocks": BlockLayout(
        blocks=tuple(
            tuple(
                sorted(
                    {
                        0,
                        qb,
                        *torch.randint(
                            0, qb + 1, (3,), generator=torch.Generator().manual_seed(qb)
                        ).tolist(),
                    }
                )
            )
            for qb in range(10)
        ),
        block=32,
    ),
    "sinks-band-retrieved": RegionLayout(
        fixed=(
            Region(d=(0, 40)),
            Region(k=(0, 3), d=(41, None)),
            Region(q=(200, 300), k=(64, 96), d=(41, None)),
            Region(q=(100, 300), k=(10, 20), d=(41, None)),
        ),
        block=48,
    ),
}


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("name", list(SPARSE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_layouts_equal_dense_reference(device, backend, name, dtype):
    layout, n = SPARSE[name], 300
    q, k, v = qkv(2, 4, 2, n, n, dtype=dtype, device=device, seed=1)
    got = block_attention(q, k, v, layout.plan(n, n), backend=backend)
    want = dense_attention(
        [q.cpu()], [k.cpu()], v.cpu(), region_map(layout.regions(n, n, 0), n, n, 0)
    )
    err = (got.cpu().double() - want).abs().max().item()
    assert err <= TOL[dtype], (
        f"{name} {dtype} ({backend}): max error {err:.2e}, expected <= {TOL[dtype]}"
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(SPARSE))
def test_torch_backend_with_small_tiles_equals_reference(device, name):
    """The CUDA path tiles rows and keys by key_tile; odd tiles cross every piece edge."""
    layout, n = SPARSE[name], 300
    q, k, v = qkv(1, 4, 2, n, n, device=device, seed=5)
    keep = torch.ones(1, n, dtype=torch.bool)
    keep[0, :5] = False
    got = block_attention(
        q, k, v, layout.plan(n, n), backend="torch", key_tile=7, padding=keep.to(device)
    )
    pset = region_map(layout.regions(n, n, 0), n, n, 0)
    want = dense_attention([q.cpu()], [k.cpu()], v.cpu(), pset, key_keep=keep)
    err = (got.cpu().double() - want).abs().max().item()
    assert err <= 1e-5, f"{name} with key_tile=7: max error {err:.2e}, expected <= 1e-5"


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_key_padding_equals_reference(device, backend):
    n = 120
    q, k, v = qkv(3, 4, 2, n, n, device=device, seed=2)
    keep = torch.ones(3, n, dtype=torch.bool)
    keep[0, :37] = False  # left padding
    keep[1, 50:53] = False  # a hole
    layout = LambdaLayout(sinks=2, window=40, block=32)
    got = block_attention(q, k, v, layout.plan(n, n), backend=backend, padding=keep.to(device))
    want = dense_attention(
        [q.cpu()], [k.cpu()], v.cpu(), region_map(layout.regions(n, n, 0), n, n, 0), key_keep=keep
    )
    err = (got.cpu().double() - want).abs().max().item()
    assert err <= 1e-5, f"padded keys ({backend}): max error {err:.2e}, expected <= 1e-5"
    assert got[0, :, :37].abs().max().item() == 0.0, (
        "queries that see only padding must output 0 (as SDPA does)"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_triangles_equal_reference(dtype):
    """flash_cpu runs 384-768-row LOWER/UPPER squares as halves: the same pairs, merged exactly."""
    from longreach.attention.layout import Kind

    n = 1800
    q, k, v = qkv(2, 4, 2, n, n, dtype=dtype, seed=5)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, :300] = False  # left padding: some half-squares see only padding
    layout = LambdaLayout(sinks=4, window=900, block=512)
    plan = layout.plan(n, n)
    sizes = {(p.kind, p.q1 - p.q0) for t in plan.tiles for p in t.pieces}
    assert any(kind == Kind.LOWER and 384 <= m <= 768 for kind, m in sizes), sizes
    assert any(kind == Kind.UPPER and 384 <= m <= 768 for kind, m in sizes), sizes
    got = block_attention(q, k, v, plan, backend="flash_cpu", padding=keep)
    want = dense_attention(
        [q.float()], [k.float()], v.float(), region_map(layout.regions(n, n, 0), n, n, 0),
        key_keep=keep,
    )  # fmt: skip
    err = (got.double() - want).abs().max().item()
    assert err <= TOL[dtype], (
        f"split triangles {dtype}: max error {err:.2e}, expected <= {TOL[dtype]}"
    )


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_position_sets_equal_reference(device, backend):
    """Self-Extend's shape: neighbours with the model's positions, far keys with grouped ones."""
    n, window, group = 200, 24, 4
    q, k, v = qkv(1, 4, 2, n, n, device=device, seed=3)
    freq = 1.0 / (10000 ** (torch.arange(0, 32, 2).double() / 32))
    pos = torch.arange(n)
    q_grouped = rotate(q, pos // group + window - window // group - pos, freq)
    k_grouped = rotate(k, pos // group - pos, freq)
    layout = RegionLayout(
        fixed=(Region(d=(0, window - 1)), Region(d=(window, None), pset=1)), block=32
    )
    got = block_attention(
        q,
        k,
        v,
        layout.plan(n, n),
        backend=backend,
        position_sets=[PositionSet(q_grouped, k_grouped)],
    )
    pset = region_map(layout.regions(n, n, 0), n, n, 0)
    want = dense_attention([q.cpu(), q_grouped.cpu()], [k.cpu(), k_grouped.cpu()], v.cpu(), pset)
    err = (got.cpu().double() - want).abs().max().item()
    assert err <= 1e-5, f"two position sets ({backend}): max error {err:.2e}, expected <= 1e-5"


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_partial_position_set_holds_only_needed_keys(device, backend):
    """LM-Infinite's shape: the global keys scored with other positions, held as a 4-key set."""
    n, window, n_global = 150, 30, 4
    q, k, v = qkv(1, 4, 2, n, n, device=device, seed=4)
    q_far, k_far = (
        q.flip(-1).contiguous(),
        k[:, :, :n_global].flip(-1).contiguous(),
    )  # any other tensors
    layout = RegionLayout(
        fixed=(Region(d=(0, window - 1)), Region(k=(0, n_global), d=(window, None), pset=1)),
        block=32,
    )
    got = block_attention(
        q, k, v, layout.plan(n, n), backend=backend, position_sets=[PositionSet(q_far, k_far, 0)]
    )
    k_far_full = torch.cat([k_far, k[:, :, n_global:]], dim=2)
    pset = region_map(layout.regions(n, n, 0), n, n, 0)
    want = dense_attention([q.cpu(), q_far.cpu()], [k.cpu(), k_far_full.cpu()], v.cpu(), pset)
    err = (got.cpu().double() - want).abs().max().item()
    assert err <= 1e-5, f"partial position set ({backend}): max error {err:.2e}, expected <= 1e-5"


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", ["flash_cpu", "torch"])
def test_no_tensor_grows_with_n_squared(backend):
    n, heads, dim = 1024, 2, 16
    q, k, v = qkv(1, heads, 1, n, n, dim=dim)
    plan = LambdaLayout(sinks=4, window=128, block=64).plan(n, n)
    with _LargestTensor() as probe:
        block_attention(q, k, v, plan, backend=backend, key_tile=64)
    output = n * heads * dim
    assert probe.largest <= output, (
        f"largest tensor has {probe.largest} elements; expected <= the output's {output} (n^2 = {n * n})"
    )


def test_rotate_composes_positions():
    x = torch.randn(1, 2, 5, 16, dtype=torch.float64)
    freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).double() / 16))
    a, b = torch.tensor([0, 3, 70000, 5, 9]), torch.tensor([1, -3, -69990, 0, 40000])
    got = rotate(rotate(x, a, freq), b, freq)
    want = rotate(x, a + b, freq)
    err = (got - want).abs().max().item()
    assert err <= 1e-9, f"rotating by a then b differs from rotating by a + b by {err:.2e}"


def test_bad_inputs_raise_clear_errors():
    q, k, v = qkv(1, 4, 2, 10, 10)
    with pytest.raises(ValueError, match="plan is for"):
        block_attention(q, k, v, CausalLayout().plan(9, 10))
    with pytest.raises(ValueError, match="position sets"):
        block_attention(q, k, v, RegionLayout(fixed=(Region(pset=1),)).plan(10, 10))
    with pytest.raises(ValueError, match="backend"):
        block_attention(q, k, v, CausalLayout().plan(10, 10), backend="nope")
