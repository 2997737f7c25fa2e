"""HyperAttention: sortLSH blocks plus a sampled residual, causal by recursive halving."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from longreach import compat
from longreach.attention import hf
from longreach.attention.kernel import KeyPadding, block_attention, gather_rows, row_index
from longreach.attention.layout import (
    AttentionCall,
    Kind,
    Layout,
    Piece,
    Plan,
    Region,
    Tile,
    Work,
    plan,
)
from longreach.errors import LongreachError
from longreach.methods.base import ATTENTION, Method, Patch, param
from longreach.methods.registry import register

NAME = "longreach-hyper"

# --------------------------------------------------------------------------- seeded draws


def _generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded from ``parts``: the same parts give the same stream in every run."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def lsh_projections(seed: int, layer: int, dim: int, num_projs: int) -> torch.Tensor:
    """(dim, num_projs) float32 Gaussian hyperplane normals of one layer's angular LSH."""
    return torch.randn(dim, num_projs, generator=_generator("lsh", seed, layer))


def sampled_keys(
    seed: int, layer: int, q0: int, k0: int, k1: int, shape: tuple[int, ...], size: int
) -> torch.Tensor:
    """``shape + (size,)`` int64 key offsets in ``[0, k1 - k0)``, uniform with replacement.

    One draw per block of the causal split: queries from slot ``q0`` against key slots
    ``[k0, k1)`` of layer ``layer`` (``shape`` is (batch, KV heads)).
    """
    gen = _generator("sample", seed, layer, q0, k0, k1)
    return torch.randint(k1 - k0, (*shape, size), generator=gen)


def gray_rank(num_projs: int) -> torch.Tensor:
    """(2**num_projs,) int64: each bucket's place in the reflected Gray-code order.

    Bucket b (bit t set when the vector is on the positive side of hyperplane t) comes at
    place r where gray(r) = r ^ (r >> 1) = b, so buckets next to each other in this order
    differ in exactly one hyperplane (the paper's Hamming-sorted LSH).
    """
    places = torch.arange(1 << num_projs)
    rank = torch.empty_like(places)
    rank[places ^ (places >> 1)] = places
    return rank


