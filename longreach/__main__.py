"""``longreach`` and ``python -m longreach``: the CLI, where Ctrl-C at any moment exits cleanly."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from longreach.cli import app

        app()
    except KeyboardInterrupt:  # during start-up, before a command's own handler is in place
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
