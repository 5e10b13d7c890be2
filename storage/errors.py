"""The one exception type the CLI turns into a single clear sentence (no traceback)."""


class CCRKError(Exception):
    """A user-facing error: the message names the file, row or url at fault."""


def shown(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (``...`` at the end): a bad value named in a
    one-line error, however long the value is."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
