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
    errors.INTERRUPT_SEEN = True
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
    except Exception:
        # Ctrl-C inside an import can surface as another error (numpy's "cannot load module
        # more than once per process" when torch's import is retried): still an interruption.
        from longreach import errors

        if getattr(errors, "INTERRUPT_SEEN", False):
            errors.INTERRUPTS_HANDLED = True
            sys.stderr.write("interrupted\n")
            raise SystemExit(130) from None
        raise


if __name__ == "__main__":
    main()
