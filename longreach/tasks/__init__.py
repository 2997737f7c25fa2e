"""Synthetic long-context tasks, haystack sources and scorers.

``get_task("multi-needle:k=4")`` parses a task spec into a task object; ``TASKS`` maps each
name to its class, which the CLI and the report both read. ``FileTask.load(path)`` reads a
local LongBench or RULER jsonl file.
"""

from __future__ import annotations

from longreach.errors import LongreachError
from longreach.tasks.ada_leval import BestAnswer, TSort
from longreach.tasks.base import CHAT, RAW, PromptFormat, Sample, Task, parse_params
from longreach.tasks.haystack import resolve_haystack
from longreach.tasks.json_kv import KvRetrieval, MultiThreading, Threading
from longreach.tasks.lines import LongChatLines
from longreach.tasks.long_icl import LongIcl
from longreach.tasks.niah import MultiNeedle, Niah
from longreach.tasks.passkey import Passkey
from longreach.tasks.perplexity import Perplexity
from longreach.tasks.ruler import RULER_NAMES, RULER_TASKS
from longreach.tasks.task_file import FileTask
from longreach.tasks.variable_tracking import VariableTracking

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (
        Passkey,
        Niah,
        MultiNeedle,
        Threading,
        MultiThreading,
        KvRetrieval,
        VariableTracking,
        Perplexity,
        LongChatLines,
        TSort,
        BestAnswer,
        LongIcl,
        *RULER_TASKS,
    )
}


def get_task(spec: str, haystack: str | None = None) -> Task:
    """Parse ``name`` or ``name:param=value,...``; ``haystack`` is the default for tasks that take one."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in TASKS:
        raise LongreachError(
            f"unknown task {name!r}; choose from {', '.join(TASKS)} (or --task-file FILE.jsonl)."
        )
    cls = TASKS[name]
    params = parse_params(rest, f"task {spec!r}")
    if haystack is not None and cls.uses_haystack and "haystack" not in params:
        params["haystack"] = haystack
    task = cls.from_params(params)
    if cls.uses_haystack:
        resolve_haystack(task.haystack)  # type: ignore[attr-defined]
    return task


__all__ = [
    "CHAT",
    "RULER_NAMES",
    "RAW",
    "TASKS",
    "FileTask",
    "PromptFormat",
    "Sample",
    "Task",
    "get_task",
]
