"""The bench runner: planned cells -> samples -> greedy answers -> scored, costed cells.

``longreach.bench.plan`` decides what a run computes (the model's identity, the grid of
cells and their keys); this module computes it in-process. For each method (applied with ``longreach.extend``), task, length, sample index and depth the
runner generates the sample with the model's own tokenizer, prefills it, decodes greedily
until the task says the answer is complete (or EOS, or the task's token limit), scores it and
stores the cell with its cost: prefill seconds, decode tokens per second, peak memory.

Work shared between samples is done once: consecutive samples whose token ids share a long
prefix (the samples of one index at several depths share the haystack before the shallowest
needle) reuse the KV cache of that prefix, cropped with ``Cache.crop``. A cell that reused a
prefix records how many tokens it reused; the report's cost plots use only cells that
reused none. Methods whose cache is a policy, or whose positions depend on the whole input
length (dynamic NTK), never share.

Prefill and decoding are ``longreach.prefill``'s (``prefill``, ``greedy``, ``score``): the
bench measures exactly what a library user runs. What a method allows (sharing a prefix,
changing the cache) comes from the traits it declares, never from its name.

Library code: it reports progress through a callback and never prints.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from longreach import compat
from longreach.bench.cost import PeakMemory, Timer
from longreach.bench.grid import BenchConfig
from longreach.bench.plan import ModelFacts, PlannedCell, build_plan, library_versions, model_facts
from longreach.bench.store import Cell, ResultStore, stored_keys
from longreach.bench.summary import NOT_APPLICABLE
from longreach.errors import LongreachError
from longreach.prefill import Prefill, greedy, planned_length, prefill, score
from longreach.tasks import PromptFormat, Sample, Task

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- progress


@dataclass
class ProgressEvent:
    """``plan``: the grid is known; ``start``: a cell begins; ``done``: a cell is stored."""

    kind: str
    total: int
    done: int
    skipped: int
    description: str = ""
    cell: Cell | None = None


ProgressFn = Callable[[ProgressEvent], None]


@dataclass
class BenchResult:
    db: Path
    run_id: int | None  # None: every cell was already stored, no run was recorded
    model: str
    model_fingerprint: str
    trained_length: int | None
    total: int
    skipped: int
    computed: int
    seconds: float
    keys: frozenset[str] = frozenset()  # every cell of this run's grid


def result_cells(result: BenchResult) -> list[Cell]:
    """The stored cells of a run's grid (including those a previous run computed)."""
    with ResultStore(result.db, create=False) as store:
        return [c for c in store.iter_cells(include_prompt=False) if c.key in result.keys]


# --------------------------------------------------------------------------- decoding


def _prefill(
    model: torch.nn.Module, ids: list[int], cache: Any, past: int, chunk: int | None
) -> Prefill:
    """``ids`` through the model after the ``past`` tokens ``cache`` holds, ``chunk`` per forward."""
    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    return prefill(model, x, chunk or len(ids), cache=cache, past=past)


