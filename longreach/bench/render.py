"""Rich rendering for the ``bench``, ``report``, ``export`` and ``demo`` commands.

Only ``longreach/cli.py`` calls this module: the library itself never prints.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table

from longreach.bench.grid import BenchConfig, format_length
from longreach.bench.runner import BenchResult, ProgressEvent, result_cells, run_bench
from longreach.bench.summary import (
    DEFAULT_THRESHOLD,
    NOT_APPLICABLE,
    RULER_THRESHOLD,
    SuiteRow,
    check_threshold,
    ruler_suite,
    summarize,
    task_title,
)
from longreach.tasks.ruler import RULER_NAMES


def bench_with_progress(
    config: BenchConfig, console: Console, runner: Any = None, **kwargs: Any
) -> BenchResult:
    """Run ``runner`` (default ``run_bench``) under a progress bar: cells done / total, ETA."""
    with Progress(
        SpinnerColumn(),
        # The description gives way first on a narrow terminal; count and ETA never do.
        TextColumn(
            "[bold]{task.description}",
            justify="left",
            table_column=Column(ratio=1, min_width=10, no_wrap=True, overflow="ellipsis"),
        ),
        BarColumn(bar_width=16),
        MofNCompleteColumn(table_column=Column(no_wrap=True)),
        TextColumn("cells", table_column=Column(no_wrap=True)),
        TimeElapsedColumn(),
        TextColumn("ETA", table_column=Column(no_wrap=True)),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        expand=True,
    ) as progress:
        bar = progress.add_task(f"loading {config.model}", total=None)

        def on_event(event: ProgressEvent) -> None:
            if event.kind == "plan":
                note = f"{event.skipped} already in the database" if event.skipped else "starting"
                progress.reset(bar, total=event.total, completed=event.done, description=note)
            elif event.kind == "start":
                progress.update(bar, completed=event.done, description=event.description)
            elif event.kind == "done" and event.cell is not None:
                progress.update(bar, completed=event.done)
                cell = event.cell
                if cell.score is None and "error" in (cell.meta or {}):  # failed for good
                    progress.console.print(
                        f"  [dim]{event.description}[/] → [red]failed[/]: {cell.meta['error']}",
                        highlight=False,
                    )
                    return
                if cell.score is None:  # an endpoint's refusal or truncation
                    score = str(cell.meta.get("status", "no score")).replace("_", " ")
                elif cell.metric == "perplexity":
                    score = f"ppl {cell.score:.1f}"
                else:
                    score = f"{cell.score:.2f}"
                prefill = "" if cell.prefill_s is None else f", prefill {cell.prefill_s:.2f}s"
                progress.console.print(
                    f"  [dim]{event.description}[/] → {score}  "
                    f"[dim]({cell.context_tokens} tokens{prefill})[/]",
                    highlight=False,
                )

        return (runner or run_bench)(config, progress=on_event, **kwargs)


def _score_text(value: float, n: int, metric: str, threshold: float, show_n: bool = True) -> str:
    if metric == "perplexity":
        return f"{value:.1f}"
    color = "green" if value >= threshold else ("yellow" if value >= 0.5 else "red")
    return f"[{color}]{value:.0%}[/]" + (f" [dim]n={n}[/]" if show_n else "")


def summary_table(
    result: BenchResult,
    threshold: float = DEFAULT_THRESHOLD,
    ruler_threshold: float = RULER_THRESHOLD,
) -> Table:
    """Accuracy (or perplexity) per method × task × length for the cells of this run's grid.

    A method that ran two or more RULER tasks gets one more row: their average per length and
    the effective length by RULER's rule (``ruler_threshold``); the caption gives its wAvg.
    """
    check_threshold(ruler_threshold)
    cells = result_cells(result)
    rows = summarize(cells, threshold)
    suites = {s.series: s for s in ruler_suite(rows, ruler_threshold) if len(s.tasks) >= 2}
    lengths = sorted({c.length for c in cells})
    trained = result.trained_length
    title = f"{result.model} · trained length {trained if trained else '?'}"
    table = Table(title=title, title_justify="left")
    # On a narrow terminal the method column wraps (folding long specs) rather than cutting
    # them: two variants of one method must stay distinguishable. The numbers never wrap.
    table.add_column("method", overflow="fold", min_width=8, ratio=1)
    table.add_column("task", overflow="fold", min_width=10)
    for length in lengths:
        past = trained is not None and length > trained
        table.add_column(
            format_length(length) + (" *" if past else ""), justify="right", no_wrap=True
        )
    table.add_column(f"effective (≥{threshold:.0%})", justify="right", min_width=9)
    show_format = len({r.series.prompt_format for r in rows}) > 1
    # One sample count for the whole table goes in the caption, not in every cell.
    counts = {v[1] for r in rows if r.metric != "perplexity" for v in r.by_length.values()}
    show_n = len(counts) > 1
    for i, row in enumerate(rows):
        values = [
            _score_text(*row.by_length[n], row.metric, threshold, show_n)
            if n in row.by_length
            else ("n/a" if row.metric == NOT_APPLICABLE else "–")
            for n in lengths
        ]
        if row.metric in ("perplexity", NOT_APPLICABLE):
            effective = "-"  # an effective length is defined for accuracies only
        elif row.effective is None:
            effective = f"[red]< {format_length(min(row.by_length))}[/]"
        else:
            reached_end = row.effective == max(row.by_length)
            effective = ("≥ " if reached_end else "") + format_length(row.effective)
        name = task_title(row.task, cells)
        table.add_row(row.series.label(show_format), name, *values, effective)
        last_of_series = i == len(rows) - 1 or rows[i + 1].series != row.series
        if last_of_series and row.series in suites:
            table.add_row(*_suite_cells(suites[row.series], lengths, ruler_threshold, show_format))
    notes = []
    if len(counts) == 1:
        n = counts.pop()
        notes.append(f"accuracy over {n} sample{'' if n == 1 else 's'} per cell")
    if trained is not None and any(n > trained for n in lengths):
        notes.append("* past the model's trained length")
    if suites:
        wavg = ", ".join(
            f"{s.series.label(show_format)} {s.wavg_inc:.0%}/{s.wavg_dec:.0%}"
            for s in suites.values()
            if s.wavg_inc is not None and s.wavg_dec is not None
        )
        notes.append(
            f"RULER avg: the RULER tasks' mean; effective: longest length above "
            f"{ruler_threshold:.1%}" + (f"; wAvg inc/dec: {wavg}" if wavg else "")
        )
    if notes:
        table.caption = " · ".join(notes)
    return table


def _suite_cells(
    suite: SuiteRow, lengths: list[int], threshold: float, show_format: bool
) -> list[str]:
    values = [
        _score_text(suite.by_length[n], 0, "accuracy", threshold, show_n=False)
        if n in suite.by_length
        else "–"
        for n in lengths
    ]
    if not suite.by_length:
        effective = "–"
    elif suite.effective is None:
        effective = f"[red]< {format_length(min(suite.by_length))}[/]"
    else:
        reached_end = suite.effective == max(suite.by_length)
        effective = ("≥ " if reached_end else "") + format_length(suite.effective)
    name = f"[bold]RULER avg[/] ({len(suite.tasks)}/{len(RULER_NAMES)})"
    return [suite.series.label(show_format), name, *values, f"[bold]{effective}[/]"]


def plain_summary(
    result: BenchResult,
    threshold: float = DEFAULT_THRESHOLD,
    ruler_threshold: float = RULER_THRESHOLD,
) -> str:
    """The summary table as plain text (for notes and logs)."""
    console = Console(width=120, record=True, color_system=None, file=_Null())
    console.print(summary_table(result, threshold, ruler_threshold))
    return console.export_text()


class _Null:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        pass


def run_demo(console: Console, out: Any, model: str | None = None) -> None:
    """Load the demo model, run the demo grid with a progress bar, write the report, print both."""
    import time
    from pathlib import Path

    from longreach.bench.demo import DEMO_MODEL, demo_configs
    from longreach.bench.plan import model_trained_length
    from longreach.bench.report import write_report
    from longreach.models import load

    started = time.perf_counter()
    name = model or DEMO_MODEL
    out = Path(out)
    with console.status(f"loading {name} (the first time converts it once into the cache)"):
        lm, tokenizer = load(name)
    configs = demo_configs(out, name, model_trained_length(lm))
    config = configs[0]
    lengths = ", ".join(format_length(n) for n in config.lengths)
    console.print(
        f"[bold]longreach demo[/]: {name} · {', '.join(config.methods)} · "
        f"{', '.join(config.tasks)} · lengths {lengths} · {config.samples} samples"
    )
    for extra in configs[1:]:
        more = ", ".join(format_length(n) for n in extra.lengths)
        console.print(f"  and {', '.join(extra.methods)} · {', '.join(extra.tasks)} · {more}")
    result = None
    for each in configs:
        part = bench_with_progress(each, console, model=lm, tokenizer=tokenizer)
        result = part if result is None else merge_results(result, part)
    with console.status("writing the report"):
        report = write_report(config.db, out / "report")
    console.print(summary_table(result))
    console.print(
        f"report: [bold]{report.index}[/] · database: {config.db} · "
        f"{time.perf_counter() - started:.0f} s in all"
    )


def merge_results(a: BenchResult, b: BenchResult) -> BenchResult:
    """Two runs on one database as one result (the summary then covers both grids)."""
    import dataclasses

    return dataclasses.replace(
        a,
        run_id=a.run_id if a.run_id is not None else b.run_id,
        total=a.total + b.total,
        skipped=a.skipped + b.skipped,
        computed=a.computed + b.computed,
        seconds=a.seconds + b.seconds,
        keys=a.keys | b.keys,
    )


def set_threads(threads: int) -> None:
    """``--threads N``: torch's CPU threads (0 keeps its default).

    On a machine whose cores are shared, torch's default of one thread per core spin-waits
    for busy cores: measured here, a tiny model's prefill took 20x longer with 2 threads
    than with 1 while other jobs ran.
    """
    if threads < 0:
        from longreach.errors import LongreachError

        raise LongreachError(f"--threads {threads} must be 0 (torch's default) or more.")
    if threads:
        import torch

        torch.set_num_threads(threads)
