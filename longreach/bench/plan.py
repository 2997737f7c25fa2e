"""What a bench run computes, before anything runs: the model's identity and the grid of cells.

A cell is identified by its key (model fingerprint, method, task, prompt format, length,
depth, seed, sample index); every executor (the in-process runner, Ray workers, an
endpoint client) computes the same :class:`PlannedCell` list from the same config and
turns each into a stored :class:`~longreach.bench.store.Cell` with :meth:`PlannedCell.cell`.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from typing import Any

from longreach.bench.grid import BenchConfig, format_length
from longreach.bench.store import Cell, cell_key
from longreach.tasks import RAW, FileTask, Sample, Task, get_task

# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelFacts:
    """What planning needs from the model: its name, its identity and its trained length."""

    name: str
    fingerprint: str
    trained_length: int | None


def model_fingerprint(model: Any, tokenizer: Any) -> str:
    """16 hex digits that change when the config, the weights, the tokenizer or the dtype change.

    The weights enter through a fixed sample of each tensor (first, last and 256 strided
    values), cheap even for large models.
    """
    import torch

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


def model_trained_length(model: Any) -> int | None:
    from longreach.models.info import trained_length

    try:
        return trained_length(model)
    except ValueError:
        return None


def model_facts(model: Any, tokenizer: Any, source: str) -> ModelFacts:
    """The facts of a loaded model; ``source`` names it when the loader recorded no source."""
    name = str(getattr(model, "longreach_source", None) or source)
    return ModelFacts(name, model_fingerprint(model, tokenizer), model_trained_length(model))


def library_versions() -> dict[str, str]:
    import tokenizers
    import torch
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


# --------------------------------------------------------------------------- the grid


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
    questions: int | None = None  # questions per shared context (None: a cell of its own)
    question: int | None = None  # this cell's question of that context

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
            self.questions,
            self.question,
        )

    def describe(self) -> str:
        depth = "" if self.depth is None else f" · depth {self.depth:g}"
        asked = "" if self.questions is None else f" · question {self.question}"
        return (
            f"{self.method} · {self.task.name} · {format_length(self.length)}{depth} · "
            f"#{self.idx}{asked}"
        )

    def cell(self, facts: ModelFacts, sample: Sample | None, **measured: Any) -> Cell:
        """The stored row of this cell: its identity, its sample and what was ``measured``.

        Without a ``sample`` (a cell that failed before one existed) the prompt is empty;
        ``measured`` may override any field (an endpoint counts the server's tokens).
        """
        fields: dict[str, Any] = {
            "model": facts.name,
            "model_fingerprint": self.fingerprint,
            "method": self.method,
            "task": self.task_spec,
            "prompt_format": self.prompt_format,
            "length": self.length,
            "depth": self.depth,
            "seed": self.seed,
            "idx": self.idx,
            "trained_length": facts.trained_length,
            "metric": self.task.metric,
            "expected": [],
            "prompt": "",
            "context_tokens": 0,
            "context_questions": self.questions,
            "question": self.question,
        }
        if sample is not None:
            fields.update(
                metric=sample.metric,
                expected=sample.expected,
                prompt=sample.prompt,
                context_tokens=sample.n_tokens,
                context_chars=sample.meta.get("context_chars"),
                context_words=sample.meta.get("context_words"),
            )
        fields.update(measured)
        return Cell(**fields)


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
    """Every cell of the grid, in run order: method, task, length, sample index, depth (and
    with ``questions_per_context`` > 1, the questions of each context)."""
    fmt = "chat" if config.chat else RAW
    asked: list[int | None] = [None]
    questions = config.questions_per_context if config.questions_per_context > 1 else None
    if questions is not None:
        from longreach.bench.context_cells import check_grid

        check_grid(methods, tasks, questions)
        asked = list(range(questions))
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
                        cells += [
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
                                questions,
                                question,
                            )  # fmt: skip
                            for question in asked
                        ]
    return cells
