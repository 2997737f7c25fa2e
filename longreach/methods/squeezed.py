"""Squeezed Attention: a fixed context's keys clustered once, questions read only the relevant clusters."""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from longreach import compat
from longreach.attention import context, hf
from longreach.attention.kernel import PositionSet
from longreach.attention.layout import (
    AttentionCall,
    CausalLayout,
    Kind,
    Layout,
    Piece,
    Plan,
    Region,
    Tile,
    Work,
    _tidy,
    region_pieces,
)
from longreach.errors import LongreachError
from longreach.methods.base import ATTENTION, Method, Patch, param
from longreach.methods.registry import register
from longreach.prefill import current_planned_length

log = logging.getLogger(__name__)

_CAUSAL = CausalLayout()
_TILE = 1024  # query rows per tile of a question's plan


KMEANS_BACKENDS = {"sklearn": ("sklearn.cluster", "scikit-learn"), "faiss": ("faiss", "faiss-cpu")}


def kmeans_library(backend: str = "sklearn") -> Any:
    """The k-means library module of ``backend`` (a key of ``KMEANS_BACKENDS``, checked by
    ``Squeezed.validate``), or a one-line error saying how to install it."""
    module, package = KMEANS_BACKENDS[backend]
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise LongreachError(
            f"squeezed: kmeans={backend} needs {package}, which is not installed; "
            "run pip install 'longreach[squeezed]'."
        ) from None


def kmeans(
    points: torch.Tensor, n_clusters: int, iters: int, seed: int, backend: str = "sklearn"
) -> torch.Tensor:
    """Cluster labels (n,) of ``points`` (n, D) by k-means.

    ``sklearn``: scikit-learn's Lloyd k-means from a k-means++ start (the reference code's).
    ``faiss``: faiss-cpu's k-means, a random start of ``seed`` and at most ``iters`` BLAS
    iterations (it stops early when the assignment settles): about 10x faster here, 2.8 s
    for 32k random unit vectors into 1638 clusters where scikit-learn took 29-38 s per KV
    head of SmolLM2's 32k keys, one thread.
    """
    library = kmeans_library(backend)
    data = points.float().contiguous().numpy()
    if backend == "faiss":
        km = library.Kmeans(
            data.shape[1], n_clusters, niter=iters, seed=seed, verbose=False,
            max_points_per_centroid=data.shape[0],  # all points train: no subsampling
            min_points_per_centroid=1,
        )  # fmt: skip
        km.train(data)
        _, labels = km.index.search(data, 1)
        return torch.as_tensor(labels[:, 0], dtype=torch.long)
    km = library.KMeans(
        n_clusters=n_clusters, init="k-means++", n_init=1, max_iter=iters, random_state=seed
    )
    return torch.as_tensor(km.fit_predict(data), dtype=torch.long)


