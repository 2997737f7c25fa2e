"""HyperAttention: sortLSH blocks plus a sampled residual, causal by recursive halving."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from longreach import compat
from longreach.attention import hf
from longreach.attention.kernel import KeyPadding, block_attention
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


def _exact(q, k, v, keep, scale, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention (output, log-sum-exp) of q over k, v: full, or causal on a square."""
    n, s = q.shape[-2], k.shape[-2]
    if causal:
        work = plan((Region(d=(0, None)),), n, s, 0, block=max(1024, n), check=False)
    else:
        work = _full_plan(n, s)
    return block_attention(q, k, v, work, scale=scale, padding=_padding(keep), return_lse=True)


def _rows(keep: torch.Tensor | None, slots: slice) -> torch.Tensor | None:
    return None if keep is None else keep[:, slots]


def _merge(o1, l1, o2, l2) -> tuple[torch.Tensor, torch.Tensor]:
    """Two attentions of the same queries over disjoint key sets, combined by log-sum-exp.

    The result is fp32 whatever the inputs' dtype (the fp32 weights promote them).
    """
    lse = torch.logaddexp(l1, l2)
    w1, w2 = (l1 - lse).exp_()[..., None], (l2 - lse).exp_()[..., None]
    return torch.mul(o1, w1).addcmul_(o2, w2), lse


