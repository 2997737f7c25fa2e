"""The runner on a tiny model: cells, resume, prefix sharing, early stop, perplexity, costs."""

from __future__ import annotations

import math

import pytest
import torch
from fixtures.tinylm import one_thread, tiny_dir, tiny_lm, tiny_tokenizer  # noqa: F401

from longreach.bench import BenchConfig, ResultStore, run_bench
from longreach.bench.cost import PeakMemory, Timer
from longreach.bench.grid import format_length, parse_depths, parse_lengths
from longreach.bench.plan import model_fingerprint
from longreach.bench.runner import _answer, _eos_ids, _prefill, _SharedPrefix
from longreach.errors import LongreachError
from longreach.tasks import PromptFormat, get_task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(), tiny_tokenizer()


def _config(tmp_path, **over) -> BenchConfig:
    values = dict(
        model="tiny",
        tasks=["passkey"],
        lengths=[300, 400],
        depths=[0.2, 0.8],
        samples=2,
        db=str(tmp_path / "runs.db"),
    )
    values.update(over)
    return BenchConfig(**values)


def test_grid_parsing():
    assert parse_lengths("2k,8k,1.5k,3000,2k") == [1536, 2048, 3000, 8192]
    assert parse_lengths(["1k", "512"]) == [512, 1024]
    assert parse_depths("0.9,0.1,0.5,0.5") == [0.1, 0.5, 0.9]
    assert [format_length(n) for n in (2048, 1536, 3000, 131072)] == ["2k", "1.5k", "3000", "128k"]


@pytest.mark.parametrize(
    "text,message",
    [
        ("2x", "malformed length '2x'; write token counts like 512, 2k"),
        ("2k,,-1", "malformed length '-1'"),
        ("0.3", "length '0.3' is not a whole positive number of tokens"),
        ("", "no lengths given"),
    ],
)
def test_malformed_lengths(text, message):
    with pytest.raises(LongreachError, match=message):
        parse_lengths(text)


def test_depth_outside_unit_interval():
    with pytest.raises(LongreachError, match=r"depth 1.5 is outside \[0, 1\]"):
        parse_depths("0.5,1.5")
    with pytest.raises(LongreachError, match="malformed depth 'deep'"):
        parse_depths("deep")


def test_run_stores_every_cell_and_resumes(tmp_path, lm):
    model, tok = lm
    config = _config(tmp_path)
    events = []
    first = run_bench(config, model=model, tokenizer=tok, progress=events.append)
    assert (first.total, first.skipped, first.computed) == (8, 0, 8)
    assert [e.kind for e in events][:2] == ["plan", "start"] and events[-1].kind == "done"
    assert events[-1].done == 8
    with ResultStore(config.db) as store:
        cells = store.cells()
    assert len(cells) == 8 and {c.length for c in cells} == {300, 400}
    for cell in cells:
        assert cell.context_tokens <= cell.length and cell.context_tokens >= cell.length - 130
        assert cell.score in (0.0, 1.0) and cell.expected[0] in cell.prompt
        assert cell.prefill_s > 0 and cell.peak_mem_bytes > 10 * 2**20
        assert cell.mem_kind in ("rss_peak", "ru_maxrss")
        assert 1 <= cell.new_tokens <= 10 and cell.trained_length == 256
        assert cell.model_fingerprint == first.model_fingerprint and cell.dtype == "float32"
    again = run_bench(config, model=model, tokenizer=tok)
    assert (again.total, again.skipped, again.computed) == (8, 8, 0)
    assert again.run_id is None, "a rerun with nothing to compute records no run"
    bigger = run_bench(_config(tmp_path, samples=3), model=model, tokenizer=tok)
    assert (bigger.total, bigger.skipped, bigger.computed) == (12, 8, 4)
    with ResultStore(config.db) as store:
        assert store.count() == 12 and len(store.runs()) == 2


def test_prompt_format_is_part_of_the_key(tmp_path, lm):
    model, tok = lm
    run_bench(_config(tmp_path, samples=1, depths=[0.5]), model=model, tokenizer=tok)
    chat = run_bench(
        _config(tmp_path, samples=1, depths=[0.5], chat=True), model=model, tokenizer=tok
    )
    assert chat.computed == 2
    with ResultStore(tmp_path / "runs.db") as store:
        formats = sorted(c.prompt_format for c in store.cells())
        chat_prompt = next(c.prompt for c in store.cells() if c.prompt_format == "chat")
    assert formats == ["chat", "chat", "raw", "raw"]
    assert chat_prompt.startswith("<|im_start|>user")


