"""Slow, obvious dense reference implementations that the fast code must match.

A plain module of functions: each one builds the full matrix the fast path avoids,
computes in float64 and is meant for small inputs only. Add your own below.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# --------------------------------------------------------------------------- attention


def region_map(regions: Sequence, q_len: int, kv_len: int, q_offset: int) -> torch.Tensor:
    """(q_len, kv_len) int64: the ``pset`` of the region holding each pair, -1 where none.

    Raises AssertionError when two regions claim the same pair.
    """
    i = torch.arange(q_offset, q_offset + q_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    out = torch.full((q_len, kv_len), -1, dtype=torch.int64)
    for r in regions:
        m = torch.ones(q_len, kv_len, dtype=torch.bool)
        if r.q[0] is not None:
            m &= i >= r.q[0]
        if r.q[1] is not None:
            m &= i < r.q[1]
        if r.k[0] is not None:
            m &= j >= r.k[0]
        if r.k[1] is not None:
            m &= j < r.k[1]
        if r.d[0] is not None:
            m &= (i - j) >= r.d[0]
        if r.d[1] is not None:
            m &= (i - j) <= r.d[1]
        assert not bool((m & (out >= 0)).any()), f"region {r} overlaps another"
        out[m] = r.pset
    return out


def dense_attention(
    queries: Sequence[torch.Tensor],
    keys: Sequence[torch.Tensor],
    value: torch.Tensor,
    pset_map: torch.Tensor,
    scale: float | None = None,
    key_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked softmax attention in float64 with a position set per pair.

    ``queries[p]`` (B, Hq, Lq, D) and ``keys[p]`` (B, Hkv, S, D) score the pairs where
    ``pset_map == p``; pairs with -1 (or a padded key, ``key_keep`` (B, S) False) are
    excluded. Grouped-query attention by repeating K/V. Rows with no visible key are 0.
    Returns (B, Hq, Lq, Dv) float64.
    """
    bsz, hq, q_len, d = queries[0].shape
    hkv = keys[0].shape[1]
    scale = d**-0.5 if scale is None else scale
    scores = torch.zeros(bsz, hq, q_len, keys[0].shape[2], dtype=torch.float64)
    for p, (q, k) in enumerate(zip(queries, keys, strict=True)):
        k = k.double().repeat_interleave(hq // hkv, dim=1)
        s = (q.double() @ k.transpose(-1, -2)) * scale
        scores = torch.where(pset_map == p, s, scores)
    visible = (pset_map >= 0)[None, None].expand(bsz, 1, -1, -1)
    if key_keep is not None:
        visible = visible & key_keep.bool()[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    v = value.double().repeat_interleave(hq // hkv, dim=1)
    return weights @ v


def causal_map(q_len: int, kv_len: int, q_offset: int | None = None) -> torch.Tensor:
    """pset map of plain causal attention for queries at slots ``q_offset ..`` (default: the newest)."""
    q_offset = kv_len - q_len if q_offset is None else q_offset
    i = torch.arange(q_offset, q_offset + q_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    return torch.where(j <= i, 0, -1)


def lambda_mask(length: int, sinks: int, window: int) -> torch.Tensor:
    """(length, length) bool Λ mask: key j visible from query i if j <= i and (i - j < window or j < sinks)."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    return (j <= i) & ((i - j < window) | (j < sinks))


# --------------------------------------------------------------------------- windowed methods
#
# Each factory returns a transformers attention function for one unpadded sequence run in
# a single forward without a cache (positions 0..n-1). It undoes the model's rotation in
# float64, rotates queries and keys to the positions the method's paper assigns to each
# pair, and applies a full n x n (or per-query) softmax. ``reference_logits`` runs a model
# with one of them.
#
# On a sliding-window layer (transformers passes the layer's ``sliding_window`` to the
# attention function) a key w or more tokens before the query is never attended, on top of
# the method's rule; for streaming the distance is counted inside its cache.


def rope64(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE in float64, "rotate half" layout: x (..., L, D) rotated by positions (L,)."""
    angles = positions.double()[:, None] * inv_freq.double()[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    x = x.double()
    half = x.shape[-1] // 2
    return x * angles.cos() + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * angles.sin()


def _raw(query, key, inv_freq):
    n = query.shape[-2]
    assert key.shape[-2] == n, "reference attention runs one full sequence without a cache"
    pos = torch.arange(n)
    return rope64(query, -pos, inv_freq), rope64(key, -pos, inv_freq)


def _scores(q, k, q_pos, k_pos, inv_freq, scale):
    """(B, Hq, n, n) scores with queries at q_pos and keys at k_pos (K/V heads repeated)."""
    groups = q.shape[1] // k.shape[1]
    kk = rope64(k, k_pos, inv_freq).repeat_interleave(groups, dim=1)
    return (rope64(q, q_pos, inv_freq) @ kk.transpose(-1, -2)) * scale


def _model_window(kwargs, n):
    """(n, n) bool: pairs the layer's own sliding window allows (all when it has none)."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    window = kwargs.get("sliding_window")
    return (i - j < window) if window else torch.ones(n, n, dtype=torch.bool)


def _finish(scores, visible, value, query):
    groups = query.shape[1] // value.shape[1]
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    out = weights @ value.double().repeat_interleave(groups, dim=1)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def self_extend_attention(window: int, group: int, inv_freq: torch.Tensor):
    """Self-Extend (Jin et al., 2024): normal scores if i - j < W, else grouped positions."""

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        q, k = _raw(query, key, inv_freq)
        n = q.shape[-2]
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        pos = torch.arange(n)
        normal = _scores(q, k, pos, pos, inv_freq, scaling)
        grouped = _scores(
            q, k, pos // group + window - window // group, pos // group, inv_freq, scaling
        )
        scores = torch.where(i - j < window, normal, grouped)
        return _finish(scores, (j <= i) & _model_window(kwargs, n), value, query)

    return attention


def lm_infinite_attention(sinks: int, window: int, cap: int, inv_freq: torch.Tensor):
    """LM-Infinite (Han et al., 2023): Λ mask, distance min(i - j, cap) for every visible pair."""

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        q, k = _raw(query, key, inv_freq)
        n = q.shape[-2]
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        pos = torch.arange(n)
        normal = _scores(q, k, pos, pos, inv_freq, scaling)
        capped = _scores(q, k, torch.full((n,), cap), torch.zeros(n), inv_freq, scaling)
        scores = torch.where(i - j < cap, normal, capped)
        visible = (j <= i) & ((i - j < window) | (j < sinks)) & _model_window(kwargs, n)
        return _finish(scores, visible, value, query)

    return attention


def streaming_attention(sinks: int, window: int, inv_freq: torch.Tensor):
    """StreamingLLM (Xiao et al., 2023) simulated token by token: for each query, the cache
    holds the first ``sinks`` tokens and the ``window`` newest (the query included), and
    every token sits at its index in that cache."""

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        q, k = _raw(query, key, inv_freq)
        n = q.shape[-2]
        groups = q.shape[1] // k.shape[1]
        v = value.double().repeat_interleave(groups, dim=1)
        kk = k.repeat_interleave(groups, dim=1)
        out = torch.zeros(q.shape[0], q.shape[1], n, v.shape[-1], dtype=torch.float64)
        for t in range(n):
            cache = sorted(
                set(range(min(sinks, t + 1))) | set(range(max(0, t - window + 1), t + 1))
            )
            slot = torch.arange(len(cache))
            keys = rope64(kk[:, :, cache], slot, inv_freq)
            qt = rope64(q[:, :, t : t + 1], slot[-1:], inv_freq)
            s = (qt @ keys.transpose(-1, -2)) * scaling
            if kwargs.get("sliding_window"):  # the window counts slots of the cache
                s = s.masked_fill(slot[-1] - slot >= kwargs["sliding_window"], float("-inf"))
            w = torch.softmax(s, dim=-1)
            out[:, :, t : t + 1] = w @ v[:, :, cache]
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attention


def reference_logits(
    model, input_ids: torch.Tensor, attention, attention_mask=None
) -> torch.Tensor:
    """Logits of ``model`` on one batch with ``attention`` as its attention function
    (``attention_mask``: a 2-D padding mask passed to the model, positions 0..n-1)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = f"reference-{id(attention)}"
    previous = model.config._attn_implementation
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(name)
    try:
        with torch.no_grad():
            return model(input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        model.set_attn_implementation(previous)


# --------------------------------------------------------------------------- memory


def infllm_steps(calls: Sequence[int], n: int, chunk: int, dense: int) -> list[tuple[int, int]]:
    """The execution steps of InfLLM for model calls starting at ``calls`` (positions) over n tokens.

    A call [p0, p1) runs its queries below ``dense`` as one step, then chunks of ``chunk``
    queries from max(p0, dense) on (a decoded token is a call of its own).
    """
    bounds = [*calls, n]
    steps = []
    for p0, p1 in zip(bounds, bounds[1:], strict=False):
        if p0 < dense:
            steps.append((p0, min(p1, dense)))
        s = max(p0, dense)
        while s < p1:
            steps.append((s, min(p1, s + chunk)))
            s += chunk
    return steps


def infllm_attention(
    *,
    init: int,
    block: int,
    window: int,
    topk: int,
    repr: int,
    chunk: int,
    dense: int,
    inv_freq: torch.Tensor,
    calls: Sequence[int] = (0,),
    per_head: bool = False,
    selected: list | None = None,
):
    """InfLLM (Xiao et al., 2024) simulated query by query in float64 on a whole sequence.

    For each step (see :func:`infllm_steps`): queries below ``dense`` see every earlier key
    at true positions. Above it, blocks b (tokens init + b*block ..) whose last token is at
    most ``s - window`` are in memory, each represented by the mean un-rotated key of its
    ``repr`` best-scored tokens per KV head; the chunk's mean query rotated to ``window``
    picks the ``topk`` blocks with the highest representative score (summed over KV
    heads, or per KV head). A query i sees the band (i - window, i] at true positions and,
    at distance ``window`` (query at position window, keys at 0), the init tokens, the
    chosen blocks and the tokens from the end of the last block to i - window. One softmax
    over all of them. Then every token j gets the probability it received from the
    queries i with window - E <= i - j < window (E = chunk // 4, at least 1), summed over its KV head's query heads.
    ``selected``, if a list, receives (layer, step start, chosen block indices) per step.
    """

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        q, k = _raw(query, key, inv_freq)
        _, hq, n, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        scale = scaling if scaling is not None else d**-0.5
        pos = torch.arange(n)
        true_q = rope64(q[0], pos, inv_freq)  # (Hq, n, D)
        true_k = rope64(k[0], pos, inv_freq).repeat_interleave(g, 0)
        far_q = rope64(q[0], torch.full((n,), window), inv_freq)
        raw_k = k[0].repeat_interleave(g, 0)  # un-rotated: position 0
        v = value[0].double().repeat_interleave(g, 0)
        out = torch.zeros(hq, n, v.shape[-1], dtype=torch.float64)
        scores = torch.zeros(hkv, n, dtype=torch.float64)
        reps: list[torch.Tensor] = []
        j = torch.arange(n)
        for s, e in infllm_steps(calls, n, chunk, dense):
            sparse = s >= dense
            if sparse:
                while len(reps) < max(0, (s - window - init + 1) // block):
                    a = init + len(reps) * block
                    top = scores[:, a : a + block].topk(min(repr, block), dim=-1).indices + a
                    reps.append(torch.stack([k[0, h, top[h]].mean(0) for h in range(hkv)]))
                nb = len(reps)
                chosen = [list(range(nb))] * hkv
                if nb > topk:
                    mean_q = far_q[:, s:e].mean(1).view(hkv, g, d).sum(1)  # (Hkv, D)
                    per_block = torch.einsum("nhd,hd->nh", torch.stack(reps), mean_q)
                    if per_head:
                        chosen = [
                            sorted(per_block[:, h].topk(topk).indices.tolist()) for h in range(hkv)
                        ]
                    else:
                        chosen = [sorted(per_block.sum(1).topk(topk).indices.tolist())] * hkv
                if selected is not None:
                    selected.append((module.layer_idx, s, chosen))
            for i in range(s, e):
                band = (j <= i) & (i - j < window)
                if sparse:
                    far = torch.zeros(hq, n, dtype=torch.bool)
                    for h in range(hq):
                        mem = (j < init) | ((j >= init + nb * block) & (j <= i - window))
                        for b in chosen[h // g]:
                            mem |= (j >= init + b * block) & (j < init + (b + 1) * block)
                        far[h] = mem
                    near = band[None].expand(hq, -1)
                else:
                    near = (j <= i)[None].expand(hq, -1)
                    far = torch.zeros(hq, n, dtype=torch.bool)
                s_near = (true_k @ true_q[:, i, :, None])[..., 0] * scale  # (Hq, n)
                s_far = (raw_k @ far_q[:, i, :, None])[..., 0] * scale
                logits = torch.cat(
                    [
                        s_near.masked_fill(~near, float("-inf")),
                        s_far.masked_fill(~far, float("-inf")),
                    ],
                    dim=-1,
                )
                lse = torch.logsumexp(logits, dim=-1)  # (Hq,)
                w = torch.exp(logits - lse[:, None])
                out[:, i] = (w[:, None, :n] @ v + w[:, None, n:] @ v)[:, 0]
                edge = band & (i - j >= window - max(1, chunk // 4)) & (j >= init)
                p = torch.exp(s_near - lse[:, None]).masked_fill(~edge[None], 0.0)
                scores += p.view(hkv, g, n).sum(1)
        return out[None].to(query.dtype).transpose(1, 2).contiguous(), None

    return attention


# --------------------------------------------------------------------------- eviction


def eviction_attention(
    *,
    policy: str,
    budget: int,
    calls: Sequence[int],
    sinks: int = 0,
    recent: int = 0,
    per_head: bool = True,
    window: int = 64,
    kernel: int = 5,
    kept: dict | None = None,
):
    """H2O / SnapKV simulated in float64 on a whole sequence split into model calls.

    For each call [p0, p1): a query i sees the tokens its layer kept after the previous
    call and the tokens p0 .. i. Then every token of the layer gets its score: ``h2o`` adds
    the probability every query of the call gave it (summed over the query heads of its KV
    head); ``snapkv`` replaces it with the probability from the call's last ``window``
    queries, max-pooled over ``kernel`` neighbours in cache order among the tokens before
    the newest ``window``. When more than ``budget`` tokens are held (and the call is not a
    single decoded token under snapkv) the layer keeps the ``sinks`` first and ``recent``
    last tokens in cache order and the best-scored others (per KV head, or by the sum over
    heads). ``kept``, if a dict, receives {layer: [positions kept, per KV head]}.
    """

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        q, k, v = query[0].double(), key[0].double(), value[0].double()
        hq, n, d = q.shape
        hkv = k.shape[0]
        g = hq // hkv
        scale = scaling if scaling is not None else d**-0.5
        out = torch.zeros(hq, n, v.shape[-1], dtype=torch.float64)
        resident: list[list[int]] = [[] for _ in range(hkv)]
        scores: list[dict[int, float]] = [{} for _ in range(hkv)]
        bounds = [*calls, n]
        for p0, p1 in zip(bounds, bounds[1:], strict=False):
            for h in range(hkv):
                slots = resident[h] + list(range(p0, p1))
                idx = torch.tensor(slots)
                heads = slice(h * g, (h + 1) * g)
                logits = (q[heads, p0:p1] @ k[h, idx].T) * scale  # (g, rows, S)
                row_pos = torch.arange(p0, p1)[:, None]
                visible = (idx[None, :] < p0) | (idx[None, :] <= row_pos)
                p = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
                out[heads, p0:p1] = p @ v[h, idx]
                got = (
                    p.sum((0, 1)) if policy == "h2o" else p[:, -min(window, p1 - p0) :].sum((0, 1))
                )
                if policy == "h2o":
                    for slot, pos in enumerate(slots):
                        scores[h][pos] = scores[h].get(pos, 0.0) + float(got[slot])
                else:
                    cut = len(slots) - window
                    pooled = got.clone()
                    for a in range(max(0, cut)):
                        lo, hi = max(0, a - kernel // 2), min(cut, a + kernel // 2 + 1)
                        pooled[a] = got[lo:hi].max()
                    scores[h] = {pos: float(pooled[s]) for s, pos in enumerate(slots)}
                resident[h] = slots
            held = len(resident[0])
            if held > budget and not (policy == "snapkv" and p1 - p0 == 1):
                keep_recent = window if policy == "snapkv" else recent
                middle = budget - sinks - keep_recent
                rank = [
                    torch.tensor(
                        [scores[h][pos] for pos in resident[h][sinks : held - keep_recent]]
                    )
                    for h in range(hkv)
                ]
                if not per_head:
                    rank = [sum(rank)] * hkv
                for h in range(hkv):
                    mid = resident[h][sinks : held - keep_recent]
                    top = sorted(rank[h].topk(middle).indices.tolist())
                    resident[h] = (
                        resident[h][:sinks]
                        + [mid[t] for t in top]
                        + resident[h][held - keep_recent :]
                    )
        if kept is not None:
            kept[module.layer_idx] = [list(r) for r in resident]
        return out[None].to(query.dtype).transpose(1, 2).contiguous(), None

    return attention


def sirllm_logits(model, input_ids, *, calls, budget, sinks, recent, inv_freq):
    """SirLLM (Yao et al., 2024) simulated call by call in float64; returns (logits, kept).

    Before call c the cache holds ``kept[c]`` (positions, in order; all layers alike). A
    query i of a call [p0, p1) sees those tokens and p0 .. i, every token at its slot in
    that cache (the kept ones at 0 .. R-1, the call's at R + (j - p0)), keys and query
    rotated by slot. After the call each of its tokens gets its surprisal
    -log p(token | before) from the logits (the first token of the sequence: +inf), and
    when more than ``budget`` tokens are held the cache keeps the ``sinks`` first, the
    ``recent`` last and the most surprising others, in cache order. Each call's logits come
    from a forward over the whole prefix with this rule (earlier calls' rows are unchanged).
    """
    n = input_ids.shape[1]
    bounds = [*calls, n]
    steps = list(zip(bounds, bounds[1:], strict=False))
    kept: list[list[int]] = [[]]

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        q, k = _raw(query, key, inv_freq)
        g = q.shape[1] // k.shape[1]
        kk, vv = k.repeat_interleave(g, dim=1), value.double().repeat_interleave(g, dim=1)
        out = torch.zeros(q.shape[0], q.shape[1], q.shape[2], vv.shape[-1], dtype=torch.float64)
        for c, (p0, p1) in enumerate(steps[: len(kept)]):
            if p0 >= q.shape[2]:
                break
            for i in range(p0, min(p1, q.shape[2])):
                cache = kept[c] + list(range(p0, i + 1))
                slot = torch.arange(len(cache))
                keys = rope64(kk[:, :, cache], slot, inv_freq)
                qi = rope64(q[:, :, i : i + 1], slot[-1:], inv_freq)
                w = torch.softmax((qi @ keys.transpose(-1, -2)) * scaling, dim=-1)
                out[:, :, i : i + 1] = w @ vv[:, :, cache]
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    logits = None
    score: dict[int, float] = {}
    for c, (p0, p1) in enumerate(steps):
        logits = reference_logits(model, input_ids[:, :p1], attention)
        logp = torch.log_softmax(logits[0].double(), dim=-1)
        for j in range(p0, p1):
            score[j] = float("inf") if j == 0 else -float(logp[j - 1, input_ids[0, j]])
        held = kept[c] + list(range(p0, p1))
        if len(held) > budget:
            mid = held[sinks : len(held) - recent]
            ranks = torch.tensor([score[j] for j in mid])
            top = sorted(ranks.topk(budget - sinks - recent).indices.tolist())
            held = held[:sinks] + [mid[t] for t in top] + held[len(held) - recent :]
        kept.append(held)
    return logits, kept[-1]


def spans_attention(full: set, window: int):
    """Spans (MASFormer) without training: causal at the ``full`` layers, elsewhere the
    ``window`` newest tokens (the query included), true positions everywhere."""

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        n = query.shape[-2]
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        visible = j <= i
        if module.layer_idx not in full:
            visible = visible & (i - j < window)
        g = query.shape[1] // key.shape[1]
        scores = (query.double() @ key.double().repeat_interleave(g, 1).transpose(-1, -2)) * scaling
        return _finish(scores, visible, value, query)

    return attention


def hip_attention(*, k, block, sinks, window, chunk, dense_layers=0, calls=(0,)):
    """HiP (Lee et al., 2024) simulated in float64 on a whole sequence split into model calls.

    Each call is cut into query chunks of ``chunk``. For a chunk starting at s, the keys
    before ``far = max(sinks, s - window + 1)`` from ``sinks`` on form ``nb`` blocks of
    ``block``; per KV head, spans of blocks start as ``min(2k, nb)`` near-equal parts
    (floor(i * nb / m)), each scored by its centre token ``sinks + floor((lo + hi) * block / 2)``
    (at most the last block token) as the best query of the chunk summed over the KV head's
    query heads; the best k spans are kept and halved (mid = floor((lo + hi + 1) / 2)) until
    all are single blocks (all blocks when nb <= k). A query i sees the band i - j < window,
    the sinks, the keys from the end of the blocks on, and its head's chosen blocks.
    """

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        q, kk = query[0].double(), key[0].double()
        hq, n, d = q.shape
        hkv = kk.shape[0]
        g = hq // hkv
        j = torch.arange(n)
        visible = torch.zeros(hq, n, n, dtype=torch.bool)
        bounds = [*calls, n]
        for p0, p1 in zip(bounds, bounds[1:], strict=False):
            for s in range(p0, p1, chunk):
                e = min(p1, s + chunk)
                for i in range(s, e):
                    visible[:, i] = j <= i
                if module.layer_idx < dense_layers:
                    continue
                far = max(sinks, s - window + 1)
                nb = (far - sinks) // block
                gap = sinks + nb * block
                for h in range(hkv):
                    if nb <= k:
                        chosen = list(range(nb))
                    else:
                        m = min(2 * k, nb)
                        spans = [(a * nb // m, (a + 1) * nb // m) for a in range(m)]
                        while True:

                            def score(span, h=h, s=s, e=e, nb=nb):
                                lo, hi = span
                                c = min(sinks + (lo + hi) * block // 2, sinks + nb * block - 1)
                                dots = q[h * g : (h + 1) * g, s:e] @ kk[h, c]  # (g, r)
                                return float(dots.max(dim=1).values.sum())

                            ranked = sorted(spans, key=score, reverse=True)[:k]
                            if all(hi - lo <= 1 for lo, hi in ranked):
                                chosen = sorted(lo for lo, _ in ranked)
                                break
                            spans = []
                            for lo, hi in ranked:
                                if hi - lo > 1:
                                    mid = (lo + hi + 1) // 2
                                    spans += [(lo, mid), (mid, hi)]
                                else:
                                    spans.append((lo, hi))
                    blocks = torch.zeros(n, dtype=torch.bool)
                    for b in chosen:
                        blocks[sinks + b * block : sinks + (b + 1) * block] = True
                    for i in range(s, e):
                        seen = (j <= i) & ((i - j < window) | (j < sinks) | (j >= gap) | blocks)
                        visible[h * g : (h + 1) * g, i] = seen
        scores = (q @ kk.repeat_interleave(g, 0).transpose(-1, -2)) * scaling
        return _finish(scores[None], visible[None], value, query)

    return attention


def squeezed_attention(*, context, window, layers, calls):
    """Squeezed Attention (Hooper et al., 2024) simulated in float64, given the method's clusters.

    ``layers[l]`` holds the layer's ``labels`` (Hkv, n) and ``centroids`` (Hkv, C, D) of the
    first ``n = context - window`` keys, its ``threshold``, and at two levels
    ``coarse_labels`` / ``coarse_centroids`` / ``coarse_threshold``. Queries before
    ``context`` see every earlier key. For each model call [p0, p1) from ``context`` on
    (``calls`` are their first positions), per KV head: a cluster c of N_c keys gets, per
    query q of the call and query head of the group, exp(s q.C_c) / sum_j N_j exp(s q.C_j),
    averaged over both; a key is kept when its cluster's value >= threshold (two levels:
    its coarse cluster passes first, and the fine denominator counts only keys of kept
    coarse clusters; rank = 2 + fine for those, the coarse value for the rest). Every head
    reads the M best-ranked keys (ties: lower slot first), M the largest kept count of the
    layer's heads. A query sees those, the window and the keys from ``context`` to itself.
    """

    def estimate(q, cents, sizes, scale):
        # q (g, L, D), cents (C, D), sizes (C,) -> (C,)
        logits = (q @ cents.T) * scale  # (g, L, C)
        out = torch.zeros(cents.shape[0], dtype=torch.float64)
        for c in range(cents.shape[0]):
            if sizes[c] == 0:
                continue
            denom = sum(
                sizes[j] * torch.exp(logits[..., j]) for j in range(cents.shape[0]) if sizes[j]
            )
            out[c] = (torch.exp(logits[..., c]) / denom).mean()
        return out

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        q, kk = query[0].double(), key[0].double()
        hq, n_all, _ = q.shape
        hkv = kk.shape[0]
        g = hq // hkv
        spec = layers[module.layer_idx]
        n = context - window
        j = torch.arange(n_all)
        visible = (j[None, :] <= j[:, None])[None].repeat(hq, 1, 1)
        bounds = [*calls, n_all]
        for p0, p1 in zip(bounds, bounds[1:], strict=False):
            ranks, kept = [], []
            for h in range(hkv):
                qh = q[h * g : (h + 1) * g, p0:p1]
                labels = spec["labels"][h]
                cents = spec["centroids"][h].double()
                sizes = torch.bincount(labels, minlength=cents.shape[0])
                if spec.get("coarse_labels") is None:
                    score = estimate(qh, cents, sizes, scaling)[labels]
                    ranks.append(score)
                    kept.append(score >= spec["threshold"])
                    continue
                coarse_labels = spec["coarse_labels"][h]
                coarse = spec["coarse_centroids"][h].double()
                c_sizes = torch.bincount(coarse_labels, minlength=coarse.shape[0])
                c_score = estimate(qh, coarse, c_sizes, scaling)[coarse_labels]
                level1 = c_score >= spec["coarse_threshold"]
                f_sizes = torch.bincount(labels[level1], minlength=cents.shape[0])
                f_score = estimate(qh, cents, f_sizes, scaling)[labels]
                ranks.append(torch.where(level1, 2.0 + f_score, c_score))
                kept.append(level1 & (f_score >= spec["threshold"]))
            m = max(int(k.sum()) for k in kept)
            for h in range(hkv):
                order = sorted(range(n), key=lambda x, r=ranks[h]: (-float(r[x]), x))[:m]
                chosen = torch.zeros(n_all, dtype=torch.bool)
                chosen[order] = True
                for i in range(p0, p1):
                    seen = (j <= i) & ((j >= n) | chosen)
                    visible[h * g : (h + 1) * g, i] = seen
        scores = (q @ kk.repeat_interleave(g, 0).transpose(-1, -2)) * scaling
        return _finish(scores[None], visible[None], value, query)

    return attention


def hyper_attention(
    *,
    lsh_num_projs,
    block_size,
    sample_size,
    min_seq_len,
    seed=0,
    calls=(0,),
    layers=None,
    keep=None,
):
    """HyperAttention (Han et al., 2023) simulated in float64 on a whole sequence split into calls.

    Builds, per query head, the (n, n) multiplicity of every (query, key) pair and takes one
    softmax of scores + log(multiplicity). A call [p0, p1) attends its own keys causally and
    the keys [0, p0) as one rectangle. Causal square of n tokens: exact (multiplicity 1 for
    j <= i) if n <= min_seq_len, else split at h = ceil(n / 2): both halves recursively and
    the rectangle (second-half queries, first-half keys). Rectangle of L queries x S keys:
    exact if L < min_seq_len or nb = ceil(S / block_size) is 1; else each vector's bucket is
    the place of its sign pattern (bit t: projection t > 0) in the Gray sequence
    [t ^ (t >> 1) for t in range(2^r)]; queries and keys are stably sorted by bucket, the
    sorted keys at places floor(b S / nb) .. floor((b + 1) S / nb) - 1 form block b (queries
    alike with L); a query sees its block's keys once and every sampled key (the seeded
    draw of longreach.methods.hyper.sampled_keys) outside its block S / sample_size times
    per draw. ``layers``: the layer indices that use the rule (None: all; the others causal).
    ``keep`` (n,) bool: False for padded keys, which take their places in the order and the
    draws but are never attended (rows of padded queries come out 0).
    """
    from longreach.methods.hyper import lsh_projections, sampled_keys

    gray = [t ^ (t >> 1) for t in range(2**lsh_num_projs)]
    place_of = {code: place for place, code in enumerate(gray)}

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        q, kk = query[0].double(), key[0].double()
        hq, n, d = q.shape
        hkv = kk.shape[0]
        g = hq // hkv
        layer = module.layer_idx
        proj = lsh_projections(seed, layer, d, lsh_num_projs).double()
        mult = torch.zeros(hq, n, n, dtype=torch.float64)

        def bucket(x):  # x (m, D) -> Gray places
            bits = (x @ proj) > 0
            return [place_of[sum(int(b) << t for t, b in enumerate(row))] for row in bits]

        def blocks_of(x, nb):  # (m, D) -> block of each vector (list)
            b = bucket(x)
            order = sorted(range(len(b)), key=lambda t: b[t])
            out = [0] * len(b)
            for blk in range(nb):
                for place in range(blk * len(b) // nb, (blk + 1) * len(b) // nb):
                    out[order[place]] = blk
            return torch.tensor(out)

        def rectangle(qs, ks):
            big_l, big_s = qs.stop - qs.start, ks.stop - ks.start
            nb = -(-big_s // block_size)
            if big_l < min_seq_len or nb == 1:
                mult[:, qs, ks] = 1.0
                return
            picks = sampled_keys(seed, layer, qs.start, ks.start, ks.stop, (1, hkv), sample_size)
            for h in range(hkv):
                k_block = blocks_of(kk[h, ks], nb)
                count = torch.bincount(picks[0, h], minlength=big_s).double()
                for hh in range(h * g, (h + 1) * g):
                    q_block = blocks_of(q[hh, qs], nb)
                    same = (q_block[:, None] == k_block[None, :]).double()
                    if sample_size:
                        same = same + (1 - same) * count[None, :] * big_s / sample_size
                    mult[hh, qs, ks] = same

        def causal(a, b):
            if b - a <= min_seq_len:
                i, j = torch.arange(a, b)[:, None], torch.arange(a, b)[None, :]
                mult[:, a:b, a:b] = (j <= i).double()
                return
            h = a + (b - a + 1) // 2
            causal(a, h)
            causal(h, b)
            rectangle(slice(h, b), slice(a, h))

        if layers is not None and layer not in layers:
            causal_all = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
            mult[:] = causal_all.double()
        else:
            bounds = [*calls, n]
            for p0, p1 in zip(bounds, bounds[1:], strict=False):
                causal(p0, p1)
                if p0 > 0:
                    rectangle(slice(p0, p1), slice(0, p0))
        if keep is not None:
            mult[:, :, ~keep] = 0.0
        scores = (q @ kk.repeat_interleave(g, 0).transpose(-1, -2)) * scaling + mult.log()
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out = weights @ value[0].double().repeat_interleave(g, 0)
        return out[None].to(query.dtype).transpose(1, 2).contiguous(), None

    return attention
