"""``bench --questions-per-context N``: one context encoded once, then asked N questions.

For each (method, task, length, depth, sample index) the task's question set
(:mod:`longreach.tasks.questions`) gives one document and N questions about it. The document
is encoded once with :class:`longreach.Context` under the method; each question is then read
after the document's cache and answered greedily, and becomes a cell of its own (its key adds
the number of questions and its index). Costs are kept apart:

- ``context_encode_s``: the document's encoding, stored once, on question 0's cell (a rerun
  that recomputes only later questions encodes again but stores that cost nowhere);
- ``prefill_s``: reading this question after the document; ``decode_s`` / ``decode_tok_s``
  its answer; ``shared_prefix_tokens`` the document's tokens, so cost plots that use cells
  read from scratch leave these out;
- ``peak_mem_bytes``: the peak since the document's encoding began.

Library code: progress goes through the runner's callback.
"""

from __future__ import annotations

from itertools import groupby
from typing import Any

from longreach.bench.cost import PeakMemory, Timer
from longreach.bench.plan import PlannedCell
from longreach.errors import LongreachError

__all__ = ["check_grid", "run_question_cells"]


def check_grid(methods: list[str], tasks: list[Any], questions: int) -> None:
    """Refuse in one line a grid whose tasks or methods cannot share a context."""
    from longreach.methods import build_method
    from longreach.tasks.questions import check_questions

    check_questions(tasks, questions)
    for spec in methods:
        if build_method(spec).reader:
            raise LongreachError(
                f"{spec} reads the document anew for each question, so "
                "--questions-per-context does not apply to it; run it without the flag."
            )


def _context_of(cell: PlannedCell) -> tuple:
    return (cell.task_spec, cell.prompt_format, cell.length, cell.depth, cell.seed, cell.idx)


def run_question_cells(ctx: Any, method: str, cells: list[PlannedCell], done: int = 0) -> int:
    """Compute the question cells ``cells`` of ``method`` (applied by the caller) into
    ``ctx.sink``: each context once, then its questions. Returns the cells computed."""
    import torch

    from longreach.bench.runner import ProgressEvent, _oom_as_error
    from longreach.context import Context
    from longreach.tasks.questions import question_set

    model, tokenizer, config = ctx.model, ctx.tokenizer, ctx.config
    device = model.device
    memory, timer = PeakMemory(device), Timer(device)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    computed = 0
    for _, group in groupby(cells, key=_context_of):
        group = list(group)
        first = group[0]
        ctx.emit(ProgressEvent("start", ctx.total, done + computed, ctx.skipped, first.describe()))
        qs = question_set(
            first.task, ctx.fmt, first.length, first.depth, first.seed, first.idx, first.questions
        )
        memory.reset()
        with _oom_as_error(method, first.length), torch.inference_mode():
            t0 = timer.now()
            context = Context.encode(
                model, tokenizer, qs.document_ids, chunk=config.chunk or len(qs.document_ids)
            )
            encode_s = timer.now() - t0
            for planned in group:
                count = done + computed
                if planned is not first:
                    ctx.emit(
                        ProgressEvent("start", ctx.total, count, ctx.skipped, planned.describe())
                    )
                sample = qs.samples[planned.question]
                answer = context.answer_ids(
                    qs.question_ids[planned.question],
                    sample.max_new_tokens,
                    lambda text, s=sample, t=planned.task: t.is_complete(s, text),
                    clock=timer.now,
                )
                text = tokenizer.decode(answer.tokens, skip_special_tokens=True)
                steps = len(answer.tokens) - 1  # the first token comes from the question's logits
                cell = planned.cell(
                    ctx.facts,
                    sample,
                    score=float(planned.task.score(sample, text)),
                    output=text,
                    shared_prefix_tokens=len(qs.document_ids),
                    prefill_s=answer.question_s,
                    decode_s=answer.decode_s if steps else None,
                    new_tokens=len(answer.tokens),
                    decode_tok_s=steps / answer.decode_s if steps and answer.decode_s > 0 else None,
                    peak_mem_bytes=memory.peak(),
                    mem_kind=memory.kind,
                    device=str(device),
                    dtype=dtype,
                    meta={**sample.meta, "cache_reuse": context.reuse},
                    context_encode_s=encode_s if planned.question == 0 else None,
                )
                ctx.sink.add(cell, ctx.run_id)
                computed += 1
                ctx.emit(
                    ProgressEvent(
                        "done", ctx.total, count + 1, ctx.skipped, planned.describe(), cell
                    )
                )
    return computed