def test_shared_prefix_gives_the_same_answers(tmp_path, lm):
    model, tok = lm
    spec = dict(tasks=["niah"], lengths=[900], depths=[0.3, 0.6, 0.9], samples=1)
    shared = run_bench(
        _config(tmp_path, db=str(tmp_path / "a.db"), **spec), model=model, tokenizer=tok
    )
    alone = run_bench(
        _config(tmp_path, db=str(tmp_path / "b.db"), share_prefix=False, **spec),
        model=model,
        tokenizer=tok,
    )
    assert shared.model_fingerprint == alone.model_fingerprint
    with ResultStore(tmp_path / "a.db") as a, ResultStore(tmp_path / "b.db") as b:
        cells_a, cells_b = a.cells(), b.cells()
    assert [c.shared_prefix_tokens > 0 for c in cells_a] == [False, True, True]
    assert all(c.shared_prefix_tokens == 0 for c in cells_b)
    assert [c.output for c in cells_a] == [c.output for c in cells_b]
    assert [c.key for c in cells_a] == [c.key for c in cells_b]


def test_decoding_stops_when_the_answer_is_complete(lm):
    model, tok = lm

    class StopsAtThree(type(get_task("passkey"))):
        def is_complete(self, sample, output):
            return len(output) >= 3

    task = StopsAtThree()
    sample = task.generate(PromptFormat(tok), 300, 0.5, 0, 0)
    with torch.inference_mode():
        outcome = _answer(model, tok, task, sample, _SharedPrefix(False), Timer("cpu"), None, set())
    assert outcome.new_tokens == 3 and len(outcome.output) == 3
    assert outcome.decode_tok_s is not None and outcome.decode_tok_s > 0


def test_perplexity_matches_a_direct_forward(tmp_path, lm):
    model, tok = lm
    config = _config(tmp_path, tasks=["perplexity:last=50"], lengths=[400], samples=1)
    run_bench(config, model=model, tokenizer=tok)
    with ResultStore(config.db) as store:
        (cell,) = store.cells()
    ids = torch.tensor([tok(cell.prompt, add_special_tokens=False)["input_ids"]])
    assert ids.shape[1] == 400
    with torch.no_grad():
        logits = model(ids).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[-51:-1], ids[0, -50:]).item()
    assert cell.score == pytest.approx(math.exp(nll), rel=1e-4)
    assert cell.metric == "perplexity" and cell.depth is None and cell.new_tokens == 0


