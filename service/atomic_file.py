"""Replace a file atomically: write a temporary file beside it, ``fsync`` it and
``os.replace`` it over the target (atomic on POSIX and Windows, and on NFS within one
directory). A crash leaves the old file or the new one, never a torn one; a link at the
target is replaced, never written through. No third-party imports: the CLI uses it before
torch and Optuna are loaded."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def replace_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Make ``path`` hold what ``write`` writes to the binary file it is given; its
    directory must exist. Raises what ``write`` or the file system raises (OSError), the
    temporary file removed."""
    mode = _mode_for(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # mkstemp makes 0600: the mode a plain open() would give
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a file the user named (``-o FILE``): a new or regular file is
    replaced atomically (:func:`replace_atomically`); a symlink, a device or a pipe is
    written through, as a shell's ``>`` would (``-o /dev/stdout`` must not replace the
    device with a file). Raises OSError."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        with open(path, "wb") as f:
            f.write(data)
        return
    replace_atomically(path, lambda f: f.write(data))


def _mode_for(path: Path) -> int:
    """The mode of the regular file at ``path``, else what a new file gets (0666 less the
    umask)."""
    try:
        info = os.lstat(path)
        if stat.S_ISREG(info.st_mode):
            return stat.S_IMODE(info.st_mode)
    except OSError:
        pass
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (os.umask sets
    it, for a moment that other threads' files would get)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
