"""The bench runner: grid -> samples -> greedy answers -> scored, costed cells in SQLite.

For each method (applied with ``longreach.extend``), task, length, sample index and depth the
runner generates the sample with the model's own tokenizer, prefills it, decodes greedily
until the task says the answer is complete (or EOS, or the task's token limit), scores it and
stores the cell with its cost: prefill seconds, decode tokens per second, peak memory.

Work shared between samples is done once: consecutive samples whose token ids share a long
prefix (the samples of one index at several depths share the haystack before the shallowest
needle) reuse the KV cache of that prefix, cropped with ``Cache.crop``. A cell that reused a
prefix records how many tokens it reused; the report's cost plots use only cells that
reused none. Methods whose cache is a policy, or whose positions depend on the whole input
length (dynamic NTK), never share.

Library code: it reports progress through a callback and never prints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longreach import compat
from longreach.bench.cost import PeakMemory, Timer
from longreach.bench.grid import BenchConfig, format_length
from longreach.bench.store import Cell, ResultStore, cell_key, stored_keys
from longreach.errors import LongreachError
from longreach.prefill import planned_length
from longreach.tasks import RAW, FileTask, PromptFormat, Sample, Task, get_task

log = logging.getLogger(__name__)

# Methods whose output for a prompt depends on more than the prompt's prefix so far.
# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class PlannedCell:
    method: str
    task: Task
    task_spec: str
    prompt_format: str
    length: int
    depth: float | None
    seed: int
    idx: int
    fingerprint: str  # the model's

    @property
    def key(self) -> str:
        """The store key: what identifies this cell's result across runs."""
        return cell_key(
            self.fingerprint,
            self.method,
            self.task_spec,
            self.prompt_format,
            self.length,
            self.depth,
            self.seed,
            self.idx,
        )

    def describe(self) -> str:
        depth = "" if self.depth is None else f" · depth {self.depth:g}"
        return (
            f"{self.method} · {self.task.name} · {format_length(self.length)}{depth} · #{self.idx}"
        )


def canonical_method(spec: str) -> str:
    """A method spec in canonical form: validated, parameters sorted, naming every parameter
    that differs from its default or that the user wrote (``yarn:factor=4`` stays that even
    when 4 is the default, so the key does not change meaning if the default does)."""
    from longreach.methods import build_method, parse_spec

    built = build_method(spec)
    _, given = parse_spec(spec)
    name, _, rest = built.to_spec().partition(":")
    params = dict(item.split("=", 1) for item in rest.split(",") if item)
    for key in given:
        if key not in params:
            value = getattr(built, key)
            params[key] = (
                str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
            )
    return name + (":" + ",".join(f"{k}={params[k]}" for k in sorted(params)) if params else "")


def load_tasks(config: BenchConfig) -> list[Task]:
    tasks: list[Task] = [get_task(spec, config.haystack) for spec in config.tasks]
    tasks += [FileTask.load(path) for path in config.task_files]
    unique: dict[str, Task] = {}
    for task in tasks:
        unique.setdefault(task.spec(), task)
    return list(unique.values())


def build_plan(
    config: BenchConfig, methods: list[str], tasks: list[Task], fingerprint: str
) -> list[PlannedCell]:
    """Every cell of the grid, in run order: method, task, length, sample index, depth."""
    fmt = "chat" if config.chat else RAW
    cells = []
    for method in methods:
        for task in tasks:
            spec = task.spec()
            prompt_format = fmt if task.metric != "perplexity" else RAW
            depths: list[float | None] = list(config.depths) if task.uses_depth else [None]
            samples = config.samples
            if isinstance(task, FileTask):
                samples = min(samples, len(task.rows))
            for length in config.lengths:
                for idx in range(samples):
                    for depth in depths:
                        cells.append(
                            PlannedCell(
                                method,
                                task,
                                spec,
                                prompt_format,
                                length,
                                depth,
                                config.seed,
                                idx,
                                fingerprint,
                            )
                        )
    return cells


# --------------------------------------------------------------------------- model facts


def model_fingerprint(model: torch.nn.Module, tokenizer: Any) -> str:
    """16 hex digits that change when the config, the weights, the tokenizer or the dtype change.

    The weights enter through a fixed sample of each tensor (first, last and 256 strided
    values), cheap even for large models.
    """
    digest = hashlib.sha256()
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        config.pop(volatile, None)
    config = {k: v for k, v in config.items() if not k.startswith("_attn_implementation")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 256)
            sample = torch.cat([flat[:64], flat[-64:], flat[::step][:256]]).float().cpu()
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(sample.numpy().tobytes())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = (
        backend.to_str()
        if backend is not None
        else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    )
    digest.update(vocab.encode())
    digest.update(str(getattr(tokenizer, "chat_template", "")).encode())
    digest.update(str(next(model.parameters()).dtype).encode())
    return digest.hexdigest()[:16]


def model_trained_length(model: torch.nn.Module) -> int | None:
    from longreach.models.info import trained_length

    try:
        return trained_length(model)
    except ValueError:
        return None