@pytest.mark.parametrize("chunk", [None, 64])
def test_dynamic_ntk_perplexity_is_one_forward_over_the_input(tmp_path, lm, chunk):
    """Prefix (chunked or not) and scored part are one input: one RoPE scale, as one forward."""
    import longreach as lr

    model, tok = lm  # trained length 256: dynamic NTK rescales at 400 tokens
    spec = "dynamic-ntk:factor=4"
    config = _config(
        tmp_path, methods=[spec], tasks=["perplexity:last=50"], lengths=[400], samples=1,
        chunk=chunk,
    )  # fmt: skip
    run_bench(config, model=model, tokenizer=tok)
    with ResultStore(config.db) as store:
        (cell,) = store.cells()
    ids = torch.tensor([tok(cell.prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad(), lr.extend(model, spec):
        logits = model(ids).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[-51:-1], ids[0, -50:]).item()
    assert cell.meta["nll"] == pytest.approx(nll, abs=1e-6), (
        f"stored nll {cell.meta['nll']:.7f}, one forward gives {nll:.7f}"
    )


def test_chunked_prefill_equals_one_pass(lm):
    from longreach.prefill import score

    model, _ = lm
    ids = list(range(3, 203))
    with torch.inference_mode():
        one = _prefill(model, ids, None, 0, None)
        chunked = _prefill(model, ids, None, 0, 64)
        head = _prefill(model, ids[:195], None, 0, 64)
        tail = score(model, head, torch.tensor([ids[195:]]))
        full = model(torch.tensor([ids])).logits[0].float()
    assert torch.allclose(one.logits[0], chunked.logits[0], atol=1e-4)
    assert one.cache.get_seq_length() == chunked.cache.get_seq_length() == 200
    assert tail.shape == (1, 5, full.shape[-1])
    assert torch.allclose(tail[0], full[-5:], atol=1e-4), "score gives every position's logits"
    assert head.length == 200 and torch.equal(head.logits[0], tail[0, -1])


def test_fingerprint_changes_with_weights_and_dtype(lm):
    model, tok = lm
    base = model_fingerprint(model, tok)
    assert base == model_fingerprint(tiny_lm(), tok)
    assert base != model_fingerprint(tiny_lm(seed=1), tok)
    assert base != model_fingerprint(tiny_lm().to(torch.bfloat16), tok)


def test_eos_ids_merge_model_and_tokenizer(lm):
    model, tok = lm
    assert _eos_ids(model, tok) == {258}


def test_peak_memory_sees_a_big_allocation():
    memory = PeakMemory("cpu")
    if memory.kind != "rss_peak":
        pytest.skip(f"peak RSS cannot be reset here ({memory.kind}); Linux /proc needed")
    memory.reset()
    before = memory.peak()
    block = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
    block += 1
    after = memory.peak()
    del block
    memory.reset()
    assert after - before >= 200 * 2**20, f"peak grew by {(after - before) / 2**20:.0f} MiB"
    assert memory.peak() < after, "the reset did not lower the peak after the block was freed"


def test_unknown_method_and_task_fail_before_loading(tmp_path):
    with pytest.raises(LongreachError, match="unknown task 'nope'"):
        run_bench(_config(tmp_path, tasks=["nope"], model="/does/not/matter"))
    with pytest.raises(LongreachError, match="method"):
        run_bench(_config(tmp_path, methods=["no-such-method"], model="/does/not/matter"))
    assert not (tmp_path / "runs.db").exists()


def test_too_short_length_fails_before_any_cell(tmp_path, lm):
    model, tok = lm
    with pytest.raises(LongreachError, match="length 100 is too short for task 'passkey"):
        run_bench(_config(tmp_path, lengths=[100, 300]), model=model, tokenizer=tok)
    with ResultStore(tmp_path / "runs.db") as store:
        assert store.count() == 0


def test_load_by_path(tmp_path, tiny_dir):  # noqa: F811
    result = run_bench(_config(tmp_path, model=str(tiny_dir), samples=1, lengths=[300]))
    assert result.computed == 2 and result.model == str(tiny_dir)


def test_method_specs_are_canonical():
    from longreach.bench.plan import canonical_method

    assert canonical_method("vanilla") == "vanilla"
    assert canonical_method("yarn:factor=4.0") == "yarn:factor=4"
    assert canonical_method("yarn:factor=8,beta=32") == "yarn:beta=32,factor=8"
    with pytest.raises(LongreachError, match="factor"):
        canonical_method("yarn:factor=0.5")


@pytest.mark.parametrize(
    "method",
    [
        "vanilla",
        "yarn:factor=4",
        "self-extend:group=4,window=64",
        "lm-infinite:window=128",
        "streaming:window=128",
        "dynamic-ntk:factor=4",
    ],
)
def test_prefix_reuse_is_exact_for_methods_that_share(method, lm):
    """A cropped cache continued with new tokens gives the logits of a fresh prefill."""
    from longreach import compat
    from longreach.bench.runner import _method_shares_prefix, apply_method

    model, _ = lm
    g = torch.Generator().manual_seed(0)
    first = torch.randint(3, 250, (700,), generator=g).tolist()
    second = first[:450] + torch.randint(3, 250, (250,), generator=g).tolist()
    if not _method_shares_prefix(method):
        assert method.split(":")[0] in ("streaming", "dynamic-ntk")
        return
    with apply_method(model, method), torch.inference_mode():
        fresh = _prefill(model, second, None, 0, None).logits
        cache = _prefill(model, first, None, 0, None).cache
        compat.crop_cache(cache, 450)
        reused = _prefill(model, second[450:], cache, 450, None).logits
    assert torch.allclose(reused[0], fresh[0], atol=1e-5), method


def test_out_of_memory_becomes_one_sentence():
    from longreach.bench.runner import _oom_as_error

    with pytest.raises(
        LongreachError, match="yarn at 32768 tokens ran out of memory; finished cells"
    ):
        with _oom_as_error("yarn", 32768):
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory"
            )
    with pytest.raises(ValueError, match="unrelated"):
        with _oom_as_error("yarn", 32768):
            raise ValueError("unrelated")


def test_methods_declare_whether_they_share_prefixes():
    from longreach.bench.runner import _method_shares_prefix

    assert _method_shares_prefix("vanilla") is True
    assert _method_shares_prefix("yarn:factor=4") is True
    assert _method_shares_prefix("dynamic-ntk:factor=4") is False, "its base follows the length"
    assert _method_shares_prefix("streaming") is False, "it changes the KV cache"
    assert _method_shares_prefix("infllm") is False, "it changes the KV cache"
