"""File writes that must never be left half-written, and the checks that come before them.

- :func:`atomic_open` / :func:`atomic_write_text`: temporary file beside the target, fsync, rename;
  a full disk, a second Ctrl-C or any other failure during the write leaves the previous file;
- :func:`check_output_file`, :func:`ensure_writable_dir`, :func:`check_free_space`: checks made
  before any work, so that a bad path or a full disk is reported before minutes of work, not after;
- :func:`remove_stale_temp_files`: the temporary files a killed process (SIGKILL, power loss) left.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, List, Optional, Tuple, Union

from .errors import BadInputError, DiskFullError

__all__ = ["atomic_open", "default_file_mode", "atomic_write_text", "ensure_writable_dir", "check_output_file", "check_free_space",
           "free_bytes", "remove_stale_temp_files", "temp_file_pattern", "DiskFullError", "format_bytes"]

PathLike = Union[str, os.PathLike]

# Temporary files are named ".<first 48 characters of the name>.<random>.tmp": short enough that
# any legal target name gets a legal temporary name, and recognisable for stale-file cleanup.
_TEMP_STEM = 48
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units up to EiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(n) < 1024 or unit == "EiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file here (0o666 less the umask); files staged in a private
    temporary place (0600, a 0700 folder) get it before they are moved to where users read them."""
    return 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_file_pattern(name: str) -> str:
    """The glob pattern of :func:`atomic_open`'s temporary files for a target named ``name``."""
    return f".{name[:_TEMP_STEM]}.*.tmp"


def free_bytes(folder: PathLike) -> int:
    """Bytes an unprivileged process may still write on ``folder``'s file system."""
    st = os.statvfs(_existing_ancestor(Path(folder)))
    return st.f_bavail * st.f_frsize


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", *,
                check: Optional[Callable[[str], None]] = None) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` atomically.

    The data is flushed and fsynced, ``check(temp_path)`` (if given) may inspect the written file
    and raise, the file gets a new file's permissions (``mkstemp`` makes it private), then it is
    renamed over ``path`` and the folder is fsynced. On any error the temporary file is removed
    and ``path`` is untouched, so a crash leaves the old file or the new one, never a broken one.

    Failures of the write itself are reported against ``path`` (never the temporary name): a full
    disk raises :class:`DiskFullError`, another OSError keeps its errno with ``path`` as its
    file name, and a Ctrl-C that lands inside a writer that wraps it (torch.save turns it into a
    RuntimeError) is raised again as KeyboardInterrupt.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:_TEMP_STEM]}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(e, path, None) from e
    try:
        try:
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:
            error = _write_error(e, path, tmp)
            if error is e:
                raise
            raise error from e
        if check is not None:
            check(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable; some filesystems refuse
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set = set()
    stack: List[BaseException] = [e]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        stack.extend(c for c in (x.__cause__, x.__context__) if c is not None)


def _write_error(e: BaseException, path: Path, tmp: Optional[str]) -> BaseException:
    """What the failure ``e`` of writing ``path`` (through ``tmp``) should be raised as."""
    causes = list(_chain(e))
    if any(isinstance(c, KeyboardInterrupt) for c in causes):
        return e if isinstance(e, KeyboardInterrupt) else KeyboardInterrupt()
    full = any(isinstance(c, OSError) and c.errno in _DISK_FULL for c in causes)
    if not full and isinstance(e, RuntimeError) and tmp is not None:
        # torch.save reports a failed write as "unexpected pos"; a file system with (almost) no
        # space left while the partial file is still there tells why.
        with contextlib.suppress(OSError):
            full = free_bytes(path.parent) < 1 << 20
    if full:
        kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
        return DiskFullError(f"no space left on device writing {path}; {kept}; free some space and run again",
                             path=path)
    if isinstance(e, OSError) and tmp is not None and (e.filename is None or e.filename == tmp
                                                        or isinstance(e.filename, int)):
        return OSError(e.errno, e.strerror, str(path))
    return e


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def ensure_writable_dir(path: PathLike, what: str) -> Path:
    """Create folder ``path`` if needed and prove it is writable, before any work is done.

    Raises BadInputError (exit 2) naming ``what`` (e.g. "the run directory") otherwise.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".gfgp-write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise DiskFullError(f"no space left on device for {what} {path}; free some space and run again",
                                path=path) from e
        raise BadInputError(f"cannot write {what} {path}: {e.strerror or type(e).__name__}") from e
    return path


def check_output_file(path: PathLike, *, force: bool, what: str, example: str) -> Path:
    """Check an output file before any work: not a folder (nor a name ending in a separator),
    a name the file system allows, not existing unless ``force``, and a writable folder (created
    if missing). ``what`` names it in messages ("--out", "the ONNX output"); ``example`` is a file
    name to suggest when ``path`` is a folder."""
    out = Path(path)
    limit = _name_max(out.parent)
    if len(os.fsencode(out.name)) > limit:
        raise BadInputError(
            f"{what} file name is {len(os.fsencode(out.name))} bytes long; the file system allows {limit}: "
            "choose a shorter name"
        )
    if str(path).endswith(("/", os.sep)):
        raise BadInputError(f"{what} {path} names a folder (it ends with /); give a file path such as {out / example}")
    if out.is_dir():
        raise BadInputError(f"{what} {out} is a folder; give a file path such as {out / example}")
    if out.exists() and not force:
        raise BadInputError(f"{what} {out} already exists; pass --force to overwrite it")
    ensure_writable_dir(out.parent, f"the folder of {what}")
    return out


def check_free_space(folder: PathLike, need: int, what: str, advice: str = "free some space and run again") -> None:
    """Raise :class:`DiskFullError` when ``folder``'s file system has less than ``need`` bytes free
    for ``what`` (a write that is known in advance not to fit is refused before the work)."""
    free = free_bytes(folder)
    if free < need:
        raise DiskFullError(
            f"not enough space left on device for {what} in {folder}: about {format_bytes(need)} needed, "
            f"{format_bytes(free)} free; {advice}", path=Path(folder)
        )


def remove_stale_temp_files(folder: PathLike, names: Iterable[str]) -> Tuple[int, int]:
    """Remove the temporary files :func:`atomic_open` left for targets ``names`` in ``folder``
    (a process killed during a write leaves its ``.NAME.*.tmp``); returns (count, bytes).

    Only for folders no other process is writing to (a training run holds its folder's lock).
    """
    count = size = 0
    for name in names:
        for stale in Path(folder).glob(temp_file_pattern(name)):
            with contextlib.suppress(OSError):
                n = stale.stat().st_size
                stale.unlink()
                count, size = count + 1, size + n
    return count, size


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(_existing_ancestor(folder), "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255
