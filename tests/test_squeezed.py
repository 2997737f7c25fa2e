"""squeezed: exact at threshold 0, its dense reference, clusters reused, errors, the kept share."""

from __future__ import annotations

import sys

import pytest
import reference as ref
import torch
from tiny import sharp_model, tiny_model, tokens

import longreach as lr
from longreach import LongreachError, compat
from longreach.attention import hf
from longreach.methods import build_method
from longreach.methods import squeezed as sq
from longreach.prefill import Prefill, advance, score

DOC, QUESTION = 300, 20
SPEC = dict(window=16, clusters=0.1)


def _ask(model, doc, question, decode=(), cache=None, past=None):
    """Prefill ``doc`` (unless a cache holding it is given), then the question's logits at
    every position, then one logits row per further token fed one at a time."""
    if cache is None:
        state = lr.prefill(model, doc, chunk=128)
    else:
        state = Prefill(cache, torch.empty(0), past)
    rows = [score(model, state, question)[0]]
    for token in decode:
        advance(model, state, torch.tensor([[token]]))
        rows.append(state.logits)
    return torch.cat(rows), state


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_threshold_zero_keeps_every_cluster_and_is_vanilla(family, monkeypatch):
    monkeypatch.setattr(sq, "kmeans", lambda *a, **k: pytest.fail("threshold 0 needs no k-means"))
    model = tiny_model(family)
    doc, question = tokens(DOC, seed=1), tokens(QUESTION, seed=2)
    with torch.no_grad():
        want_doc = lr.prefill(model, doc, chunk=128).logits
        want = model(torch.cat([doc, question], 1)).logits[0, DOC:]
        state = lr.prefill(model, torch.cat([doc, question], 1), chunk=128)
        want_new = lr.greedy(model, state, 5)
    with lr.extend(model, "squeezed", threshold=0, **SPEC) as handle:
        got_doc = lr.prefill(model, doc, chunk=128).logits
        got, state = _ask(model, doc, question)
        new = lr.greedy(model, state, 5)
        assert handle.method.reads.share == 1.0
    assert float((got_doc - want_doc).abs().max()) < 1e-5, "the document's prefill is exact"
    err = float((got - want).abs().max())
    assert err < 1e-5, f"max |d logits| {err} against vanilla, expected < 1e-5"
    assert torch.equal(new, want_new)


def test_the_documents_prefill_is_untouched_at_any_threshold():
    model = sharp_model(scale=4.0)
    doc = tokens(DOC, seed=1)
    with hf.use(model), torch.no_grad():  # the block kernel's plain causal attention
        want = lr.prefill(model, doc, chunk=128).logits
    with lr.extend(model, "squeezed", threshold=0.9, **SPEC):
        got = lr.prefill(model, doc, chunk=128).logits
    assert torch.equal(got, want), "the document's prefill must be the kernel's causal attention"


def _layers_of(handle, cache):
    fixed = handle.method.context_of(cache)
    out = {}
    for layer, c in fixed.layers.items():
        out[layer] = dict(
            labels=c.labels,
            centroids=c.centroids,
            threshold=c.threshold,
            coarse_labels=c.coarse_labels,
            coarse_centroids=c.coarse_centroids,
            coarse_threshold=c.coarse_threshold,
        )
    return fixed.context, out


@pytest.mark.parametrize(
    "spec",
    [
        dict(threshold=0.5),
        dict(threshold=0.8),
        dict(threshold=0.6, levels=2, coarse_clusters=0.04),
        dict(threshold=0.5, kmeans="faiss"),
    ],
)
def test_question_and_decoding_match_the_dense_reference(spec):
    model = sharp_model(scale=4.0)
    doc, question = tokens(DOC, seed=3), tokens(QUESTION, seed=4)
    decode = [7, 99, 42]
    with lr.extend(model, "squeezed", **SPEC, **spec) as handle:
        got, state = _ask(model, doc, question, decode)
        context, layers = _layers_of(handle, state.cache)
        share = handle.method.reads.share
    assert context == DOC
    assert sorted(layers) == [0, 1]
    assert 0.05 < share < 0.95, f"share of keys read {share}: the test should skip some keys"
    ids = torch.cat([doc, question, torch.tensor([decode[:-1] + [decode[-1]]])], 1)
    calls = [DOC] + [DOC + QUESTION + t for t in range(len(decode))]
    attention = ref.squeezed_attention(
        context=DOC, window=SPEC["window"], layers=layers, calls=calls
    )
    want = ref.reference_logits(model, ids, attention)[0, DOC:]
    err = float((got - want).abs().max())
    assert err < 1e-4, f"max |d logits| {err} against the float64 reference, expected < 1e-4"
    with torch.no_grad():
        vanilla = model(ids).logits[0, DOC:]
    assert float((got - vanilla).abs().max()) > 1e-3, "skipping keys should change the logits"


@pytest.fixture
def kmeans_calls(monkeypatch) -> list:
    """Each k-means run of the method, recorded (its cluster count)."""
    calls = []
    real = sq.kmeans

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(sq, "kmeans", counting)
    return calls


