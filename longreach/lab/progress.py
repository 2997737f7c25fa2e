"""Run a training with a rich progress bar (used by ``python -m longreach.lab`` and the CLI)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from longreach.lab.train import StepInfo, TrainConfig, TrainResult, train


def run_with_progress(cfg: TrainConfig, console: Console | None = None) -> TrainResult:
    console = console or Console()
    with Progress(
        TextColumn("[bold]lab[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "loss {task.fields[loss]:.3f}  val {task.fields[val]}  len {task.fields[seq_len]}"
        ),
        TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(
            "train", total=cfg.steps, loss=float("nan"), val="-", seq_len=0, tps=0.0
        )

        def on_step(info: StepInfo) -> None:
            fields = dict(
                loss=info.loss, seq_len=info.seq_len, tps=info.tokens / max(info.seconds, 1e-9)
            )
            if info.val_loss is not None:
                fields["val"] = f"{info.val_loss:.3f}"
                probe = "" if info.passkey is None else f", passkey {info.passkey:.0%}"
                progress.console.log(
                    f"step {info.step}: validation loss {info.val_loss:.3f}{probe}"
                )
            elif not progress.console.is_terminal and info.step % 25 == 0:
                # Logged to a file: no live bar, so a line now and then.
                progress.console.log(
                    f"step {info.step}/{info.steps}: loss {info.loss:.3f} (length {info.seq_len})"
                )
            progress.update(task, completed=info.step, **fields)

        result = train(cfg, on_step=on_step, on_status=lambda m: progress.console.log(m))
    console.print(
        f"saved {cfg.out_dir}: {result.tokens:,} tokens in {result.train_seconds:.0f} s, "
        f"validation loss {result.val_loss:.3f}"
    )
    return result
