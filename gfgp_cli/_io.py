"""Atomic file writes: the one place gfgp writes files that must never be left half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator, Optional, Union

__all__ = ["atomic_open", "atomic_write_text", "ensure_writable_dir", "check_output_file"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: Union[str, os.PathLike], mode: str = "wb", *,
                check: Optional[Callable[[str], None]] = None) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` atomically.

    The data is flushed and fsynced, ``check(temp_path)`` (if given) may inspect the written file
    and raise, the file gets a new file's permissions (``mkstemp`` makes it private), then it is
    renamed over ``path`` and the folder is fsynced. On any error the temporary file is removed
    and ``path`` is untouched, so a crash leaves the old file or the new one, never a broken one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable; some filesystems refuse
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def ensure_writable_dir(path: Union[str, os.PathLike], what: str) -> Path:
    """Create folder ``path`` if needed and prove it is writable, before any work is done.

    Raises BadInputError (exit 2) naming ``what`` (e.g. "the run directory") otherwise.
    """
    from .errors import BadInputError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".gfgp-write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise BadInputError(f"cannot write {what} {path}: {e.strerror or type(e).__name__}") from e
    return path


def check_output_file(path: Union[str, os.PathLike], *, force: bool, what: str, example: str) -> Path:
    """Check an output file before any work: not a folder, not existing unless ``force``, and a
    writable folder (created if missing). ``what`` names it in messages ("--out", "the ONNX
    output"); ``example`` is a file name to suggest when ``path`` is a folder."""
    from .errors import BadInputError

    out = Path(path)
    if out.is_dir():
        raise BadInputError(f"{what} {out} is a folder; give a file path such as {out / example}")
    if out.exists() and not force:
        raise BadInputError(f"{what} {out} already exists; pass --force to overwrite it")
    ensure_writable_dir(out.parent, f"the folder of {what}")
    return out
