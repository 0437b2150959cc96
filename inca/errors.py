"""The one exception type that the command-line tools turn into a one-line message."""


class InCAError(ValueError):
    """A bad input or state the user can fix; its message is one line: what is wrong and how to fix it."""
