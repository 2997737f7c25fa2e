"""The `longreach` command line: parsing and rendering only; the work lives in the package."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from longreach import __version__, errors
from longreach.errors import LongreachError

app = typer.Typer(
    name="longreach",
    help="Reach past a causal LM's trained context length, and measure how far it really reaches.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a LongreachError as one red line and exit 2, instead of a stack trace."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LongreachError as exc:
            # escaped: a message may hold brackets (pip install 'longreach[ray]')
            err_console.print(
                f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            errors.INTERRUPTS_HANDLED = True
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"longreach {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """longreach: training-free context extension, bounded memory, honest measurement."""


@app.command()
@one_line_errors
def models() -> None:
    """List the model aliases with their size, trained context length and cache state."""
    from longreach.models.registry import list_aliases

    table = Table(title="model aliases")
    for col in ("alias", "parameters", "trained length", "cached", "source"):
        table.add_column(col)
    for info in list_aliases():
        table.add_row(
            info.alias,
            info.parameters_label,
            str(info.trained_length),
            "yes" if info.cached else "no",
            info.source,
        )
    console.print(table)
    console.print(
        "Any local Hugging Face model directory works too: pass its path instead of an alias."
    )


@app.command()
@one_line_errors
def train(
    out: str = typer.Option(
        "runs/lab", "--out", help="Output model directory (resumes if it has a checkpoint)."
    ),
    steps: int = typer.Option(3000, help="Optimisation steps (the recipe of docs/lab.md)."),
    seed: int = typer.Option(0, help="Random seed: same seed, same model."),
    pipeline: str = typer.Option(
        "dd", help="dd (Dataset Decomposition) or concat (concat-and-chunk)."
    ),
    threads: int = typer.Option(0, help="torch CPU threads; 0 keeps torch's default."),
    force: bool = typer.Option(
        False, "--force", help="Overwrite a model in --out that has no checkpoint of this run."
    ),
) -> None:
    """Train the lab model (a small Llama at a 256-token context) with Dataset Decomposition."""
    from pathlib import Path

    from longreach.lab.progress import run_with_progress
    from longreach.lab.train import TrainConfig

    cfg = TrainConfig(
        out_dir=Path(out),
        steps=steps,
        seed=seed,
        pipeline=pipeline,
        threads=threads or None,
        force=force,
    )
    run_with_progress(cfg, console=console)


# ---- measure: bench, report, export, tasks, demo


@app.command()
@one_line_errors
def bench(
    model: str = typer.Option(
        "smollm2-135m", "--model", "-m", help="Model alias or local Hugging Face directory."
    ),
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method", help="Method spec, e.g. yarn:factor=4 (repeatable). Default: vanilla."
        ),
    ] = None,
    task: Annotated[
        list[str] | None,
        typer.Option(
            "--task",
            help="Task spec, e.g. passkey, niah, multi-needle:k=4 (repeatable; `longreach tasks` lists them). Default: passkey.",
        ),
    ] = None,
    task_file: Annotated[
        list[str] | None,
        typer.Option("--task-file", help="A LongBench or RULER jsonl file (repeatable)."),
    ] = None,
    lengths: str = typer.Option(
        "1k,2k,4k",
        "--lengths",
        help="Comma-separated lengths in the model's own tokens (2k = 2048).",
    ),
    depths: str = typer.Option(
        "0.5", "--depths", help="Comma-separated needle depths in [0, 1], e.g. 0.1,0.5,0.9."
    ),
    samples: int = typer.Option(
        3, "--samples", "-n", help="Samples per (method, task, length, depth)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the generated samples."),
    chat: bool = typer.Option(
        False,
        "--chat/--no-chat",
        help="Wrap each prompt in the tokenizer's chat template (default: the raw prompt).",
    ),
    haystack: str | None = typer.Option(
        None,
        "--haystack",
        help="pg (Paul Graham essays), synthetic, or a text file or folder (default: each task's own).",
    ),
    db: str = typer.Option(
        "runs.db", "--db", help="SQLite results file; a rerun skips the cells it holds."
    ),
    dtype: str | None = typer.Option(
        None,
        "--dtype",
        help="bf16, fp16 or fp32 (default: the fastest exact type on this machine).",
    ),
    chunk: int | None = typer.Option(
        None, "--chunk", help="Chunked prefill: tokens per forward pass (default: one pass)."
    ),
    threshold: float = typer.Option(
        0.85, "--threshold", help="Accuracy threshold of the effective context length."
    ),
    ruler_threshold: float = typer.Option(
        0.856, "--ruler-threshold", help="Threshold of the RULER average's effective length."
    ),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads; 0 keeps torch's default."),
    executor: str = typer.Option(
        "local", "--executor", help="local (this process) or ray (workers on a Ray cluster)."
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Join this Ray cluster (default: start a local one)."
    ),
    workers: int | None = typer.Option(
        None, "--workers", help="Ray workers, each holding one model (default: what fits)."
    ),
    gpus_per_worker: float = typer.Option(
        0.0, "--gpus-per-worker", help="GPUs each Ray worker reserves (0: run on CPUs)."
    ),
    endpoint: Annotated[
        list[str] | None,
        typer.Option(
            "--endpoint",
            help="Run against an OpenAI-compatible server at this URL instead (repeatable: "
            "servers of one model share the cells).",
        ),
    ] = None,
    served_model: str | None = typer.Option(
        None, "--served-model", help="With --endpoint: the model name the server serves."
    ),
    tokenizer: str | None = typer.Option(
        None,
        "--tokenizer",
        help="With --endpoint: a local tokenizer, if the server has no /tokenize.",
    ),
    parallel: int = typer.Option(
        1, "--parallel", help="With --endpoint: requests in flight to each URL."
    ),
    timeout: float = typer.Option(
        600.0, "--timeout", help="With --endpoint: seconds without an answer before giving up."
    ),
    questions_per_context: int = typer.Option(
        1,
        "--questions-per-context",
        help="Encode each context once and ask it this many questions (passkey, niah, "
        "kv-retrieval); each question is a cell.",
    ),
) -> None:
    """Run a benchmark grid; every sample becomes one row of the SQLite results file."""
    from longreach.bench import BenchConfig, parse_depths, parse_lengths
    from longreach.bench.render import bench_with_progress, set_threads, summary_table
    from longreach.bench.summary import check_threshold

    check_threshold(threshold)
    check_threshold(ruler_threshold)
    set_threads(threads)
    if endpoint and executor == "ray" and workers is None:
        workers = len(endpoint)  # one Ray worker per URL, each with --parallel requests
    grid_executor = _grid_executor(
        executor,
        ray_address,
        workers,
        gpus_per_worker,
        threads,
        max(4, parallel) if endpoint else 4,
    )

    config = BenchConfig(
        model=model,
        methods=method or ["vanilla"],
        tasks=task or ([] if task_file else ["passkey"]),
        task_files=task_file or [],
        lengths=parse_lengths(lengths),
        depths=parse_depths(depths),
        samples=samples,
        seed=seed,
        chat=chat,
        haystack=haystack,
        db=db,
        dtype=dtype,
        chunk=chunk,
        questions_per_context=questions_per_context,
    )
    if endpoint and questions_per_context > 1:
        raise LongreachError(
            "--questions-per-context runs in-process (a server re-reads each prompt); drop it "
            "or --endpoint."
        )
    if endpoint:
        from longreach.bench.endpoint import EndpointConfig
        from longreach.bench.endpoint_backend import run_endpoints_bench

        if not served_model:
            raise LongreachError(
                "--endpoint needs --served-model NAME (see the server's /v1/models)."
            )
        targets = [EndpointConfig(u, served_model, tokenizer, parallel, timeout) for u in endpoint]
        result = bench_with_progress(
            config, console, runner=run_endpoints_bench, endpoints=targets, executor=grid_executor
        )
    else:
        result = bench_with_progress(config, console, executor=grid_executor)
    console.print(summary_table(result, threshold, ruler_threshold))
    if getattr(result, "failed", 0):
        console.print(f"[red]{result.failed} cells failed[/]; their errors are stored with them.")
    console.print(
        f"{result.computed} cells computed, {result.skipped} already in {db}. "
        f"Make the report with: [bold]longreach report --db {db} --out report/[/]"
    )


def _grid_executor(
    kind: str, address: str | None, workers: int | None, gpus: float, threads: int, chunk: int = 4
) -> Any:
    """``--executor``: None runs in this process; ``ray`` gives a RayExecutor."""
    if kind == "local":
        given = [
            name
            for name, value in (
                ("--ray-address", address), ("--workers", workers), ("--gpus-per-worker", gpus)
            )
            if value
        ]  # fmt: skip
        if given:
            raise LongreachError(f"{given[0]} needs --executor ray.")
        return None
    if kind != "ray":
        raise LongreachError(f"unknown --executor {kind!r}; use local or ray.")
    from longreach.bench.ray_executor import RayExecutor, import_ray

    import_ray()
    return RayExecutor(
        address=address,
        workers=workers,
        gpus_per_worker=gpus,
        cpus_per_worker=threads or 1,
        max_chunk=chunk,
    )


@app.command()
@one_line_errors
def serve(
    model: str = typer.Option(
        "lab", "--model", "-m", help="Model alias or local Hugging Face directory."
    ),
    method: str = typer.Option("vanilla", "--method", help="Method spec, e.g. yarn:factor=4."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="TCP port; 0 picks a free one (printed)."),
    max_queue: int = typer.Option(8, "--max-queue", help="Requests that may wait; beyond: 503."),
    max_model_len: int | None = typer.Option(
        None, "--max-model-len", help="Context length served (default: what the method serves)."
    ),
    served_model_name: str | None = typer.Option(
        None, "--served-model-name", help="Name clients pass as `model` (default: --model)."
    ),
    chat_template: str | None = typer.Option(
        None, "--chat-template", help="Jinja chat template file (default: the tokenizer's)."
    ),
    chunk: int = typer.Option(1024, "--chunk", help="Prefill chunk in tokens."),
    dtype: str | None = typer.Option(None, "--dtype", help="bf16, fp16 or fp32."),
    max_sessions: int = typer.Option(16, "--max-sessions", help="Kept conversations (session_id)."),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads; 0 keeps torch's default."),
) -> None:
    """Serve a model with a method behind an OpenAI-compatible API (docs/serve.md)."""
    from longreach.bench.render import set_threads
    from longreach.serve import ServeConfig
    from longreach.serve import serve as run_server

    set_threads(threads)
    config = ServeConfig(
        model=model, method=method, host=host, port=port, max_queue=max_queue,
        max_model_len=max_model_len, served_model_name=served_model_name,
        chat_template=chat_template, chunk=chunk, dtype=dtype, max_sessions=max_sessions,
    )  # fmt: skip

    def listening(url: str) -> None:
        console.print(f"longreach serve: listening on {url}/v1", highlight=False, soft_wrap=True)
        sys.stdout.flush()

    run_server(config, on_listen=listening)


@app.command()
@one_line_errors
def chat(
    model: str = typer.Option(
        "lab", "--model", "-m", help="Model alias or local Hugging Face directory."
    ),
    method: str = typer.Option(
        "vanilla", "--method", help="Method spec, e.g. sirllm:budget=2048 or streaming."
    ),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest answer, in tokens."),
    chunk: int = typer.Option(1024, "--chunk", help="Prefill chunk of a turn, in tokens."),
    dtype: str | None = typer.Option(None, "--dtype", help="bf16, fp16 or fp32."),
    plain: bool = typer.Option(
        False, "--plain", help="A plain-text transcript instead of the chat template."
    ),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads; 0 keeps torch's default."),
) -> None:
    """Chat in the terminal; the conversation stays in the method's cache (Ctrl-D quits)."""
    from longreach.bench.render import set_threads
    from longreach.extend import extend
    from longreach.models import load
    from longreach.session import Session

    set_threads(threads)
    with console.status(f"loading {model}"):
        lm, tokenizer = load(model, dtype=dtype)
        extend(lm, method)
        session = Session(
            lm, tokenizer, chunk=chunk, max_new_tokens=max_new_tokens,
            chat=False if plain else None,
        )  # fmt: skip
    console.print(
        f"longreach chat · {model} · {method} · Ctrl-D quits", highlight=False, soft_wrap=True
    )
    while True:
        try:
            text = console.input("[bold]> [/bold]")
        except EOFError:
            console.print()
            break
        if not text.strip():
            continue

        def show(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        session.say(text, on_text=show)
        sys.stdout.write("\n")
        console.print(_chat_status(session), style="dim", highlight=False, soft_wrap=True)


def _chat_status(session: Any) -> str:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return (
        f"tokens seen {session.seen:,} · cache {session.cache_tokens:,} tokens, "
        f"{session.cache_bytes / 2**20:.1f} MiB · peak RSS {peak / 2**20:,.0f} MiB"
    )


@app.command()
@one_line_errors
def report(
    db: str = typer.Option(
        "runs.db", "--db", help="SQLite results file written by `longreach bench`."
    ),
    out: str = typer.Option("report", "--out", help="Folder for index.html and the PNG figures."),
    threshold: float = typer.Option(
        0.85, "--threshold", help="Accuracy threshold of the effective context length."
    ),
    x: str = typer.Option(
        "tokens",
        "--x",
        help="Length axis of the figures: tokens, characters or words (the mean of the "
        "cells' contexts; token counts differ between tokenizers).",
    ),
) -> None:
    """Render the results as PNG figures and one self-contained index.html."""
    from longreach.bench.report import write_report

    with console.status("rendering the report"):
        made = write_report(db, out, threshold, axis=x)
    console.print(f"report: [bold]{made.index}[/] ({len(made.images)} figures, {made.cells} cells)")


@app.command()
@one_line_errors
def export(
    db: str = typer.Option(
        "runs.db", "--db", help="SQLite results file written by `longreach bench`."
    ),
    out: str = typer.Option(..., "--out", help="Output file: .jsonl or .csv."),
    prompts: bool = typer.Option(
        False, "--prompts/--no-prompts", help="Include each cell's full prompt."
    ),
) -> None:
    """Export every cell of a results file to JSONL or CSV."""
    from longreach.bench.store import ResultStore

    with ResultStore(db, create=False) as store:
        n = store.export(out, include_prompt=prompts)
    console.print(f"{n} cells written to {out}")


@app.command()
@one_line_errors
def tasks() -> None:
    """List the benchmark tasks with their parameters."""
    import dataclasses

    from longreach.tasks import TASKS

    table = Table(title="tasks (use as --task name:param=value,...)")
    for col in ("task", "parameters", "what it measures"):
        table.add_column(col)
    for name, cls in TASKS.items():
        params = ", ".join(
            f"{f.name}={'auto' if f.default is None else f.default}"
            for f in dataclasses.fields(cls)
        )
        table.add_row(name, params or "-", cls.summary)
    console.print(table)
    console.print("Local files: --task-file FILE.jsonl (LongBench or RULER format).")


@app.command()
@one_line_errors
def convert(
    kind: str = typer.Argument(..., help="The conversion: m4le."),
    source: str = typer.Option(..., "--in", help="Short instances, JSON lines."),
    out: str = typer.Option(..., "--out", help="The long task file to write (.jsonl)."),
    lengths: str = typer.Option("8k,32k", "--lengths", help="Lengths in whitespace words."),
    mode: str = typer.Option("explicit-single", "--mode", help="explicit|semantic-single|multi."),
    seed: int = typer.Option(111, "--seed", help="Seed of the packing (M4LE's is 111)."),
) -> None:
    """Pack short instances into long task-file rows (M4LE's conversion); run them with --task-file."""
    from longreach.bench import parse_lengths
    from longreach.tasks.m4le import convert as m4le_convert
    from longreach.tasks.m4le import read_short, write_jsonl

    if kind != "m4le":
        raise LongreachError(f"unknown conversion {kind!r}; the one there is: m4le.")
    rows = list(m4le_convert(read_short(source, mode), parse_lengths(lengths), mode, seed))
    n = write_jsonl(rows, out)
    console.print(f"{n} long rows written to {out}; run them with --task-file {out}")


@app.command()
@one_line_errors
def demo(
    out: str = typer.Option("demo", "--out", help="Folder for the demo's database and report."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Model to demo (default: the embedded default model)."
    ),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads; 0 keeps torch's default."),
) -> None:
    """A small benchmark and its report on the embedded default model (a few minutes on a CPU)."""
    from longreach.bench.render import run_demo, set_threads

    set_threads(threads)
    run_demo(console, out, model)


@app.command()
@one_line_errors
def methods() -> None:
    """List the context-extension methods with their parameters, defaults and papers."""
    from longreach.methods import all_methods

    table = Table(title="methods (use as --method name:param=value,...)")
    for col in ("method", "parameters (default)", "what it does", "paper"):
        table.add_column(col)
    for cls in all_methods():
        params = "\n".join(
            f"{name}={'auto' if default is None else default}: {help_text}"
            for name, default, help_text in cls.parameters()
        )
        table.add_row(cls.name, params or "-", cls.summary, cls.paper)
    console.print(table)
    console.print("auto: taken from the model (original_max: its trained length).")


def run() -> None:  # pragma: no cover - the console script is longreach.__main__:main
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