def cluster_keys(
    keys: torch.Tensor, n_clusters: int, iters: int, seed: int, backend: str = "sklearn"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head: (centroids (H, C, D), labels (H, n)) of ``keys`` (H, n, D).

    As the paper's reference code does, k-means runs on the L2-normalised keys (their
    directions decide q.k up to a norm) and a centroid is the mean of its raw keys.
    """
    heads, n, dim = keys.shape
    keys = keys.float().cpu()
    n_clusters = max(1, min(n_clusters, n))
    centroids = torch.zeros(heads, n_clusters, dim)
    labels = torch.empty(heads, n, dtype=torch.long)
    for h in range(heads):
        unit = torch.nn.functional.normalize(keys[h], dim=-1)
        labels[h] = kmeans(unit, n_clusters, iters, seed, backend)
        counts = torch.bincount(labels[h], minlength=n_clusters).clamp(min=1)
        centroids[h] = (
            torch.zeros(n_clusters, dim).index_add_(0, labels[h], keys[h]) / counts[:, None]
        )
    return centroids, labels


def centroid_scores(
    query: torch.Tensor, centroids: torch.Tensor, sizes: torch.Tensor, scale: float
) -> torch.Tensor:
    """Each cluster's estimated attention per key, averaged over queries: (Hkv, C).

    For a query q, a key of cluster c is estimated to get the softmax weight
    ``exp(s q.C_c) / sum_j N_j exp(s q.C_j)`` (the paper's centroid lookup: every key of
    cluster j scored as its centroid C_j, N_j keys in it). The estimate is averaged over the
    queries (B=1: (Hq, L, D)) and over the query heads that share a KV head. Clusters with
    ``sizes`` 0 (emptied by a coarser level) are neither scored nor in the denominator: 0.
    """
    hkv = centroids.shape[0]
    hq, length, dim = query.shape
    q = query.float().view(hkv, hq // hkv, length, dim)
    out = torch.zeros(centroids.shape[:2], device=q.device)
    for h in range(hkv):
        live = (sizes[h] > 0).nonzero().flatten()
        if not len(live):
            continue
        logits = q[h] @ centroids[h, live].float().to(q.device).T * scale  # (g, L, live)
        log_sizes = sizes[h, live].float().to(q.device).log()
        denominator = torch.logsumexp(logits + log_sizes, dim=-1, keepdim=True)
        out[h, live.to(q.device)] = (logits - denominator).exp().mean(dim=(0, 1))
    return out


@dataclasses.dataclass
class LayerClusters:
    """One layer's clusters of the fixed context: what a second question reuses."""

    context: int  # fixed-context keys (the observation window included)
    labels: torch.Tensor  # (Hkv, n) cluster of each clustered key (fine clusters at 2 levels)
    centroids: torch.Tensor  # (Hkv, C, D)
    threshold: float  # keep a cluster whose score is >= this (-inf: keep all)
    coarse_labels: torch.Tensor | None = None  # (Hkv, n) level-1 cluster of each key
    coarse_centroids: torch.Tensor | None = None  # (Hkv, C1, D)
    coarse_threshold: float = float("-inf")

    def to(self, device: torch.device) -> LayerClusters:
        """The same clusters with their tensors on ``device`` (the keys')."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)

    def sizes(self) -> torch.Tensor:
        return _sizes(self.labels, self.centroids.shape[1])

    def coarse_sizes(self) -> torch.Tensor:
        return _sizes(self.coarse_labels, self.coarse_centroids.shape[1])


def _sizes(labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    return torch.stack([torch.bincount(row, minlength=n_clusters) for row in labels])


def key_scores(
    clusters: LayerClusters, query: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank, kept): a ranking score and the keep decision of every clustered key, (Hkv, n).

    One level: a key's score is its cluster's (:func:`centroid_scores`); kept when it is at
    least the threshold. Two levels: the coarse clusters are scored first; the fine
    clusters inside kept coarse ones are scored with a denominator over those only, and a
    key is kept when both pass. ``rank`` orders the kept keys first, the rest after.
    """
    if clusters.coarse_labels is None:
        fine = centroid_scores(query, clusters.centroids, clusters.sizes(), scale)
        score = fine.gather(1, clusters.labels)
        return score, score >= clusters.threshold
    coarse = centroid_scores(query, clusters.coarse_centroids, clusters.coarse_sizes(), scale)
    coarse_key = coarse.gather(1, clusters.coarse_labels)
    level1 = coarse_key >= clusters.coarse_threshold
    n_fine = clusters.centroids.shape[1]
    masked = torch.stack(
        [
            torch.bincount(lab[keep], minlength=n_fine)
            for lab, keep in zip(clusters.labels, level1, strict=True)
        ]
    )
    fine = centroid_scores(query, clusters.centroids, masked, scale)
    fine_key = fine.gather(1, clusters.labels)
    kept = level1 & (fine_key >= clusters.threshold)
    # scores are estimated softmax weights in [0, 1]: level-1 keys (2 + fine) rank first
    return torch.where(level1, 2.0 + fine_key, coarse_key), kept