def _block_index(total: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Places ``floor(b * total / blocks) ..`` of each block b, padded to the largest block.

    Returns (index (blocks, size) clamped into range, valid (blocks, size) bool, size).
    """
    edges = torch.arange(blocks + 1) * total // blocks
    size = int((edges[1:] - edges[:-1]).max())
    index = edges[:-1, None] + torch.arange(size)[None, :]
    return index.clamp(max=total - 1), index < edges[1:, None], size


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
        """(B, Hq, Lq, Dv) output of one attention call (queries at slots q_offset..)."""
        q, k, v = call.query, call.key, call.value
        s, n = call.q_offset, q.shape[-2]
        keep = call.padding.keep if call.padding is not None else None
        scale = call.scale if call.scale is not None else q.shape[-1] ** -0.5
        own, before = slice(s, s + n), slice(0, s)
        o, lse = self.causal(q, k[:, :, own], v[:, :, own], _rows(keep, own), call.layer, s, scale)
        if s > 0:
            earlier = self.rectangle(
                q, k[:, :, before], v[:, :, before], _rows(keep, before), call.layer, s, 0, scale
            )
            o, lse = _merge(o, lse, *earlier)
        return o.to(q.dtype)

    def causal(self, q, k, v, keep, layer: int, start: int, scale: float):
        """Causal attention of n queries over the n keys at the same slots ``start ..``.

        Exact when n <= ``min_seq_len``; else split at h = ceil(n / 2): both diagonal
        halves recursively, and the second half's queries over the first half's keys by
        :meth:`rectangle`, merged by log-sum-exp.
        """
        n = q.shape[-2]
        if n <= self.min_seq_len:
            return _exact(q, k, v, keep, scale, causal=True)
        h = (n + 1) // 2
        up, down = slice(0, h), slice(h, n)
        q_up, k_up, v_up, keep_up = q[:, :, up], k[:, :, up], v[:, :, up], _rows(keep, up)
        q_down, k_down, v_down = q[:, :, down], k[:, :, down], v[:, :, down]
        o_up, l_up = self.causal(q_up, k_up, v_up, keep_up, layer, start, scale)
        o_down, l_down = self.causal(
            q_down, k_down, v_down, _rows(keep, down), layer, start + h, scale
        )
        o_off, l_off = self.rectangle(q_down, k_up, v_up, keep_up, layer, start + h, start, scale)
        o_down, l_down = _merge(o_down, l_down, o_off, l_off)
        return torch.cat([o_up, o_down], 2), torch.cat([l_up, l_down], 2)

    def rectangle(self, q, k, v, keep, layer: int, q0: int, k0: int, scale: float):
        """Every query (slots ``q0 ..``) over every key (slots ``k0 ..``): HyperAttention's
        estimator without a mask. Returns (output, log-sum-exp)."""
        bsz, hq, n_q, dim = q.shape
        hkv, n_k = k.shape[1], k.shape[2]
        g = hq // hkv
        blocks = -(-n_k // self.block_size)
        if n_q < self.min_seq_len or blocks == 1:
            return _exact(q, k, v, keep, scale, causal=False)
        device = q.device
        proj = lsh_projections(self.seed, layer, dim, self.lsh_num_projs).to(device)
        rank = gray_rank(self.lsh_num_projs).to(device)
        q_order = torch.sort(buckets(q, proj, rank), dim=-1, stable=True).indices  # (B, Hq, Lq)
        k_order = torch.sort(buckets(k, proj, rank), dim=-1, stable=True).indices  # (B, Hkv, S)

        # 1. Exact attention inside block b of the sorted order: queries and keys at the same
        # quantiles of their sorted orders. Rows are (batch, KV head, block), g query heads each.
        rows = bsz * hkv * blocks
        k_index, k_valid, k_size = _block_index(n_k, blocks)
        q_index, q_valid, q_size = _block_index(n_q, blocks)
        k_slots = k_order[..., k_index.flatten().to(device)]  # (B, Hkv, blocks * k_size)
        q_slots = q_order[..., q_index.flatten().to(device)]  # (B, Hq, blocks * q_size)

        def gather(x, slots):
            return x.gather(2, slots[..., None].expand(-1, -1, -1, x.shape[-1]))

        def by_rows(x, size):  # (B, Hkv, blocks * size, D) -> (rows, 1, size, D)
            return x.reshape(rows, 1, size, x.shape[-1])

        q_blocks = gather(q, q_slots).view(bsz, hkv, g, blocks, q_size, dim)
        q_blocks = q_blocks.transpose(2, 3).reshape(rows, g, q_size, dim)
        k_blocks = by_rows(gather(k, k_slots), k_size)
        v_blocks = by_rows(gather(v, k_slots), k_size)
        k_keep = k_valid.to(device).expand(bsz, hkv, -1, -1)
        if keep is not None:
            k_keep = k_keep & keep.gather(1, k_slots.flatten(1)).view(bsz, hkv, blocks, k_size)
        o, lse = block_attention(
            q_blocks,
            k_blocks,
            v_blocks,
            _full_plan(q_size, k_size),
            scale=scale,
            padding=_padding(k_keep.reshape(rows, k_size)),
            return_lse=True,
        )

        # 2. The residual: sample_size keys drawn uniformly (per batch row and KV head), each
        # weighted n_k / sample_size, those of the query's own block left out.
        m = self.sample_size
        if m > 0:
            picks = sampled_keys(self.seed, layer, q0, k0, k0 + n_k, (bsz, hkv), m).to(device)
            place = torch.empty_like(k_order).scatter_(
                2, k_order, torch.arange(n_k, device=device).expand_as(k_order)
            )  # place of each key in the sorted order
            edges = (torch.arange(blocks + 1, device=device) * n_k // blocks)[1:-1]
            block_of = torch.bucketize(place.gather(2, picks), edges, right=True)  # (B, Hkv, m)
            s_keep = block_of[:, :, None, :] != torch.arange(blocks, device=device)[:, None]
            if keep is not None:
                s_keep = s_keep & keep.gather(1, picks.flatten(1)).view(bsz, hkv, 1, m)

            def samples(x):
                x = gather(x, picks)[:, :, None].expand(-1, -1, blocks, -1, -1)
                return x.reshape(rows, 1, m, x.shape[-1])

            o_res, l_res = block_attention(
                q_blocks,
                samples(k),
                samples(v),
                _full_plan(q_size, m),
                scale=scale,
                padding=_padding(s_keep.reshape(rows, m)),
                return_lse=True,
            )
            o, lse = _merge(o, lse, o_res, l_res + math.log(n_k / m))

        # 3. Back to the queries' own order: sorted place r sits in block b at row r - edge_b.
        o = (
            o.view(bsz, hkv, blocks, g, q_size, -1)
            .transpose(2, 3)
            .reshape(bsz, hq, -1, o.shape[-1])
        )
        lse = lse.view(bsz, hkv, blocks, g, q_size).transpose(2, 3).reshape(bsz, hq, -1)
        flat = torch.arange(blocks * q_size).view(blocks, q_size)[q_valid].to(device)  # (Lq,)
        inverse = torch.empty_like(q_order).scatter_(
            2, q_order, torch.arange(n_q, device=device).expand_as(q_order)
        )  # sorted place of each query
        pick = flat[inverse]  # (B, Hq, Lq)
        return o.gather(2, pick[..., None].expand(-1, -1, -1, o.shape[-1])), lse.gather(2, pick)


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
