"""Checks of a whole grid before its first cell: every problem at once, in one line.

A bench run can take hours, so everything that can fail is tried first: the configuration
and every method and task spec (before the model loads), then every method against the model,
the prompt format, each task's shortest and longest sample (too-short lengths, haystacks that
cannot fill a length), and the memory each (method, task, length) needs. The memory estimate
comes from the model's config, not from running it:

- the KV cache: layers x KV heads x head dim x 2 (keys and values) x bytes, per token;
- activations of one forward pass over the tokens it reads at once (the whole input, or
  ``--chunk`` tokens): the hidden state and residual, queries/keys/values, and the MLP's
  gate, up and activated projections;
- generating the sample: the tokenized haystack kept as Python lists, about 600 bytes per
  token (measured: 6 GB at 10M tokens in the tokenizer alone).

A cell whose estimate exceeds the memory available now is refused with its estimate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from longreach.bench.grid import BenchConfig, format_length
from longreach.errors import LongreachError

log = logging.getLogger(__name__)

GENERATION_BYTES_PER_TOKEN = 600
GiB = 1024**3


def collect(problems: list[str], check: Callable[[], Any]) -> Any:
    """Run ``check``; a LongreachError is added to ``problems`` instead of raised."""
    try:
        return check()
    except LongreachError as exc:
        problems.append(str(exc).rstrip("."))
        return None


def raise_all(problems: list[str], where: str) -> None:
    """Raise one LongreachError that names every problem (in order, duplicates dropped)."""
    unique = list(dict.fromkeys(problems))
    if not unique:
        return
    if len(unique) == 1:
        raise LongreachError(unique[0] + ".")
    listed = "; ".join(f"({i}) {p}" for i, p in enumerate(unique, 1))
    raise LongreachError(f"{len(unique)} problems {where}, nothing was computed: {listed}.")


# --------------------------------------------------------------------------- before the model


def check_config(config: BenchConfig) -> tuple[list[str], list[Any]]:
    """The grid's canonical method specs and tasks; raises once for every bad input."""
    from longreach.bench.plan import canonical_method, load_tasks
    from longreach.bench.store import stored_keys

    problems = list(config.problems())
    specs = [collect(problems, lambda m=m: canonical_method(m)) for m in config.methods]
    tasks = []
    for spec in config.tasks:
        tasks.append(collect(problems, lambda s=spec: load_tasks(_only(config, tasks=[s]))))
    for path in config.task_files:
        tasks.append(collect(problems, lambda p=path: load_tasks(_only(config, task_files=[p]))))
    collect(problems, lambda: stored_keys(config.db))
    raise_all(problems, "in this bench")
    methods = unique_methods([s for s in specs if s is not None])
    unique: dict[str, Any] = {}
    for found in tasks:
        for task in found or []:
            unique.setdefault(task.spec(), task)
    return methods, list(unique.values())


def _only(config: BenchConfig, tasks: list[str] | None = None, task_files: list[str] | None = None):
    import dataclasses

    return dataclasses.replace(config, tasks=tasks or [], task_files=task_files or [])


def unique_methods(specs: list[str]) -> list[str]:
    """Canonical specs with those that build the same method dropped (the first spelling stays).

    ``yarn`` and ``yarn:factor=4`` (4 is the default) compute the same thing, so they are one
    grid row; they keep distinct store keys across runs (see docs/methods.md).
    """
    from longreach.methods import build_method

    kept: list[tuple[str, Any]] = []
    for spec in dict.fromkeys(specs):
        built = build_method(spec)
        if not any(built == other for _, other in kept):
            kept.append((spec, built))
    return [spec for spec, _ in kept]


# --------------------------------------------------------------------------- with the model


def fit_tasks(tasks: list[Any], trained: int | None) -> list[Any]:
    """Each task with its model-dependent defaults filled in, duplicates dropped."""
    unique: dict[str, Any] = {}
    for task in tasks:
        fitted = task.for_model(trained)
        unique.setdefault(fitted.spec(), fitted)
    return list(unique.values())


@dataclass(frozen=True)
class MemoryEstimate:
    kv_bytes: int
    activation_bytes: int
    generation_bytes: int

    @property
    def total(self) -> int:
        return self.kv_bytes + self.activation_bytes + self.generation_bytes

    def describe(self) -> str:
        return (
            f"about {_gib(self.total)} (KV cache {_gib(self.kv_bytes)}, activations "
            f"{_gib(self.activation_bytes)}, sample generation {_gib(self.generation_bytes)})"
        )


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 1024**2:.0f} MiB"


