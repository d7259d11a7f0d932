"""Error types the CLI maps to exit codes (docs/architecture.md): bad input -> 2, failed work -> 1."""

__all__ = ["BadInputError", "WorkFailedError"]


class BadInputError(ValueError):
    """Bad usage or bad input (unknown model, missing or corrupt file): exit code 2.

    The message is one line that says what was wrong and what to do.
    """


class WorkFailedError(RuntimeError):
    """The work itself failed (verification mismatch, diverged training): exit code 1."""
