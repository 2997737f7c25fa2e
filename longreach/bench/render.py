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
from rich.table import Table

from longreach.bench.grid import BenchConfig, format_length
from longreach.bench.runner import BenchResult, ProgressEvent, result_cells, run_bench
from longreach.bench.summary import DEFAULT_THRESHOLD, summarize


def bench_with_progress(
    config: BenchConfig, console: Console, runner: Any = run_bench, **kwargs: Any
) -> BenchResult:
    """Run ``runner`` (default ``run_bench``) under a progress bar: cells done / total, ETA."""
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}", justify="left"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("cells"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
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

        return runner(config, progress=on_event, **kwargs)


def _score_text(value: float, n: int, metric: str, threshold: float) -> str:
    if metric == "perplexity":
        return f"{value:.1f}"
    color = "green" if value >= threshold else ("yellow" if value >= 0.5 else "red")
    return f"[{color}]{value:.0%}[/] [dim]n={n}[/]"


def summary_table(result: BenchResult, threshold: float = DEFAULT_THRESHOLD) -> Table:
    """Accuracy (or perplexity) per method × task × length for the cells of this run's grid."""
    cells = result_cells(result)
    rows = summarize(cells, threshold)
    lengths = sorted({c.length for c in cells})
    trained = result.trained_length
    title = f"{result.model} · trained length {trained if trained else '?'}"
    table = Table(title=title, title_justify="left")
    table.add_column("method")
    table.add_column("task")
    for length in lengths:
        past = trained is not None and length > trained
        table.add_column(format_length(length) + (" *" if past else ""), justify="right")
    table.add_column(f"effective (≥{threshold:.0%})", justify="right")
    show_format = len({r.series.prompt_format for r in rows}) > 1
    for row in rows:
        values = [
            _score_text(*row.by_length[n], row.metric, threshold) if n in row.by_length else "–"
            for n in lengths
        ]
        if row.metric == "perplexity":
            effective = "[dim]perplexity[/]"
        elif row.effective is None:
            effective = f"[red]< {format_length(min(row.by_length))}[/]"
        else:
            reached_end = row.effective == max(row.by_length)
            effective = ("≥ " if reached_end else "") + format_length(row.effective)
        name = (
            row.task.split(":")[0] if not row.task.startswith("file:") else row.task.split(":")[1]
        )
        table.add_row(row.series.label(show_format), name, *values, effective)
    if trained is not None and any(n > trained for n in lengths):
        table.caption = "* past the model's trained length"
    return table


def plain_summary(result: BenchResult, threshold: float = DEFAULT_THRESHOLD) -> str:
    """The summary table as plain text (for notes and logs)."""
    console = Console(width=120, record=True, color_system=None, file=_Null())
    console.print(summary_table(result, threshold))
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

    from longreach.bench.demo import DEMO_MODEL, demo_config
    from longreach.bench.report import write_report
    from longreach.bench.runner import model_trained_length
    from longreach.models import load

    started = time.perf_counter()
    name = model or DEMO_MODEL
    out = Path(out)
    with console.status(f"loading {name} (the first time converts it once into the cache)"):
        lm, tokenizer = load(name)
    config = demo_config(out, name, model_trained_length(lm))
    lengths = ", ".join(format_length(n) for n in config.lengths)
    console.print(
        f"[bold]longreach demo[/]: {name} · {', '.join(config.methods)} · "
        f"{', '.join(config.tasks)} · lengths {lengths} · {config.samples} samples"
    )
    result = bench_with_progress(config, console, model=lm, tokenizer=tokenizer)
    with console.status("writing the report"):
        report = write_report(config.db, out / "report")
    console.print(summary_table(result))
    console.print(
        f"report: [bold]{report.index}[/] · database: {config.db} · "
        f"{time.perf_counter() - started:.0f} s in all"
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
