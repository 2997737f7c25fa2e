"""InfLLM: a local window plus memory blocks retrieved by representative keys, at bounded cost."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from longreach.attention import hf
from longreach.attention.kernel import PositionSet
from longreach.attention.layout import (
    AttentionCall,
    Kind,
    Layout,
    Piece,
    Plan,
    Region,
    Tile,
    Work,
    _tidy,
    plan,
    region_pieces,
)
from longreach.attention.rotary import rotate
from longreach.errors import LongreachError
from longreach.memory.block_cache import BlockMemoryCache, MemoryLayer
from longreach.memory.store import KV_DTYPES
from longreach.methods.base import ATTENTION, CACHE, Method, Patch, param
from longreach.methods.registry import register
from longreach.methods.windowed import rotary_module, sliding_windows

# Keys per step of the representative-score pass, at least: a step of K keys computes
# (K + E - 1) x K scores of which E x K count, so K = E (128 for SmolLM2) wastes half where
# K = 256 wasted two thirds; below 128 the steps' overhead wins.
_SCORE_KEYS = 128


@functools.lru_cache(maxsize=64)
def _outside_edge(shift: int, rows: int, keys: int, window: int, edge: int) -> torch.Tensor:
    """(rows, keys) True where query ``r0 + r`` and key ``a + c`` are not an edge pair.

    ``shift`` is ``r0 - a``; a pair is an edge pair when ``window - edge <= i - j < window``.
    """
    d = torch.arange(rows)[:, None] - torch.arange(keys) + shift
    return (d < window - edge) | (d >= window)


@dataclasses.dataclass(frozen=True)
class InfLLMLayout(Layout):
    """InfLLM's attention rule for one layer; the memory it reads is the call's published cache.

    For a query at position ``i`` (``i >= dense``) in an execution chunk starting at ``s``:

    - the band ``i - window < j <= i`` at true positions (the model's own rotation);
    - the ``init`` first tokens, the ``topk`` memory blocks chosen for the chunk, and the
      tokens between the last complete block and the band (not yet a block), all at one
      distance, ``window``: keys un-rotated (position 0), the query rotated to ``window``.

    Memory blocks are the tokens from ``init`` on, in runs of ``block``; block ``b`` is
    in memory for the chunk once its last token has left the band of the chunk's first
    query (``init + (b + 1) * block - 1 <= s - window``). Queries below ``dense`` see every
    earlier key at true positions (exact dense attention). ``true_positions`` scores the
    memory at true positions instead (a debugging aid: with ``topk`` >= the number of
    blocks it is dense causal attention).
    """

    init: int = 128
    block: int = 128
    window: int = 4096
    topk: int = 16
    repr: int = 4
    chunk: int = 512
    dense: int = 8192
    per_head: bool = False
    true_positions: bool = False
    rotary: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)
    windows: ClassVar[bool] = False  # prepare() plans its own regions, with no sliding window

    def inv_freq(self) -> torch.Tensor:
        return self.rotary.inv_freq

    @property
    def edge(self) -> int:
        """Queries at the far edge of the window whose attention scores a token (chunk / 4)."""
        return max(1, self.chunk // 4)

    def transient_memory(self) -> BlockMemoryCache:
        return BlockMemoryCache(layers=1, init=self.init, block=self.block, window=self.window)

    # ---- the one hook

    def prepare(self, call: AttentionCall) -> Iterator[Work]:
        if call.query.shape[0] != 1:
            raise LongreachError(
                f"infllm reads one sequence at a time, got a batch of {call.query.shape[0]}; "
                "run the sequences one by one."
            )
        memory = call.memory
        if isinstance(memory, BlockMemoryCache):
            state = memory.layer(call.layer)
        else:  # a call without a cache (use_cache=False): the same rule, on a memory of its own
            state = self.transient_memory().layer(0)
        return self.works(call, state)

    def works(self, call: AttentionCall, state: MemoryLayer) -> Iterator[Work]:
        """The works of ``call`` against the memory ``state`` (resident slot 0 at ``state.slot_base``)."""
        base = state.slot_base
        q_len = call.query.shape[-2]
        p0 = base + call.q_offset
        p1 = p0 + q_len
        if p0 < self.dense:
            e = min(p1, self.dense)
            rows = (0, e - p0)
            dense_plan = plan(
                (Region(d=(0, None)),),
                e - p0,
                call.key.shape[-2],
                call.q_offset,
                block=max(1024, e - p0),
                check=False,
            )
            yield Work(dense_plan, (), rows, self._scorer(call, state, base, p0, p0, e))
        s = max(p0, self.dense)
        while s < p1:
            e = min(p1, s + self.chunk)
            yield self._sparse(call, state, base, p0, s, e)
            s = e

    # ---- one execution chunk

    def _sparse(
        self, call: AttentionCall, state: MemoryLayer, base: int, p0: int, s: int, e: int
    ) -> Work:
        key, value = call.key, call.value
        inv_freq = self.inv_freq()
        device = key.device
        if not state.started:
            pos = torch.arange(self.init, device=device)
            init_k = rotate(key[:, :, : self.init], -pos, inv_freq)[0]
            state.start(init_k, value[0, :, : self.init].clone())
        # blocks that left the band of the chunk's first query join the memory
        target = max(0, (s - self.window - self.init + 1) // self.block)
        while state.n_blocks < target:
            a = self.init + state.n_blocks * self.block
            pos = torch.arange(a, a + self.block, device=device)
            keys = rotate(key[:, :, a - base : a - base + self.block], -pos, inv_freq)[0]
            top = (
                state.block_scores(keys.shape[0])
                .to(device)
                .topk(min(self.repr, self.block), dim=-1)
                .indices
            )
            rep = keys.gather(1, top[..., None].expand(-1, -1, keys.shape[-1])).float().mean(1)
            state.add_block(keys, value[0, :, a - base : a - base + self.block].clone(), rep)

        query = call.query[:, :, s - p0 : e - p0]
        qpos = torch.arange(s, e, device=device)
        far_query = rotate(query, self.window - qpos, inv_freq)  # every query at position window
        chosen = self.retrieve(state, far_query)
        # the tokens between the memory and the band, always seen at the memory's distance:
        # [gap, full_stop) by every query of the chunk (they join the staging, one kernel call
        # for all), [full_stop, gap_stop) by the later queries only (a triangle of their own)
        gap = state.memory_end
        full_stop = max(gap, s - self.window + 1)
        gap_stop = max(full_stop, e - self.window + 1)
        slot_s, slot_e, kv_len = s - base, e - base, key.shape[-2]
        if self.true_positions:  # the whole gap at true positions, from the resident keys
            extra = None
            gap_region = Region(k=(gap - base, None), d=(self.window, None), pset=0)
            sources: list[PositionSet] = [PositionSet(query, key[:, :, :0], 0)]
        else:  # one rotation of the whole gap, then split between the staging and the triangle
            gap_pos = torch.arange(gap, gap_stop, device=device)
            gap_keys = rotate(key[:, :, gap - base : gap_stop - base], -gap_pos, inv_freq)
            cut = full_stop - gap
            extra = (gap_keys[0, :, :cut], value[0, :, gap - base : full_stop - base])
            gap_region = Region(k=(full_stop - base, None), d=(self.window, None), pset=1)
            sources = [PositionSet(far_query, gap_keys[:, :, cut:], full_stop - base)]
        glob_k, glob_v, glob_pos = self._gather(state, chosen, device, extra)
        if self.true_positions:
            glob_q = query
            heads = glob_k.shape[0]
            glob_k = rotate(glob_k[:, None], glob_pos.expand(heads, -1), inv_freq)[:, 0]
        else:
            glob_q = far_query

        pieces = region_pieces(Region(d=(0, self.window - 1)), slot_s, slot_e, kv_len)
        pieces += region_pieces(gap_region, slot_s, slot_e, kv_len)
        if glob_k.shape[1]:
            pieces.append(Piece(Kind.FULL, slot_s, slot_e, 0, glob_k.shape[1], 2))
        sources.append(PositionSet(glob_q, glob_k[None], 0, glob_v[None]))
        work_plan = Plan(e - s, kv_len, slot_s, (Tile(slot_s, slot_e, _tidy(pieces)),))
        return Work(work_plan, sources, (s - p0, e - p0), self._scorer(call, state, base, p0, s, e))

    def retrieve(self, state: MemoryLayer, far_query: torch.Tensor) -> torch.Tensor:
        """Indices of the memory blocks a chunk attends: (topk,) sorted, or (Hkv, topk) per head.

        Each block's score is its representative keys (un-rotated, one per KV head) against
        the chunk's mean query rotated to ``window``, summed over the heads (InfLLM's
        shared selection) or taken per KV head (``per_head``).
        """
        n = state.n_blocks
        device = far_query.device
        if n <= self.topk:
            return torch.arange(n, device=device)
        reps = state.representatives().to(device)  # (n, Hkv, D)
        hkv = reps.shape[1]
        mean_q = far_query[0].float().mean(1)  # (Hq, D)
        mean_q = mean_q.view(hkv, -1, mean_q.shape[-1]).sum(1)  # the query heads of each KV head
        scores = torch.einsum("nhd,hd->nh", reps, mean_q)
        if self.per_head:
            return scores.topk(self.topk, dim=0).indices.T.sort(-1).values
        return scores.sum(1).topk(self.topk).indices.sort().values

    def _gather(
        self,
        state: MemoryLayer,
        chosen: torch.Tensor,
        device: torch.device,
        extra: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Init tokens + chosen blocks (+ ``extra`` K/V) as one staging K/V (Hkv, T, D).

        Also returns the positions (1 or Hkv, T') of the init tokens and blocks (``extra``,
        which only the rotated-to-window rule uses, has none).
        """
        init_pos = torch.arange(self.init, device=device)
        ks, vs = [state.init_k], [state.init_v]
        pos = init_pos[None]
        if chosen.numel():
            k, v = state.store.gather(chosen)
            ks.append(k)
            vs.append(v)
            starts = self.init + chosen * self.block  # (n,) or (Hkv, n)
            pos = (starts[..., None] + torch.arange(self.block, device=device)).flatten(-2)
            if pos.dim() == 1:
                pos = pos[None]
            pos = torch.cat([init_pos.expand(pos.shape[0], -1), pos], dim=-1)
        if extra is not None and extra[0].shape[1]:
            ks.append(extra[0])
            vs.append(extra[1])
        if len(ks) == 1:
            return state.init_k, state.init_v, pos
        return torch.cat(ks, 1), torch.cat(vs, 1), pos

    # ---- representatives: attention received at the far edge of the window

    def _scorer(self, call: AttentionCall, state: MemoryLayer, base: int, p0: int, s: int, e: int):
        """The ``done`` callback of a work: add the attention its queries gave at the window's edge.

        A token ``j``'s score is the attention probability ``exp(q_i . k_j * scale - lse_i)``
        it receives from the ``E = max(1, chunk // 4)`` last queries that see it in their band
        (``window - E <= i - j < window``), summed over the query heads of its KV head:
        InfLLM's "attention received in the local window", measured over the last queries
        before the token leaves rather than its whole stay (C x E extra scores per chunk of C
        queries instead of C x window; E = chunk cost as much as a third of the attention).
        The rule does not depend on how a call is split into chunks, and every score is
        complete before the token's block forms.
        """
        edge = self.edge
        z0 = max(self.init, s - self.window + 1, state.score_base)
        z1 = e - self.window + edge  # exclusive
        if z1 <= z0:
            return None
        scale = call.scale if call.scale is not None else call.query.shape[-1] ** -0.5

        def done(out: torch.Tensor, lse: torch.Tensor) -> None:
            query = call.query[0, :, s - p0 : e - p0]  # (Hq, C, D)
            hq, _, dim = query.shape
            keys = call.key[0, :, z0 - base : z1 - base]  # (Hkv, Z, D)
            hkv = keys.shape[0]
            total = torch.zeros(hkv, z1 - z0, device=keys.device)
            step = max(edge, _SCORE_KEYS)
            for a in range(z0, z1, step):
                b = min(z1, a + step)
                r0, r1 = max(s, a + self.window - edge), min(e, b - 1 + self.window)
                if r0 >= r1:
                    continue
                # in the model's dtype: bf16 matmuls are 13x faster where the CPU has AMX
                q = query[:, r0 - s : r1 - s].reshape(hkv, hq // hkv, r1 - r0, dim)
                k = keys[:, a - z0 : b - z0]
                logits = torch.matmul(q, k[:, None].transpose(-1, -2)).float() * scale
                rows = lse[0, :, r0 - s : r1 - s].reshape(hkv, hq // hkv, r1 - r0, 1)
                outside = _outside_edge(r0 - a, r1 - r0, b - a, self.window, edge)
                p = logits.sub_(rows).exp_().masked_fill_(outside.to(keys.device), 0.0)
                total[:, a - z0 : b - z0] = p.sum((1, 2))
            state.add_scores(z0, total)

        return done


@register
@dataclasses.dataclass
class InfLLM(Method):
    """InfLLM (Xiao et al., 2024, InfLLM: Training-Free Long-Context Extrapolation for LLMs with an Efficient Context Memory, arXiv 2402.04617).

    Each query attends to the ``init`` first tokens, a local window of the ``window`` most
    recent tokens under normal RoPE, and the ``topk`` memory blocks (of ``block`` tokens)
    most relevant to its execution chunk of ``chunk`` queries. Evicted tokens are grouped
    into blocks; a block is represented by the mean of the un-rotated keys of its ``repr``
    tokens that received the most attention in the window. Retrieval scores the chunk's
    mean query against the representatives, one selection shared by the heads of a layer
    (``per_head`` chooses per KV head). Memory keys carry no rotation and the query is
    rotated to position ``window``: every memory token sits at distance ``window``, so no
    position exceeds what the model was trained on. Window and memory are merged exactly
    by log-sum-exp in one softmax. Cost per query: ``init + topk * block + window`` keys,
    whatever the input length; the memory grows linearly (RAM, then disk).

    Inputs shorter than ``dense`` (default: the trained length) run exact dense attention,
    bit-identical to vanilla (the training-free switch of InfLLM-V2, arXiv 2509.24663);
    queries past it run the sparse rule.

    Where this differs from the authors' code (thunlp/InfLLM):

    - representatives are scored by the attention a token receives from the ``chunk / 4``
      last queries that see it in the window, not summed over its whole stay: an extra
      C x C / 4 scores per chunk of C queries instead of C x window;
    - tokens that left the window but do not yet fill a block are always attended at the
      memory's distance (the authors keep them in a remainder buffer: the same rule);
    - blocks form only when their last token leaves the window of a chunk's first query.

    Defaults scale with the trained length L: the authors' values for L = 8192 (window
    4096, block and init 128, chunk 512) are ``window = L/2``, ``block = init = L/64``
    (at least 4), ``chunk = L/16`` (at least 64, at most ``window``), ``topk`` 16, ``repr`` 4;
    a 256-token model gets window 128, blocks of 4 and chunks of 64.

    Parameters:
        block: tokens per memory block (default L/64).
        init: initial tokens always attended (default L/64).
        window: local window under normal RoPE (default L/2).
        topk: memory blocks retrieved per execution chunk (default 16).
        repr: representative tokens per block (default 4).
        chunk: queries per execution chunk, one retrieval each (default L/16, at least 64;
            decoding retrieves per token).
        per_head: choose blocks per KV head instead of once per layer.
        dense: inputs up to this many tokens run dense attention (default L; 0 = never).
        budget: RAM bytes for memory blocks of all layers (e.g. ``4GiB``); beyond it blocks
            go to disk under ``offload_dir``.
        kv_dtype: storage dtype of memory blocks: fp32, bf16, fp16 or int8 (default: the model's).
        offload_dir: folder for the disk tier (a run folder inside it is deleted after use).
        true_positions: score memory at true positions (debugging; not training-free).
        original_max: L, the trained length (default: the model's).
    """

    name: ClassVar[str] = "infllm"
    paper: ClassVar[str] = (
        "Xiao et al., 2024, InfLLM: Training-Free Long-Context Extrapolation for LLMs with an "
        "Efficient Context Memory, arXiv 2402.04617"
    )
    summary: ClassVar[str] = "local window + retrieved memory blocks, bounded attention span"
    touches: ClassVar[frozenset[str]] = frozenset({ATTENTION, CACHE})

    block: int | None = param(None, "tokens per memory block (default: trained length / 64)")
    init: int | None = param(None, "initial tokens always attended (default: trained length / 64)")
    window: int | None = param(None, "local window under normal RoPE (default: trained length / 2)")
    topk: int = param(16, "memory blocks retrieved per execution chunk")
    repr: int = param(4, "representative tokens per block")
    chunk: int | None = param(None, "queries per retrieval (default: trained length / 16, >= 64)")
    per_head: bool = param(False, "choose blocks per KV head instead of once per layer")
    dense: int | None = param(None, "inputs up to this length run dense attention (default: L)")
    budget: str | None = param(None, "RAM for memory blocks, e.g. 4GiB (default: unbounded)")
    kv_dtype: str | None = param(None, "storage dtype of memory blocks: fp32, bf16, fp16, int8")
    offload_dir: str | None = param(None, "folder for blocks beyond the budget (disk tier)")
    true_positions: bool = param(False, "score memory at true positions (debugging)")
    original_max: int | None = param(None, "L, the trained length (default: the model's)")

    def validate(self) -> None:
        for name in ("block", "init", "window", "chunk", "original_max"):
            value = getattr(self, name)
            if value is not None and value < 1:
                self.fail(f"{name} must be a positive number of tokens (got {value}).")
        if self.topk < 0:
            self.fail(f"topk must be >= 0 blocks (got {self.topk}).")
        if self.repr < 1:
            self.fail(f"repr must be >= 1 token (got {self.repr}).")
        if self.dense is not None and self.dense < 0:
            self.fail(f"dense must be >= 0 tokens (got {self.dense}).")
        if self.kv_dtype is not None and self.kv_dtype not in KV_DTYPES:
            self.fail(f"kv_dtype must be one of {', '.join(KV_DTYPES)} (got {self.kv_dtype!r}).")
        if self.budget is not None:
            self.budget_bytes()
        if self.budget is not None and self.offload_dir is None:
            self.fail("a budget needs offload_dir=<folder> for the blocks beyond it.")

    def budget_bytes(self) -> int | None:
        if self.budget is None:
            return None
        return parse_bytes(self.budget, self.name)

    def geometry(self, model: torch.nn.Module) -> dict[str, int]:
        """init, block, window, chunk and dense resolved against the model's trained length."""
        length = self.trained_length(model)
        unit = max(4, length // 64)
        window = self.window if self.window is not None else max(1, length // 2)
        out = {
            "init": self.init if self.init is not None else unit,
            "block": self.block if self.block is not None else unit,
            "window": window,
            # at least 64 queries: on tiny models the per-chunk work is overhead, not arithmetic
            "chunk": self.chunk if self.chunk is not None else min(window, max(64, length // 16)),
            "dense": self.dense if self.dense is not None else length,
        }
        if self.repr > out["block"]:
            self.fail(f"repr ({self.repr}) must not exceed block ({out['block']}).")
        if out["chunk"] > out["window"]:
            self.fail(
                f"chunk ({out['chunk']}) must not exceed window ({out['window']}): a chunk's "
                "queries must all see the tokens that leave the window during it."
            )
        # The sparse rule needs the init tokens outside the band: queries below init + window
        # see every earlier token under it anyway, so they always run dense.
        out["dense"] = max(out["dense"], out["init"] + out["window"])
        return out

    def check_model(self, model: torch.nn.Module) -> None:
        rotary_module(model, self.name)
        if not hf.attention_modules(model):
            self.fail(f"{type(model).__name__} has no attention modules that longreach recognises.")
        if sliding_windows(model):
            self.fail(
                f"{type(model).__name__} has sliding-window attention layers, which infllm's "
                "memory layout does not combine with yet; use a model without a sliding window."
            )
        self.geometry(model)

    def layout(self, model: torch.nn.Module) -> InfLLMLayout:
        g = self.geometry(model)
        return InfLLMLayout(
            init=g["init"],
            block=g["block"],
            window=g["window"],
            topk=self.topk,
            repr=self.repr,
            chunk=g["chunk"],
            dense=g["dense"],
            per_head=self.per_head,
            true_positions=self.true_positions,
            rotary=rotary_module(model, self.name),
        )

    def new_cache(self, model: torch.nn.Module) -> BlockMemoryCache:
        g = self.geometry(model)
        return BlockMemoryCache(
            layers=model.config.num_hidden_layers,
            init=g["init"],
            block=g["block"],
            window=g["window"],
            kv_dtype=self.kv_dtype,
            budget=self.budget_bytes(),
            offload_dir=self.offload_dir,
            resident_blocks=max(64, 4 * self.topk),
        )

    def install(self, model: torch.nn.Module, patch: Patch) -> None:
        handle = hf.use(model, self.layout(model))
        patch.on_undo(handle.restore)
        patch.cache_policy(model, lambda: self.new_cache(model))
        patch.publish_cache(
            model, BlockMemoryCache,
            "infllm reads one unpadded sequence at a time; drop the padding (or run the rows "
            "one by one).",
        )  # fmt: skip


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str, method: str = "infllm") -> int:
    """``4GiB``, ``512MB``, ``2g`` or a plain number of bytes -> bytes (binary units)."""
    raw = str(text).strip().lower().replace("ib", "").replace("b", "")
    number = raw.rstrip("kmgt")
    unit = raw[len(number) :]
    try:
        value = float(number)
    except ValueError:
        raise LongreachError(
            f"{method}: budget must be a size such as 4GiB or 512MiB, got {text!r}."
        ) from None
    if unit not in _UNITS or not math.isfinite(value) or value <= 0:
        raise LongreachError(
            f"{method}: budget must be a size such as 4GiB or 512MiB, got {text!r}."
        )
    return int(value * _UNITS[unit])
