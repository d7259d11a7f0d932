"""Error types the CLI maps to exit codes (docs/architecture.md): bad input -> 2, failed work -> 1."""

__all__ = ["BadInputError", "WorkFailedError", "DiskFullError"]


class BadInputError(ValueError):
    """Bad usage or bad input (unknown model, missing or corrupt file): exit code 2.

    The message is one line that says what was wrong and what to do.
    """


class WorkFailedError(RuntimeError):
    """The work itself failed (verification mismatch, diverged training): exit code 1."""


class DiskFullError(WorkFailedError):
    """No space left on the device for a write (exit code 1); the previous file is intact.

    The message names the file that could not be written (never a temporary name); ``path`` is
    that file (or the folder of a write refused in advance).
    """

    def __init__(self, message: str, path=None) -> None:
        super().__init__(message)
        self.path = path