def choose_keys(rank: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots (Hkv, M) sorted, kept per head (Hkv,)): every head reads M keys, M its widest count.

    The block kernel stages one K/V tensor with the same number of keys per KV head, so a
    head that keeps fewer keys than the widest reads its next-best keys (by ``rank``, ties
    by slot) up to that count: it reads at least what the threshold keeps.
    """
    counts = kept.sum(-1)
    m = int(counts.max())
    order = torch.sort(rank, dim=-1, descending=True, stable=True).indices[:, :m]
    return order.sort(-1).values, counts


@dataclasses.dataclass
class KeysRead:
    """How many fixed-context keys the questions read: the counter a benchmark reads.

    Summed over layers, KV heads and model calls since the last :meth:`reset`: ``offered``
    is the context keys each could read, ``read`` those it read (kept, topped-up and the
    observation window), ``kept`` those the threshold kept (and the window).
    """

    calls: int = 0
    offered: int = 0
    read: int = 0
    kept: int = 0

    @property
    def share(self) -> float:
        """Share of the fixed context's keys read (1.0 before any question)."""
        return self.read / self.offered if self.offered else 1.0

    @property
    def kept_share(self) -> float:
        return self.kept / self.offered if self.offered else 1.0

    def reset(self) -> None:
        self.calls = self.offered = self.read = self.kept = 0