def test_a_second_question_reuses_the_clusters(kmeans_calls):
    calls = kmeans_calls
    model = sharp_model(scale=4.0)
    doc = tokens(DOC, seed=5)
    first, second = tokens(QUESTION, seed=6), tokens(12, seed=7)
    with lr.extend(model, "squeezed", threshold=0.7, **SPEC):
        _, state = _ask(model, doc, first, decode=[5, 6])
        after_first = len(calls)
        compat.crop_cache(state.cache, DOC)  # back to the document
        got, _ = _ask(model, doc, second, cache=state.cache, past=DOC)
        after_second = len(calls)
    assert after_first == 2 * 2, f"{after_first} k-means runs, expected 2 layers x 2 KV heads"
    assert after_second == after_first, "the second question must reuse the clusters"
    with lr.extend(model, "squeezed", threshold=0.7, **SPEC):
        fresh, _ = _ask(model, doc, second)
    assert torch.equal(got, fresh), "reused clusters answer as freshly made ones"


def test_the_kept_share_falls_as_the_threshold_rises():
    model = sharp_model(scale=4.0)
    doc, question = tokens(DOC, seed=8), tokens(QUESTION, seed=9)
    shares = []
    for threshold in (0, 0.3, 0.6, 0.9):
        with lr.extend(model, "squeezed", threshold=threshold, **SPEC) as handle:
            _ask(model, doc, question, decode=[11, 12])
            shares.append((handle.method.reads.kept_share, handle.method.reads.share))
    kept = [k for k, _ in shares]
    assert kept[0] == 1.0 and all(a > b for a, b in zip(kept, kept[1:], strict=False)), shares
    assert all(read >= k for k, read in shares), "a head never reads fewer keys than it keeps"


def test_bad_parameters_and_a_missing_scikit_learn_are_one_line(monkeypatch):
    for spec, words in (
        ("squeezed:threshold=1", "threshold is a quantile"),
        ("squeezed:threshold=-0.1", "threshold is a quantile"),
        ("squeezed:clusters=0", "clusters is a share"),
        ("squeezed:levels=3", "levels must be 1 or 2"),
        ("squeezed:levels=2,coarse_clusters=0.5", "must not exceed clusters"),
        ("squeezed:iters=0", "iters >= 1"),
        ("squeezed:kmeans=scipy", "kmeans is one of sklearn, faiss"),
    ):
        with pytest.raises(LongreachError, match=words) as info:
            build_method(spec)
        assert "\n" not in str(info.value)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(LongreachError, match=r"scikit-learn.*longreach\[squeezed\]") as info:
        lr.extend(tiny_model(), "squeezed")
    assert "\n" not in str(info.value)
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(LongreachError, match=r"kmeans=faiss needs faiss-cpu") as info:
        lr.extend(tiny_model(), "squeezed:kmeans=faiss")
    assert "\n" not in str(info.value)


def test_both_kmeans_libraries_find_planted_clusters():
    # four tight groups of unit vectors: either library labels each group as one cluster
    centres = torch.nn.functional.normalize(
        torch.randn(4, 16, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    noise = 0.01 * torch.randn(4, 50, 16, generator=torch.Generator().manual_seed(1))
    points = (centres[:, None] + noise).reshape(200, 16)
    truth = torch.arange(4).repeat_interleave(50)
    for backend in sq.KMEANS_BACKENDS:
        labels = sq.kmeans(points, 4, 50, 0, backend)
        assert labels.shape == (200,) and labels.dtype == torch.long
        pairs = {(int(t), int(g)) for t, g in zip(truth, labels, strict=True)}
        assert len(pairs) == 4 and len({g for _, g in pairs}) == 4, f"{backend}: {sorted(pairs)}"


def test_a_batch_of_questions_is_refused_in_one_line():
    model = tiny_model()
    doc = tokens(DOC, batch=2)
    with lr.extend(model, "squeezed", **SPEC):
        state = lr.prefill(model, doc, chunk=128)
        with pytest.raises(LongreachError, match="one sequence"):
            lr.prefill(model, tokens(5, batch=2), cache=state.cache, past=DOC)


def test_a_context_clusters_its_document_once_for_many_questions(kmeans_calls):
    calls = kmeans_calls
    model = sharp_model(scale=4.0)
    method = build_method("squeezed", threshold=0.7, **SPEC)
    ctx = lr.Context.encode(model, None, tokens(DOC, seed=5)[0], method)
    answers = [ctx.ask_ids(tokens(QUESTION, seed=s)[0], max_new_tokens=3) for s in (6, 7, 8)]
    assert len(calls) == 2 * 2, f"{len(calls)} k-means runs for 3 questions, expected 2 x 2 once"
    with lr.extend(model, "squeezed", threshold=0.7, **SPEC):
        _, state = _ask(model, tokens(DOC, seed=5), tokens(QUESTION, seed=8))
    assert answers[-1][0] == int(state.logits[0].argmax()), "the third answer as a fresh read"
