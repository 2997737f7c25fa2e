"""The one exception type that longreach raises for a user's mistake.

Its message is a single sentence that says what is wrong and what to do; the CLI
prints it without a stack trace.
"""


class LongreachError(Exception):
    """A user-facing error with a one-line message."""


# Set when the CLI has reported a Ctrl-C; longreach.__main__ delivers a swallowed one again.
INTERRUPTS_HANDLED = True
INTERRUPT_SEEN = False  # a SIGINT arrived (set by the CLI entry point)