class _SharedPrefix:
    """The KV cache of the previous sample and its token ids, for prefix reuse."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.ids: list[int] = []
        self.cache: Any = None

    def take(self, ids: list[int]) -> tuple[Any, int]:
        """The cache cropped to the longest prefix it shares with ``ids`` (if worth it), and its length."""
        if not self.enabled or self.cache is None:
            return None, 0
        shared = 0
        limit = min(len(self.ids), len(ids) - 1)
        while shared < limit and self.ids[shared] == ids[shared]:
            shared += 1
        cache, self.cache = self.cache, None
        # Reuse only a substantial prefix: the instructions alone are not worth it, and a
        # cell that reuses nothing is what the cost plots measure.
        if shared < max(64, len(ids) // 4) or not hasattr(cache, "crop"):
            return None, 0
        try:
            compat.crop_cache(cache, shared)
        except Exception:  # noqa: BLE001 - a cache type that cannot crop: compute afresh
            return None, 0
        return cache, shared

    def keep(self, ids: list[int], cache: Any) -> None:
        if self.enabled:
            self.ids, self.cache = ids, cache

    def clear(self) -> None:
        self.ids, self.cache = [], None


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


@dataclass
class _Outcome:
    output: str
    score: float | None
    new_tokens: int
    prefill_s: float
    decode_s: float | None
    decode_tok_s: float | None
    shared: int
    extra: dict[str, Any]


def _answer(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    sample: Sample,
    shared_prefix: _SharedPrefix,
    timer: Timer,
    chunk: int | None,
    eos: set[int],
) -> _Outcome:
    ids = sample.input_ids
    cache, shared = shared_prefix.take(ids)
    t0 = timer.now()
    state = _prefill(model, ids[shared:], cache, shared, chunk)
    prefill_s = timer.now() - t0

    def complete(tokens: torch.Tensor) -> bool:
        return task.is_complete(sample, tokenizer.decode(tokens[0], skip_special_tokens=True))

    t1 = timer.now()
    new = greedy(model, state, sample.max_new_tokens, eos, stop=complete)[0].tolist()
    decode_s = timer.now() - t1
    steps = len(new) - 1  # forwards: the first token comes from the prefill's logits
    text = tokenizer.decode(new, skip_special_tokens=True)
    shared_prefix.keep(ids, state.cache)
    return _Outcome(
        output=text,
        score=float(task.score(sample, text)),
        new_tokens=len(new),
        prefill_s=prefill_s,
        decode_s=decode_s if steps else None,
        decode_tok_s=steps / decode_s if steps and decode_s > 0 else None,
        shared=shared,
        extra={},
    )


def _perplexity(
    model: torch.nn.Module, sample: Sample, timer: Timer, chunk: int | None
) -> _Outcome:
    """exp(mean NLL) of the last ``scored_tokens`` tokens given everything before them."""
    ids = sample.input_ids
    n = int(sample.meta["scored_tokens"])
    split = len(ids) - n - 1
    t0 = timer.now()
    with planned_length(len(ids)):  # prefix and scored part are one input
        if split > 0:
            state = _prefill(model, ids[:split], None, 0, chunk)
        else:
            split, state = 0, Prefill(None, torch.empty(0), 0)
        x = torch.tensor([ids[split:]], dtype=torch.long, device=model.device)
        logits = score(model, state, x)
    prefill_s = timer.now() - t0
    targets = torch.tensor(ids[split + 1 :], device=logits.device)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], targets).item()
    ppl = math.exp(min(nll, 700.0))
    return _Outcome(
        output=f"nll={nll:.4f}",
        score=ppl,
        new_tokens=0,
        prefill_s=prefill_s,
        decode_s=None,
        decode_tok_s=None,
        shared=0,
        extra={"nll": nll},
    )


def _read(
    reader: Any, model: torch.nn.Module, tokenizer: Any, fmt: PromptFormat, task: Task,
    sample: Sample, timer: Timer,
) -> _Outcome:  # fmt: skip
    """A reader's answer: it reads the sample's parts itself (its time is all ``prefill_s``).

    A perplexity sample has no question to answer: the cell is stored without a score and
    says why (``meta.status``).
    """
    if sample.metric == "perplexity" or sample.parts is None:
        return _Outcome("", None, 0, 0.0, None, None, 0, {"status": NOT_APPLICABLE,
                        "reason": "a reader answers a question; perplexity does not apply"})  # fmt: skip
    t0 = timer.now()
    reading = reader.answer(
        model, tokenizer, fmt, sample.parts, sample.max_new_tokens,
        lambda text: task.is_complete(sample, text),
    )  # fmt: skip
    seconds = timer.now() - t0
    return _Outcome(
        output=reading.text,
        score=float(task.score(sample, reading.text)),
        new_tokens=reading.new_tokens,
        prefill_s=seconds,
        decode_s=None,
        decode_tok_s=None,
        shared=0,
        extra={"reader": reading.meta},
    )


_OOM_WORDS = (
    "out of memory",
    "not enough memory",
    "can't allocate memory",
    "cannot allocate memory",
)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in _OOM_WORDS)


# --------------------------------------------------------------------------- methods


def _method_shares_prefix(method: str) -> bool:
    from longreach.methods import build_method
    from longreach.methods.base import CACHE

    built = build_method(method)
    return built.shares_prefix and CACHE not in built.touches


def apply_method(model: torch.nn.Module, method: str) -> AbstractContextManager[Any]:
    """``longreach.extend(model, method)`` as a context manager (vanilla installs nothing)."""
    from longreach.extend import extend

    return extend(model, method)


# --------------------------------------------------------------------------- the run


class CellSink(Protocol):
    """Where finished cells go: the result store, or an executor worker's collector."""

    def add(self, cell: Cell, run_id: int) -> Any: ...


@dataclass
class RunContext:
    """What every cell of a run shares: the model, how prompts are formatted, where cells go."""

    model: torch.nn.Module
    tokenizer: Any
    fmt: PromptFormat
    config: BenchConfig
    facts: ModelFacts
    sink: CellSink
    run_id: int | None = None
    emit: ProgressFn = lambda event: None  # noqa: E731 - a default that ignores progress
    total: int = 0  # cells in the grid, for progress
    skipped: int = 0  # of which already stored