def library_versions() -> dict[str, str]:
    import tokenizers
    import transformers

    import longreach

    return {
        "longreach": longreach.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


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


def _forward(
    model: torch.nn.Module, ids: list[int], cache: Any, past: int, keep: int
) -> tuple[torch.Tensor, Any]:
    device = model.device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    kwargs = compat.forward_kwargs(model, cache, past, len(ids), device)
    if compat.takes_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    out = model(input_ids=x, use_cache=True, **kwargs)
    return out.logits, compat.output_cache(out)


def _library_prefill() -> Callable[..., Any] | None:
    """``longreach.prefill.prefill`` (chunked prefill) when this build has it."""
    try:
        from longreach.prefill import prefill
    except ImportError:
        return None
    return prefill


def _prefill(
    model: torch.nn.Module, ids: list[int], cache: Any, past: int, chunk: int | None, keep: int = 1
) -> tuple[torch.Tensor, Any]:
    """Run ``ids`` through the model after ``past`` cached tokens; logits of the last ``keep``.

    With ``chunk``, the input goes through in chunks of that many tokens (activation memory
    bounded by the chunk) using ``longreach.prefill`` when it is available; the logits
    requested come from the last chunk.
    """
    if not chunk or len(ids) <= chunk:
        return _forward(model, ids, cache, past, keep)
    library = _library_prefill()
    if library is not None and cache is None and past == 0 and keep == 1:
        state = library(model, torch.tensor([ids], device=model.device), chunk=chunk)
        return state.logits[:, None, :], state.cache
    # The same loop, for a cache that already holds a shared prefix or several kept logits.
    tail = max(keep, 1)
    body, rest = ids[: len(ids) - tail], ids[len(ids) - tail :]
    with planned_length(past + len(ids)):  # length-dependent methods: one input, not chunks
        for start in range(0, len(body), chunk):
            part = body[start : start + chunk]
            _, cache = _forward(model, part, cache, past + start, 1)
        return _forward(model, rest, cache, past + len(body), keep)


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
    score: float
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
    logits, cache = _prefill(model, ids[shared:], cache, shared, chunk)
    prefill_s = timer.now() - t0
    generated = [int(logits[0, -1].argmax())]
    text = tokenizer.decode(generated, skip_special_tokens=True)
    steps = 0
    t1 = timer.now()
    while (
        len(generated) < sample.max_new_tokens
        and generated[-1] not in eos
        and not task.is_complete(sample, text)
    ):
        logits, cache = _forward(model, [generated[-1]], cache, len(ids) + len(generated) - 1, 1)
        generated.append(int(logits[0, -1].argmax()))
        steps += 1
        text = tokenizer.decode(generated, skip_special_tokens=True)
    decode_s = timer.now() - t1
    shared_prefix.keep(ids, cache)
    return _Outcome(
        output=text,
        score=float(task.score(sample, text)),
        new_tokens=len(generated),
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
    cache = None
    with planned_length(len(ids)):  # prefix and scored part are one input
        if split > 0:
            _, cache = _prefill(model, ids[:split], None, 0, chunk)
        logits, _ = _prefill(model, ids[split:], cache, split, None, keep=0)
    prefill_s = timer.now() - t0
    targets = torch.tensor(ids[split + 1 :], device=logits.device)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), targets).item()
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
    """``longreach.extend(model, method)`` as a context manager; vanilla changes nothing."""
    if method == "vanilla":
        return nullcontext()
    from longreach.extend import extend

    return extend(model, method)


# --------------------------------------------------------------------------- the run


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
        name = str(getattr(model, "longreach_source", None) or config.model)
        fingerprint = model_fingerprint(model, tokenizer)
        trained = model_trained_length(model)
        tasks = preflight.fit_tasks(tasks, trained)
        plan = build_plan(config, methods, tasks, fingerprint)
        done = stored_keys(config.db)
        todo = [c for c in plan if c.key not in done]
        skipped = len(plan) - len(todo)
        emit = progress or (lambda event: None)
        emit(ProgressEvent("plan", len(plan), skipped, skipped))
        run_id = None  # a rerun with nothing to compute writes nothing
        fmt = preflight.check_cells(model, tokenizer, config, todo) if todo else None
        if todo:
            store = ResultStore(config.db)
            run_id = store.start_run(
                name, fingerprint, dict(config.to_dict(), methods=methods), library_versions()
            )
        computed = 0
        for method, cells in _by_method(todo):
            with apply_method(model, method), torch.inference_mode():
                computed += _run_method(
                    model, tokenizer, fmt, method, cells, config, store, run_id, name,
                    fingerprint, trained, emit, len(plan), skipped + computed, skipped,
                )  # fmt: skip
        return BenchResult(
            db=Path(config.db),
            run_id=run_id,
            model=name,
            model_fingerprint=fingerprint,
            trained_length=trained,
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


def _run_method(
    model: torch.nn.Module,
    tokenizer: Any,
    fmt: PromptFormat | None,
    method: str,
    cells: list[PlannedCell],
    config: BenchConfig,
    store: ResultStore,
    run_id: int | None,
    name: str,
    fingerprint: str,
    trained: int | None,
    emit: ProgressFn,
    total: int,
    done: int,
    skipped: int,
) -> int:
    assert fmt is not None
    device = model.device
    memory, timer = PeakMemory(device), Timer(device)
    shared_prefix = _SharedPrefix(config.share_prefix and _method_shares_prefix(method))
    eos = _eos_ids(model, tokenizer)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    computed = 0
    for planned in cells:
        emit(ProgressEvent("start", total, done + computed, skipped, planned.describe()))
        sample = planned.task.generate(
            fmt, planned.length, planned.depth, planned.seed, planned.idx
        )
        memory.reset()
        try:
            with _oom_as_error(method, planned.length):
                if sample.metric == "perplexity":
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
        cell = Cell(
            model=name,
            model_fingerprint=fingerprint,
            method=method,
            task=planned.task_spec,
            prompt_format=planned.prompt_format,
            length=planned.length,
            depth=planned.depth,
            seed=planned.seed,
            idx=planned.idx,
            metric=sample.metric,
            score=outcome.score,
            expected=sample.expected,
            output=outcome.output,
            prompt=sample.prompt,
            context_tokens=sample.n_tokens,
            context_chars=sample.meta.get("context_chars"),
            trained_length=trained,
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
        store.add(cell, run_id)
        computed += 1
        emit(ProgressEvent("done", total, done + computed, skipped, planned.describe(), cell))
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