def buckets(x: torch.Tensor, proj: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """(..., n) int64 sort keys of the vectors x (..., n, D): angular LSH, Gray-code order."""
    bits = (x.float() @ proj) > 0
    weights = 1 << torch.arange(proj.shape[-1], device=x.device)
    return rank[(bits.long() * weights).sum(-1)]


# --------------------------------------------------------------------------- attention parts


def _full_plan(q_len: int, kv_len: int) -> Plan:
    return Plan(q_len, kv_len, 0, (Tile(0, q_len, (Piece(Kind.FULL, 0, q_len, 0, kv_len),)),))


def _padding(keep: torch.Tensor | None) -> KeyPadding | None:
    if keep is None or bool(keep.all()):
        return None
    return KeyPadding(keep)


def _merge_into(out, lse, parts) -> None:
    """Merge attentions of the same queries over disjoint key sets into ``out``/``lse`` in place.

    ``out`` (fp32) and ``lse`` hold one part already; ``parts`` are (output, log-sum-exp)
    pairs of the others, any float dtype. One pass per part, no temporaries of out's size
    beyond the weights.
    """
    total = lse
    for _, part_lse in parts:
        total = torch.logaddexp(total, part_lse)
    out.mul_((lse - total).exp_()[..., None])
    for o, part_lse in parts:
        out.addcmul_(o, (part_lse - total).exp_()[..., None])
    lse.copy_(total)


def _block_index(total: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Places ``floor(b * total / blocks) ..`` of each block b, padded to the largest block.

    Returns (index (blocks, size) clamped into range, valid (blocks, size) bool, size).
    """
    edges = torch.arange(blocks + 1) * total // blocks
    size = int((edges[1:] - edges[:-1]).max())
    index = edges[:-1, None] + torch.arange(size)[None, :]
    return index.clamp(max=total - 1), index < edges[1:, None], size


@dataclasses.dataclass
class _Run:
    """One attention call's tensors, laid out for row gathers.

    q (B, Hq, n, D), k and v (B, Hkv, S, D), contiguous, so that their (B * H * len, D)
    views hold one vector per row; ``q_bucket``/``k_bucket`` are every vector's sort key,
    hashed once per call (the layer's projection is the same for every rectangle).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    keep: torch.Tensor | None
    proj: torch.Tensor
    rank: torch.Tensor
    q_slot: int  # slot of query 0
    layer: int
    scale: float

    @functools.cached_property
    def q_bucket(self) -> torch.Tensor:  # only a rectangle with an estimator needs them
        return buckets(self.q, self.proj, self.rank)

    @functools.cached_property
    def k_bucket(self) -> torch.Tensor:
        return buckets(self.k, self.proj, self.rank)


@dataclasses.dataclass(frozen=True)
class HyperLayout(Layout):
    """The attention rule of HyperAttention for one layer (see :class:`Hyper`).

    It computes its own output (:meth:`attend`, called by :func:`hyper_attention`): the
    sorted blocks do not form regions of the slot order that a plan could describe.
    """

    windows: ClassVar[bool] = False

    lsh_num_projs: int = 7
    block_size: int = 256
    sample_size: int = 256
    min_seq_len: int = 4096
    seed: int = 0

    def prepare(self, call: AttentionCall) -> Iterator[Work]:
        raise LongreachError(
            "HyperLayout computes its own output; apply it with lr.extend(model, 'hyper')."
        )

    def attend(self, call: AttentionCall) -> torch.Tensor:
        """(B, Hq, Lq, Dv) output of one attention call (queries at slots q_offset..).

        The call's own keys follow the causal rule, the earlier ones form one rectangle.
        Results are written into one fp32 buffer (the causal split's halves are views of
        it) and merged in place; queries, keys and values are gathered as rows of their
        flattened tensors (``index_select``), never per element.
        """
        q, k, v = call.query.contiguous(), call.key.contiguous(), call.value.contiguous()
        bsz, hq, n, _ = q.shape
        keep = call.padding.keep if call.padding is not None else None
        scale = call.scale if call.scale is not None else q.shape[-1] ** -0.5
        proj = lsh_projections(self.seed, call.layer, q.shape[-1], self.lsh_num_projs)
        proj, rank = proj.to(q.device), gray_rank(self.lsh_num_projs).to(q.device)
        s = call.q_offset
        run = _Run(q, k, v, keep, proj, rank, s, call.layer, scale)
        out = torch.empty(bsz, hq, n, v.shape[-1], dtype=torch.float32, device=q.device)
        lse = torch.empty(bsz, hq, n, dtype=torch.float32, device=q.device)
        self._causal(run, 0, n, out, lse)
        if s > 0:
            _merge_into(out, lse, self._rectangle(run, 0, n, 0, s))
        return out.to(q.dtype)

    def _causal(self, run: _Run, a: int, b: int, out, lse) -> None:
        """Queries ``a..b`` over the keys at their own slots, written into out/lse[a:b].

        Exact when n = b - a <= ``min_seq_len``; else split at h = a + ceil(n / 2): both
        diagonal halves recursively, then the second half's queries over the first half's
        keys by :meth:`_rectangle`, merged in place.
        """
        n, s = b - a, run.q_slot
        if n <= self.min_seq_len:
            work = plan((Region(d=(0, None)),), n, n, 0, block=max(1024, n), check=False)
            keys = slice(s + a, s + b)
            o, o_lse = block_attention(
                run.q[:, :, a:b], run.k[:, :, keys], run.v[:, :, keys], work, scale=run.scale,
                padding=_padding(None if run.keep is None else run.keep[:, keys]),
                return_lse=True,
            )  # fmt: skip
            out[:, :, a:b] = o
            lse[:, :, a:b] = o_lse
            return
        h = a + (n + 1) // 2
        self._causal(run, a, h, out, lse)
        self._causal(run, h, b, out, lse)
        _merge_into(out[:, :, h:b], lse[:, :, h:b], self._rectangle(run, h, b, s + a, s + h))

    def _rectangle(self, run: _Run, a: int, b: int, k0: int, k1: int) -> list:
        """Queries ``a..b`` over every key of slots ``k0..k1``: HyperAttention's estimator
        without a mask. Returns (output, log-sum-exp) parts in the queries' order."""
        q, k, v = run.q, run.k, run.v
        bsz, hq, _, dim = q.shape
        hkv = k.shape[1]
        n_q, n_k, g = b - a, k1 - k0, hq // hkv
        keep = None if run.keep is None else run.keep[:, k0:k1]
        blocks = -(-n_k // self.block_size)
        if n_q < self.min_seq_len or blocks == 1:
            return [block_attention(
                q[:, :, a:b], k[:, :, k0:k1], v[:, :, k0:k1], _full_plan(n_q, n_k),
                scale=run.scale, padding=_padding(keep), return_lse=True,
            )]  # fmt: skip
        device = q.device
        q_order = torch.sort(run.q_bucket[:, :, a:b], dim=-1, stable=True).indices  # (B, Hq, Lq)
        k_order = torch.sort(run.k_bucket[:, :, k0:k1], dim=-1, stable=True).indices  # (B, Hkv, S)

        # 1. Exact attention inside block b of the sorted order: queries and keys at the same
        # quantiles of their sorted orders. Rows are (batch, KV head, block), g query heads
        # each; every tensor is gathered as whole rows of its (B * H * len, D) view.
        rows = bsz * hkv * blocks
        k_index, k_valid, k_size = _block_index(n_k, blocks)
        q_index, q_valid, q_size = _block_index(n_q, blocks)
        k_slots = k_order[..., k_index.flatten().to(device)]  # (B, Hkv, blocks * k_size)
        q_slots = q_order[..., q_index.flatten().to(device)]  # (B, Hq, blocks * q_size)
        # the query rows in (B, Hkv, blocks, g, q_size) order: one copy straight into blocks
        q_rows = row_index(q, q_slots + a).view(bsz, hkv, g, blocks, q_size).transpose(2, 3)
        q_blocks = q.view(-1, dim).index_select(0, q_rows.flatten()).view(rows, g, q_size, dim)
        k_blocks = gather_rows(k, k_slots + k0).view(rows, 1, k_size, dim)
        v_blocks = gather_rows(v, k_slots + k0).view(rows, 1, k_size, -1)
        k_keep = k_valid.to(device).expand(bsz, hkv, -1, -1)
        if keep is not None:
            k_keep = k_keep & keep.gather(1, k_slots.flatten(1)).view(bsz, hkv, blocks, k_size)
        found = [block_attention(
            q_blocks, k_blocks, v_blocks, _full_plan(q_size, k_size), scale=run.scale,
            padding=_padding(k_keep.reshape(rows, k_size)), return_lse=True,
        )]  # fmt: skip

        # 2. The residual: sample_size keys drawn uniformly (per batch row and KV head), each
        # weighted n_k / sample_size, those of the query's own block left out.
        m = self.sample_size
        if m > 0:
            picks = sampled_keys(self.seed, run.layer, run.q_slot + a, k0, k1, (bsz, hkv), m)
            picks = picks.to(device)
            place = torch.empty_like(k_order).scatter_(
                2, k_order, torch.arange(n_k, device=device).expand_as(k_order)
            )  # place of each key in the sorted order
            edges = (torch.arange(blocks + 1, device=device) * n_k // blocks)[1:-1]
            block_of = torch.bucketize(place.gather(2, picks), edges, right=True)  # (B, Hkv, m)
            s_keep = block_of[:, :, None, :] != torch.arange(blocks, device=device)[:, None]
            if keep is not None:
                s_keep = s_keep & keep.gather(1, picks.flatten(1)).view(bsz, hkv, 1, m)
            s_slots = (picks + k0)[:, :, None].expand(-1, -1, blocks, -1).flatten(2)
            o_res, l_res = block_attention(
                q_blocks,
                gather_rows(k, s_slots).view(rows, 1, m, dim),
                gather_rows(v, s_slots).view(rows, 1, m, -1),
                _full_plan(q_size, m),
                scale=run.scale,
                padding=_padding(s_keep.reshape(rows, m)),
                return_lse=True,
            )
            found.append((o_res, l_res.add_(math.log(n_k / m))))

        # 3. Back to the queries' own order. Query i of head (kv, j) sits at sorted place
        # p = inverse[i], i.e. in block p // .. at row flat[p] of that block's rows: the
        # output (rows, g, q_size, D) is laid out (rows, q_size, g, D) by the kernel, its
        # log-sum-exp (rows, g, q_size).
        flat = torch.arange(blocks * q_size).view(blocks, q_size)[q_valid].to(device)  # (Lq,)
        inverse = torch.empty_like(q_order).scatter_(
            2, q_order, torch.arange(n_q, device=device).expand_as(q_order)
        )  # sorted place of each query
        at = flat[inverse].view(bsz, hkv, g, n_q)  # block * q_size + row, per query
        head = torch.arange(g, device=device).view(1, 1, g, 1)
        base = (torch.arange(bsz * hkv, device=device) * (blocks * q_size)).view(bsz, hkv, 1, 1)
        blk, row = at // q_size, at % q_size
        o_at = ((base + at) * g + head).flatten()
        l_at = (((base + blk * q_size) * g + head * q_size) + row).flatten()
        parts = []
        for o, o_lse in found:
            o_flat = o.transpose(1, 2).reshape(-1, o.shape[-1])  # a view: (rows, q_size, g, D)
            parts.append((
                o_flat.index_select(0, o_at).view(bsz, hq, n_q, -1),
                o_lse.reshape(-1).index_select(0, l_at).view(bsz, hq, n_q),
            ))  # fmt: skip
        return parts


def hyper_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` entry: HyperAttention on the layers given a :class:`HyperLayout`,
    the block kernel's causal attention on the others."""
    layout = hf.layout_of(module)
    if not isinstance(layout, HyperLayout):
        return hf.attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("softcap") is not None:
        raise LongreachError(
            "hyper does not support attention-logit soft-capping (Gemma 2/3); use another model."
        )
    if isinstance(attention_mask, torch.Tensor) or not getattr(module, "is_causal", True):
        raise LongreachError(
            "hyper needs causal attention with at most a 2-D padding mask; pass no 4-D mask."
        )
    if dropout > 0.0 and module.training:
        raise LongreachError(f"hyper: attention dropout ({dropout}) is on; call model.eval().")
    q_offset, padding = key.shape[-2] - query.shape[-2], None
    if isinstance(attention_mask, hf.SlotMask):
        if attention_mask.window is not None or attention_mask.kv_offset > 0:
            raise LongreachError(
                "hyper does not support sliding-window attention layers; use a model without one."
            )
        q_offset, padding = attention_mask.q_offset, attention_mask.padding
    call = AttentionCall(
        module, _layer(module), query, key, value, q_offset, padding, None, scaling
    )
    return layout.attend(call).transpose(1, 2).contiguous(), None


def _layer(module: torch.nn.Module) -> int:
    """The layer index of an attention module (0 when it has none)."""
    return int(getattr(module, "layer_idx", 0))


# --------------------------------------------------------------------------- method


@register
@dataclasses.dataclass
class Hyper(Method):
    """HyperAttention (Han et al., 2023, HyperAttention: Long-context Attention in Near-Linear Time, arXiv 2310.05869).

    Each query attends exactly to the keys of its own block in the sortLSH order, plus a
    residual of ``sample_size`` keys drawn uniformly, each weighted ``n / sample_size``;
    the parts are merged by log-sum-exp. sortLSH hashes queries and keys (after RoPE) by
    the signs of ``lsh_num_projs`` random projections (one Gaussian matrix per layer,
    shared by its heads), orders the buckets by the reflected Gray code (neighbouring
    buckets differ in one hyperplane), sorts queries and keys by bucket (stable), and cuts
    the sorted keys into ``ceil(n / block_size)`` blocks and the sorted queries into as many,
    at the same quantiles. Sampled keys that fall in the query's own block are left out
    (they are counted exactly). Causal attention halves recursively: the two diagonal halves
    recurse, the second half's queries over the first half's keys use the estimator; a
    causal square of at most ``min_seq_len`` tokens, and a rectangle of fewer than
    ``min_seq_len`` queries, is exact attention. Cost about n (block_size + sample_size)
    pairs per head instead of n^2 / 2; never an n x n matrix.

    The defaults are those of the authors' reference code (insuhan/hyper-attn on GitHub):
    ``lsh_num_projs=7``, ``block_size=256``, ``sample_size=256``, ``min_seq_len=4096``,
    every layer (its ``num_patch_layers=-1``). Departures from it:

    - its hash returns gray(b) for bucket b, an order in which neighbours can differ in two
      hyperplanes (buckets 2 then 7 with three); here the key is b's place in the Gray
      sequence, the order the paper describes;
    - it pads lengths that are not multiples of ``block_size`` with zero keys, which then
      take part in the softmax; here blocks are cut at quantiles and hold only real keys;
      an odd causal square splits at ceil(n / 2) instead of gaining a zero row;
    - its draws come from the global RNG; here each draw is seeded by (``seed``, layer,
      the block's query and key slots), so a run reproduces and another seed draws anew;
    - with grouped-query attention the query heads of a KV head share its key order and
      samples (the reference has one KV head per query head).

    Exact blocks and the residual run on the block kernel (rows = batch x KV head x block,
    one unmasked piece each, returning log-sum-exp); sorting, gathering and the merges are
    plain torch. A model call of L queries at slots s.. (chunked prefill, decoding) attends
    its own L keys by the causal rule and the s earlier keys by the estimator, merged by
    log-sum-exp: with L < ``min_seq_len`` (decoding: L = 1) that is exact attention.

    Parameters:
        lsh_num_projs: hyperplanes of the angular LSH (default 7: 128 buckets).
        block_size: keys per block of the sorted order (default 256).
        sample_size: uniformly sampled residual keys per rectangle of the split (default
            256; 0: blocks only).
        min_seq_len: causal squares up to this size, and rectangles of fewer queries, are exact
            (default 4096).
        seed: seeds the projections and samples (default 0).
        layers: -1 every layer, N the last N layers (default -1).
    """

    name: ClassVar[str] = "hyper"
    paper: ClassVar[str] = (
        "Han et al., 2023, HyperAttention: Long-context Attention in Near-Linear Time, "
        "arXiv 2310.05869"
    )
    summary: ClassVar[str] = "sortLSH blocks + sampled residual, recursive causal split"
    touches: ClassVar[frozenset[str]] = frozenset({ATTENTION})
    # A prefix's keys depend on where the causal split falls, which depends on the length
    # of the whole input: a prefilled prefix is not what a longer prompt would compute.
    shares_prefix: ClassVar[bool] = False

    lsh_num_projs: int = param(7, "hyperplanes of the angular LSH (2^n buckets)")
    block_size: int = param(256, "keys per block of the sorted order")
    sample_size: int = param(256, "uniformly sampled residual keys (0: blocks only)")
    min_seq_len: int = param(4096, "causal squares up to this size are exact")
    seed: int = param(0, "seed of the projections and samples")
    layers: int = param(-1, "-1: every layer; N: the last N layers")

    def validate(self) -> None:
        if not 1 <= self.lsh_num_projs <= 16:
            self.fail(f"lsh_num_projs must be between 1 and 16 (got {self.lsh_num_projs}).")
        for name in ("block_size", "min_seq_len"):
            if getattr(self, name) < 1:
                self.fail(f"{name} must be >= 1 (got {getattr(self, name)}).")
        if self.sample_size < 0:
            self.fail(f"sample_size must be >= 0 (got {self.sample_size}).")
        if self.layers == 0 or self.layers < -1:
            self.fail(f"layers must be -1 (every layer) or >= 1 (got {self.layers}).")

    def check_model(self, model: torch.nn.Module) -> None:
        modules = hf.attention_modules(model)
        if not modules:
            self.fail(f"{type(model).__name__} has no attention modules that longreach recognises.")
        if self.layers > len(modules):
            self.fail(f"layers={self.layers} but {type(model).__name__} has {len(modules)} layers.")
        if any(w is not None for w in compat.sliding_windows(model).values()):
            self.fail("sliding-window attention layers are not supported; use a model without.")

    def layout(self) -> HyperLayout:
        return HyperLayout(
            self.lsh_num_projs, self.block_size, self.sample_size, self.min_seq_len, self.seed
        )

    def install(self, model: torch.nn.Module, patch: Patch) -> None:
        chosen = None
        if self.layers != -1:
            indices = sorted(_layer(m) for m in hf.attention_modules(model))
            chosen = indices[-self.layers :]
        handle = hf.use(model, self.layout(), layers=chosen)
        patch.on_undo(handle.restore)
        patch.attention(model, NAME, hyper_attention, hf.mask_function)


__all__ = [
    "Hyper",
    "HyperLayout",
    "buckets",
    "gray_rank",
    "hyper_attention",
    "lsh_projections",
    "sampled_keys",
]