def run_bench(
    config: BenchConfig,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    progress: ProgressFn | None = None,
    executor: Any = None,
) -> BenchResult:
    """Run every cell of ``config`` that the database does not hold yet; return the totals.

    ``model`` and ``tokenizer`` may be given (tests, notebooks); otherwise
    ``longreach.load(config.model)`` loads them. Bad input fails before the model loads.
    With an ``executor`` (``longreach.bench.executors.GridExecutor``, e.g. ``RayExecutor``)
    its workers load the model and compute the cells; this process still writes them.
    """
    if executor is not None:
        from longreach.bench.executors import run_bench_on

        return run_bench_on(executor, config, progress)
    from longreach.bench import preflight

    started = time.perf_counter()
    methods, tasks = preflight.check_config(config)  # every input problem at once
    store: ResultStore | None = None  # created only when there is a cell to store
    try:
        if model is None or tokenizer is None:
            from longreach.models import load

            model, tokenizer = load(config.model, dtype=config.dtype, device=config.device)
        facts = model_facts(model, tokenizer, config.model)
        tasks = preflight.fit_tasks(tasks, facts.trained_length)
        plan = build_plan(config, methods, tasks, facts.fingerprint)
        done = stored_keys(config.db)
        todo = [c for c in plan if c.key not in done]
        skipped = len(plan) - len(todo)
        emit = progress or (lambda event: None)
        emit(ProgressEvent("plan", len(plan), skipped, skipped))
        computed = 0
        run_id = None  # a rerun with nothing to compute writes nothing
        if todo:
            fmt = preflight.check_cells(model, tokenizer, config, todo)
            store = ResultStore(config.db)
            run_id = store.start_run(
                facts.name, facts.fingerprint, dict(config.to_dict(), methods=methods),
                library_versions(),
            )  # fmt: skip
            ctx = RunContext(
                model, tokenizer, fmt, config, facts, store, run_id, emit, len(plan), skipped
            )
            for method, cells in _by_method(todo):
                with apply_method(model, method), torch.inference_mode():
                    computed += run_cells(ctx, method, cells, done=skipped + computed)
        return BenchResult(
            db=Path(config.db),
            run_id=run_id,
            model=facts.name,
            model_fingerprint=facts.fingerprint,
            trained_length=facts.trained_length,
            total=len(plan),
            skipped=skipped,
            computed=computed,
            seconds=time.perf_counter() - started,
            keys=frozenset(c.key for c in plan),
        )
    finally:
        if store is not None:
            store.close()


def _by_method(cells: list[PlannedCell]) -> Iterator[tuple[str, list[PlannedCell]]]:
    order: dict[str, list[PlannedCell]] = {}
    for cell in cells:
        order.setdefault(cell.method, []).append(cell)
    yield from order.items()


def run_cells(ctx: RunContext, method: str, cells: list[PlannedCell], done: int = 0) -> int:
    """Compute ``cells`` (all of ``method``, which the caller has applied) into ``ctx.sink``.

    Consecutive cells share their common prefix when the method allows it. Returns the
    number of cells computed; an error stops at the failing cell (the earlier ones are in
    the sink). ``done`` is the progress count before the first cell.
    """
    if cells and cells[0].questions is not None:  # --questions-per-context: shared contexts
        from longreach.bench.context_cells import run_question_cells

        return run_question_cells(ctx, method, cells, done)
    model, tokenizer, config = ctx.model, ctx.tokenizer, ctx.config
    device = model.device
    memory, timer = PeakMemory(device), Timer(device)
    from longreach.methods import build_method

    reader = build_method(method)
    reader = reader if reader.reader else None
    shared_prefix = _SharedPrefix(
        config.share_prefix and reader is None and _method_shares_prefix(method)
    )
    eos = _eos_ids(model, tokenizer)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    computed = 0
    for planned in cells:
        count = done + computed
        ctx.emit(ProgressEvent("start", ctx.total, count, ctx.skipped, planned.describe()))
        sample = planned.task.generate(
            ctx.fmt, planned.length, planned.depth, planned.seed, planned.idx
        )
        memory.reset()
        try:
            with _oom_as_error(method, planned.length):
                if reader is not None:
                    outcome = _read(reader, model, tokenizer, ctx.fmt, planned.task, sample, timer)
                elif sample.metric == "perplexity":
                    shared_prefix.clear()
                    outcome = _perplexity(model, sample, timer, config.chunk)
                else:
                    outcome = _answer(
                        model, tokenizer, planned.task, sample, shared_prefix, timer,
                        config.chunk, eos,
                    )  # fmt: skip
        except BaseException:
            shared_prefix.clear()
            raise
        cell = planned.cell(
            ctx.facts,
            sample,
            score=outcome.score,
            output=outcome.output,
            shared_prefix_tokens=outcome.shared,
            prefill_s=outcome.prefill_s,
            decode_s=outcome.decode_s,
            new_tokens=outcome.new_tokens,
            decode_tok_s=outcome.decode_tok_s,
            peak_mem_bytes=memory.peak(),
            mem_kind=memory.kind,
            device=str(device),
            dtype=dtype,
            meta={**sample.meta, **outcome.extra},
        )
        ctx.sink.add(cell, ctx.run_id)
        computed += 1
        ctx.emit(ProgressEvent("done", ctx.total, count + 1, ctx.skipped, planned.describe(), cell))
    return computed


@contextmanager
def _oom_as_error(method: str, length: int) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        if _is_oom(exc):
            raise LongreachError(
                f"{method} at {length} tokens ran out of memory; finished cells are saved: use "
                "shorter --lengths, --chunk, or a method with bounded memory."
            ) from None
        raise
