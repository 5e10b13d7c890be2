"""The one exception type the CLI turns into a single clear sentence (no traceback)."""


class CCRKError(Exception):
    """A user-facing error: the message names the file, row or url at fault."""
