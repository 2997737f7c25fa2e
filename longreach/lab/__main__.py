"""``python -m longreach.lab``: train the lab model with a rich progress bar."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from longreach.lab.train import TrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longreach.lab", description=__doc__)
    defaults = TrainConfig()
    parser.add_argument("--out", type=Path, default=defaults.out_dir, help="output model directory")
    for name in (
        "seed",
        "steps",
        "token_budget",
        "seq_len",
        "hidden_size",
        "num_layers",
        "num_heads",
        "intermediate_size",
        "vocab_size",
        "threads",
        "max_text_docs",
    ):
        parser.add_argument(
            "--" + name.replace("_", "-"), type=int, default=getattr(defaults, name)
        )
    for name in ("lr", "synthetic_fraction", "copy_share"):
        parser.add_argument(
            "--" + name.replace("_", "-"), type=float, default=getattr(defaults, name)
        )
    parser.add_argument("--pipeline", choices=("dd", "concat"), default=defaults.pipeline)
    parser.add_argument("--init-from", default=None, help="continue from this model directory")
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument(
        "--copy-warmup-steps",
        type=int,
        default=defaults.copy_warmup_steps,
        help="first steps on random-token copy sequences only (forms induction heads)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite a model in --out that has no checkpoint of this run",
    )
    args = vars(parser.parse_args(argv))
    args["out_dir"] = args.pop("out")

    from longreach.lab.progress import run_with_progress

    result = run_with_progress(TrainConfig(**args))
    return 0 if result is not None else 1


if __name__ == "__main__":
    sys.exit(main())