def model_shape(config: Any) -> dict[str, int]:
    """Layers, heads, KV heads, head dim, hidden and MLP sizes from a transformers config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    return {
        "layers": int(text.num_hidden_layers),
        "heads": heads,
        "kv_heads": int(getattr(text, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(text, "head_dim", None) or hidden // heads),
        "hidden": hidden,
        "intermediate": int(getattr(text, "intermediate_size", None) or 4 * hidden),
    }


def estimate_memory(
    shape: dict[str, int],
    tokens: int,
    dtype_bytes: int,
    chunk: int | None,
    resident: int | None = None,
) -> MemoryEstimate:
    """What one cell of ``tokens`` tokens needs on top of the loaded weights (module docstring).

    ``resident``: the most tokens whose keys and values the method holds at once (its own
    bound, ``Method.resident_tokens``; default all of them).
    """
    kv_tokens = tokens if resident is None else min(tokens, resident)
    kv_per_token = shape["layers"] * shape["kv_heads"] * shape["head_dim"] * 2 * dtype_bytes
    at_once = min(kv_tokens, chunk) if chunk else kv_tokens
    qkv = (shape["heads"] + 2 * shape["kv_heads"]) * shape["head_dim"]
    per_token = (4 * shape["hidden"] + qkv + 3 * shape["intermediate"]) * dtype_bytes
    return MemoryEstimate(
        kv_bytes=kv_tokens * kv_per_token,
        activation_bytes=at_once * per_token,
        generation_bytes=tokens * GENERATION_BYTES_PER_TOKEN,
    )


def available_memory(device: Any) -> int | None:
    """Bytes that can still be allocated on ``device`` now (None when unknown)."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_cells(model: Any, tokenizer: Any, config: BenchConfig, cells: list[Any]) -> Any:
    """Check every cell still to compute against the loaded model; return the PromptFormat.

    Raises one LongreachError that lists every problem: methods that cannot apply to the
    model, ``--chat`` without a template, cells that cannot fit in memory, and lengths a
    task cannot fill (each task's shortest and longest sample is generated here).
    """
    from longreach.methods import build_method
    from longreach.tasks import PromptFormat

    problems: list[str] = []
    for method in dict.fromkeys(c.method for c in cells):
        collect(problems, lambda m=method: build_method(m).check_model(model))
    fmt = collect(problems, lambda: PromptFormat(tokenizer, chat=config.chat))
    too_big = _check_memory(model, config, cells, problems)
    probe = fmt or PromptFormat(tokenizer, chat=False)  # still find the tasks' own problems
    for (_, length), cell in _extremes(cells).items():
        if length not in too_big:
            collect(problems, lambda c=cell: _generate(probe, c))
    raise_all(problems, "with this model")
    return fmt


def _generate(fmt: Any, cell: Any) -> Any:
    """The cell's sample (for a question of a shared context: its context's question set)."""
    if cell.questions is not None:
        from longreach.tasks.questions import question_set

        return question_set(
            cell.task, fmt, cell.length, cell.depth, cell.seed, cell.idx, cell.questions
        )
    return cell.task.generate(fmt, cell.length, cell.depth, cell.seed, cell.idx)


def check_samples(fmt: Any, cells: list[Any]) -> None:
    """Generate each task's shortest and longest sample (no model needed: an endpoint's grid)."""
    problems: list[str] = []
    for cell in _extremes(cells).values():
        collect(problems, lambda c=cell: c.task.generate(fmt, c.length, c.depth, c.seed, c.idx))
    raise_all(problems, "for this tokenizer")


def _extremes(cells: list[Any]) -> dict[tuple[str, int], Any]:
    """For each task, one cell at its shortest and one at its longest length."""
    lengths: dict[str, list[int]] = {}
    for cell in cells:
        lengths.setdefault(cell.task_spec, []).append(cell.length)
    out: dict[tuple[str, int], Any] = {}
    for cell in cells:
        for length in (min(lengths[cell.task_spec]), max(lengths[cell.task_spec])):
            if cell.length == length:
                out.setdefault((cell.task_spec, length), cell)
    return out


def _check_memory(model: Any, config: BenchConfig, cells: list[Any], problems: list[str]) -> set:
    """Add a problem for each length whose estimate exceeds what is available; return them."""
    try:
        shape = model_shape(model.config)
    except (AttributeError, TypeError, ValueError):
        log.info("no memory estimate: the model config lacks the usual size fields")
        return set()
    device = getattr(model, "device", "cpu")
    free = available_memory(device)
    if free is None:
        return set()
    from longreach.methods import build_method

    dtype_bytes = next(model.parameters()).element_size()
    too_big = set()
    for length in sorted({c.length for c in cells}):
        for method in dict.fromkeys(c.method for c in cells if c.length == length):
            try:
                resident = build_method(method).resident_tokens(model, length, config.chunk)
            except LongreachError:
                resident = None  # the method's own check reports it
            need = estimate_memory(shape, length, dtype_bytes, config.chunk, resident)
            if need.total > free:
                too_big.add(length)
                hint = "" if config.chunk else " or --chunk"
                problems.append(
                    f"a cell of {format_length(length)} tokens with {method} needs "
                    f"{need.describe()} but {_gib(free)} is available on {device}: use shorter "
                    f"--lengths{hint}"
                )
    return too_big