@dataclasses.dataclass
class FixedContext:
    """What the method knows about one cache: where its fixed context ends and its clusters."""

    document_end: int | None  # where the first input ends (the document being prefilled)
    context: int | None = None  # the fixed context, once a question arrives
    layers: dict[int, LayerClusters] = dataclasses.field(default_factory=dict)
    calibration: dict[int, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    counter: KeysRead | None = None


@dataclasses.dataclass(frozen=True)
class SqueezedLayout(Layout):
    """The attention rule of Squeezed Attention for one layer (see :class:`Squeezed`)."""

    windows: ClassVar[bool] = False  # prepare() plans its own regions, no sliding window

    threshold: float = 0.7
    clusters: float = 0.05
    levels: int = 1
    coarse_clusters: float = 0.01
    coarse_threshold: float = 0.5
    window: int = 100
    iters: int = 300
    seed: int = 0
    kmeans: str = "sklearn"

    def prepare(self, call: AttentionCall) -> Iterator[Work]:
        state = call.memory if isinstance(call.memory, FixedContext) else None
        q_len, kv_len = call.query.shape[-2], call.key.shape[-2]
        if state is None or state.context is None or call.q_offset < state.context:
            if state is not None and state.context is None:
                self._keep_calibration(state, call)
            yield Work(_CAUSAL.plan(q_len, kv_len, call.q_offset))
            return
        yield self._question(state, call)

    # ---- the document: exact attention; the last window's queries calibrate the threshold

    def _keep_calibration(self, state: FixedContext, call: AttentionCall) -> None:
        end = state.document_end
        if end is None or self.threshold == 0:  # threshold 0 reads every key: no calibration
            return
        lo = max(call.q_offset, end - self.window)
        hi = min(call.q_offset + call.query.shape[-2], end)
        if lo < hi:
            rows = call.query[0, :, lo - call.q_offset : hi - call.q_offset].float().cpu()
            state.calibration.setdefault(call.layer, []).append(rows)

    # ---- a question: centroids scored, the kept context keys plus every newer key

    def _question(self, state: FixedContext, call: AttentionCall) -> Work:
        key, value, query = call.key, call.value, call.query
        if key.shape[0] != 1:
            raise LongreachError(
                "squeezed: a fixed context holds one sequence; ask its questions one at a time "
                f"(batch 1, got {key.shape[0]})."
            )
        ctx = state.context
        window = min(self.window, ctx)
        n = ctx - window  # clustered keys; the observation window is always read
        q_len, kv_len, s = query.shape[-2], key.shape[-2], call.q_offset
        scale = call.scale if call.scale is not None else query.shape[-1] ** -0.5
        if self.threshold == 0 or not n:  # every key read: plain causal attention
            self._count(state, key.shape[1], ctx, ctx, ctx * key.shape[1])
            return Work(_CAUSAL.plan(q_len, kv_len, s))
        clusters = state.layers.get(call.layer)
        if clusters is None or clusters.context != ctx:
            clusters = self.cluster(key[0, :, :n], self._calibration(state, call), scale, ctx)
            state.layers[call.layer] = clusters
        rank, kept = key_scores(clusters, query[0], scale)
        slots, counts = choose_keys(rank, kept)
        m = slots.shape[1]
        hkv = key.shape[1]
        self._count(state, hkv, ctx, m + window, int(counts.sum()) + hkv * window)
        sources = []
        if m:
            index = slots.to(key.device)[None, :, :, None]
            staged_k = key.gather(2, index.expand(-1, -1, -1, key.shape[-1]))
            staged_v = value.gather(2, index.expand(-1, -1, -1, value.shape[-1]))
            sources.append(PositionSet(query, staged_k, 0, staged_v))
        region = Region(k=(n, None), d=(0, None))  # the window and every newer key, causally
        tiles = []
        for t0 in range(s, s + q_len, _TILE):
            t1 = min(s + q_len, t0 + _TILE)
            pieces = region_pieces(region, t0, t1, kv_len)
            if m:
                pieces.append(Piece(Kind.FULL, t0, t1, 0, m, 1))
            tiles.append(Tile(t0, t1, _tidy(pieces)))
        return Work(Plan(q_len, kv_len, s, tuple(tiles)), sources)

    @staticmethod
    def _count(state: FixedContext, hkv: int, offered: int, read: int, kept: int) -> None:
        if state.counter is not None:
            state.counter.calls += 1
            state.counter.offered += hkv * offered
            state.counter.read += hkv * read
            state.counter.kept += kept

    def _calibration(self, state: FixedContext, call: AttentionCall) -> torch.Tensor:
        """Calibration queries: the document's last ``window`` queries, kept while it was
        prefilled; a context the method did not see prefilled uses this question's."""
        rows = state.calibration.pop(call.layer, None)
        if rows and state.document_end == state.context:
            return torch.cat(rows, dim=1)
        log.info(
            "squeezed: no document queries kept for layer %d; calibrating on the question",
            call.layer,
        )
        return call.query[0].float().cpu()

    def cluster(
        self, keys: torch.Tensor, calibration: torch.Tensor, scale: float, ctx: int
    ) -> LayerClusters:
        """Cluster one layer's context keys (Hkv, n, D) and calibrate its thresholds."""
        n = keys.shape[1]
        centroids, labels = cluster_keys(
            keys, int(self.clusters * n), self.iters, self.seed, self.kmeans
        )
        out = LayerClusters(ctx, labels, centroids, float("-inf"))
        if self.levels == 2:
            n_coarse = max(1, min(int(self.coarse_clusters * n), centroids.shape[1]))
            coarse_c, coarse_of_fine = cluster_keys(
                centroids, n_coarse, self.iters, self.seed, self.kmeans
            )
            out.coarse_centroids = coarse_c
            out.coarse_labels = coarse_of_fine.gather(1, labels)
        if self.threshold == 0:
            return out.to(keys.device)  # every cluster kept: dense attention
        out.threshold = calibrate(
            calibration, centroids, labels, out.sizes(), scale, self.threshold
        )
        if self.levels == 2 and self.coarse_threshold > 0:
            out.coarse_threshold = calibrate(
                calibration, out.coarse_centroids, out.coarse_labels, out.coarse_sizes(), scale,
                self.coarse_threshold,
            )  # fmt: skip
        return out.to(keys.device)


def calibrate(
    queries: torch.Tensor,
    centroids: torch.Tensor,
    labels: torch.Tensor,
    sizes: torch.Tensor,
    scale: float,
    fraction: float,
) -> float:
    """The layer's threshold: the ``fraction`` quantile of the clustered keys' scores for the
    calibration ``queries`` (Hq, L, D), so that on them ``1 - fraction`` of the keys pass."""
    score = centroid_scores(queries, centroids, sizes, scale).gather(1, labels)
    ordered = score.flatten().double().sort().values  # torch.quantile stops at 2**24 values
    at = fraction * (len(ordered) - 1)
    lo = int(at)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (at - lo) * (ordered[hi] - ordered[lo]))


