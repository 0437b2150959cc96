"""The one exception type that the command-line tools turn into a one-line message."""


class InCAError(ValueError):
    """A bad input or state the user can fix; its message is one line: what is wrong and how to fix it."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (or its type), to embed in a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def require_positive(**values: float) -> None:
    """Refuse, in one line, any of ``values`` (epochs, batch sizes, ...; named as the caller's user knows them)
    that is not positive: a run with none of them would train or read nothing."""
    bad = [f"{name} ({value})" for name, value in values.items() if not value > 0]
    if bad:
        raise InCAError(f"{' and '.join(bad)} must be positive")
