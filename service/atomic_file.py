"""Replace a file atomically: write a temporary file beside it, ``fsync`` it and
``os.replace`` it over the target (atomic on POSIX and Windows, and on NFS within one
directory). A crash leaves the old file or the new one, never a torn one; a link at the
target is replaced, never written through. No third-party imports: the CLI uses it before
torch and Optuna are loaded."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def replace_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Make ``path`` hold what ``write`` writes to the binary file it is given; its
    directory must exist. Raises what ``write`` or the file system raises (OSError), the
    temporary file removed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
