"""``longreach`` and ``python -m longreach``: the CLI, where Ctrl-C at any moment exits cleanly."""

from __future__ import annotations

import os
import signal
import sys
import threading


def _on_sigint(signum: int, frame: object) -> None:
    # torch's C++ start-up swallows a KeyboardInterrupt raised while it imports numpy, and the
    # command would then run on; if nothing handles this one soon, deliver the signal again.
    from longreach import errors

    errors.INTERRUPTS_HANDLED = False
    timer = threading.Timer(0.5, _resend)
    timer.daemon = True
    timer.start()
    raise KeyboardInterrupt


def _resend() -> None:
    from longreach import errors

    if not errors.INTERRUPTS_HANDLED:
        os.kill(os.getpid(), signal.SIGINT)


def main() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        from longreach.cli import app

        app()
    except KeyboardInterrupt:  # during start-up, before a command's own handler is in place
        from longreach import errors

        errors.INTERRUPTS_HANDLED = True
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