@register
@dataclasses.dataclass
class Squeezed(Method):
    """Squeezed Attention (Hooper et al., 2024, Squeezed Attention: Accelerating Long Context Length LLM Inference, arXiv 2411.09688).

    For a document read once and questioned many times. The document's prefill is exact
    attention. When the first call with a past arrives (a question after the document),
    what the cache holds is the fixed context: per layer and KV head its keys, except the
    last ``window`` (the observation window, always read), are clustered by k-means
    (scikit-learn) into ``clusters`` x keys clusters, on L2-normalised keys, a centroid
    being its keys' mean. A question's queries score each centroid by its estimated softmax
    weight ``exp(s q.C) / sum_j N_j exp(s q.C_j)``, averaged over the call's queries and the
    KV head's query heads; the keys of clusters at or above the layer's threshold, the
    window and every key after the context (question, generated tokens, causally) are
    attended exactly, merged by log-sum-exp. The threshold is calibrated per layer on the
    queries of the document's last ``window`` tokens: the ``threshold`` quantile of their
    scores over the layer's keys, so that about ``1 - threshold`` of the keys pass.
    ``threshold=0`` reads every key, without clustering: exact attention. The clusters live
    with the cache, so later questions on the same cache (cropped back to the document or
    not) reuse them.

    ``levels=2`` is the paper's hierarchical lookup: the fine centroids are clustered again
    into ``coarse_clusters`` x keys coarse ones; a key is read when its coarse cluster passes
    the ``coarse_threshold`` quantile and its fine cluster (scored against the fine clusters
    of the kept coarse ones) passes ``threshold``.

    Defaults follow the reference code: 5% clusters, a 100-token observation window, k-means++
    with 300 iterations and seed 0, and its 0.7 percentile. Two departures: the threshold is
    calibrated per layer (the reference pools all layers into one quantile), and a KV head
    that keeps fewer keys than the layer's widest head reads its next-best keys up to that
    count (one staging tensor per layer for the block kernel), so it reads at least what the
    threshold keeps; ``reads`` counts both.

    Parameters:
        threshold: quantile of the calibration scores below which a cluster is skipped (0.7).
        clusters: clusters per clustered context key (0.05).
        levels: 1, or 2 for the hierarchical lookup (1).
        coarse_clusters: coarse clusters per key at levels=2 (0.01).
        coarse_threshold: quantile for the coarse clusters at levels=2 (0.5).
        window: last context tokens always read, whose queries calibrate (100).
        iters: k-means iterations at most (300).
        seed: k-means seed (0).
        kmeans: the k-means library: ``sklearn`` (default: the reference code's k-means++
            start and Lloyd iterations) or ``faiss`` (faiss-cpu: a random start, BLAS
            iterations that stop once the assignment settles; about 10x faster on this
            project's CPU, so a 32k document clusters in minutes instead of most of an hour).
    """

    name: ClassVar[str] = "squeezed"
    paper: ClassVar[str] = (
        "Hooper et al., 2024, Squeezed Attention: Accelerating Long Context Length LLM "
        "Inference, arXiv 2411.09688"
    )
    summary: ClassVar[str] = (
        "a fixed context's keys clustered once; questions read the clusters their queries score"
    )
    touches: ClassVar[frozenset[str]] = frozenset({ATTENTION})
    # A call after a cut cache reads what the cache held as a fixed context, sparsely: two
    # prompts that share a prefix must not share its cache, or the cut decides the result.
    shares_prefix: ClassVar[bool] = False

    threshold: float = param(
        0.7, "quantile of the calibration scores below which a cluster is skipped"
    )
    clusters: float = param(0.05, "clusters per clustered context key")
    levels: int = param(1, "1, or 2 for the hierarchical two-level lookup")
    coarse_clusters: float = param(0.01, "coarse clusters per key (levels=2)")
    coarse_threshold: float = param(0.5, "quantile for the coarse clusters (levels=2)")
    window: int = param(100, "last context tokens always read; their queries calibrate")
    iters: int = param(300, "k-means iterations at most")
    seed: int = param(0, "k-means seed")
    kmeans: str = param("sklearn", "k-means library: sklearn (the reference's) or faiss (faster)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.reads = KeysRead()
        self._contexts: weakref.WeakKeyDictionary[Any, FixedContext] = weakref.WeakKeyDictionary()

    def validate(self) -> None:
        for name in ("threshold", "coarse_threshold"):
            if not 0 <= getattr(self, name) < 1:
                self.fail(f"{name} is a quantile in [0, 1) (got {getattr(self, name)}).")
        for name in ("clusters", "coarse_clusters"):
            if not 0 < getattr(self, name) <= 1:
                self.fail(f"{name} is a share of the keys in (0, 1] (got {getattr(self, name)}).")
        if self.levels not in (1, 2):
            self.fail(f"levels must be 1 or 2 (got {self.levels}).")
        if self.levels == 2 and self.coarse_clusters > self.clusters:
            self.fail(
                f"coarse_clusters ({self.coarse_clusters}) must not exceed clusters "
                f"({self.clusters}): the coarse level clusters the fine centroids."
            )
        if self.window < 0 or self.iters < 1 or self.seed < 0:
            self.fail("window and seed must be >= 0 and iters >= 1.")
        if self.kmeans not in KMEANS_BACKENDS:
            self.fail(f"kmeans is one of {', '.join(KMEANS_BACKENDS)} (got {self.kmeans!r}).")

    def check_model(self, model: torch.nn.Module) -> None:
        kmeans_library(self.kmeans)
        if not hf.attention_modules(model):
            self.fail(f"{type(model).__name__} has no attention modules that longreach recognises.")

    def layout(self) -> SqueezedLayout:
        return SqueezedLayout(
            self.threshold, self.clusters, self.levels, self.coarse_clusters,
            self.coarse_threshold, self.window, self.iters, self.seed, self.kmeans,
        )  # fmt: skip

    def context_of(self, cache: Any) -> FixedContext | None:
        """What the method holds for ``cache``: its fixed context and clusters (None if unseen)."""
        return self._contexts.get(cache)

    def install(self, model: torch.nn.Module, patch: Patch) -> None:
        handle = hf.use(model, self.layout())
        patch.on_undo(handle.restore)
        key = compat.cache_kwarg(model)
        tokens: list[Any] = []

        def before(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and not bool(mask.bool().all()):
                raise LongreachError(
                    "squeezed: a fixed context holds one unpadded sequence; pass inputs "
                    "without padding."
                )
            use_cache = kwargs.get("use_cache")
            if use_cache is None:
                use_cache = getattr(module.config, "use_cache", True)
            cache = kwargs.get(key)
            if cache is None and use_cache:
                from transformers import DynamicCache

                cache = kwargs[key] = DynamicCache()  # seen from its first call on
            tokens.append(context.enter(self._fixed(cache, _input_length(args, kwargs))))
            return args, kwargs

        def after(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            context.leave(tokens.pop() if tokens else None)

        patch.forward_pre_hook(model, before)
        done = model.register_forward_hook(after, with_kwargs=True, always_call=True)
        patch.on_undo(done.remove)

    def _fixed(self, cache: Any, length: int) -> FixedContext | None:
        """The cache's fixed-context state for a call of ``length`` new tokens.

        A call on an empty cache starts a document that ends where the input announced
        (``prefill``'s planned length, else this call). Once a call starts at or past that
        end (or on a cache the method never saw filled), what the cache holds is fixed.
        A cache cropped below its fixed context starts a new one (clustered again).
        """
        if cache is None or not hasattr(cache, "get_seq_length"):
            return None
        past = int(cache.get_seq_length())
        state = self._contexts.get(cache)
        if past == 0:
            planned = current_planned_length()
            state = FixedContext(planned if planned is not None else length, counter=self.reads)
            self._contexts[cache] = state
            return state
        if state is None:
            state = FixedContext(None, context=past, counter=self.reads)
            self._contexts[cache] = state
        elif state.context is None:
            if state.document_end is not None and past < state.document_end:
                return state  # the document is still being read
            state.context = past
        elif past < state.context:
            log.info("squeezed: the cache was cropped inside its fixed context; clustering again")
            state.context, state.layers, state.document_end = past, {}, None
            state.calibration.clear()
        return state


def _input_length(args: tuple, kwargs: dict) -> int:
    ids = kwargs.get("input_ids")
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if ids is None and args:
        ids = args[0]
    return int(ids.shape[1]) if isinstance(ids, torch.Tensor) else 0


__all__ = [
    "KeysRead",
    "Squeezed",
    "SqueezedLayout",
    "calibrate",
    "cluster_keys",
    "kmeans",
    "kmeans_library",
]
