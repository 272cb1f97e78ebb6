"""The layout of a `lstm-hpo train --out DIR` directory: one run per directory.

A run lists the files it wrote in :data:`MANIFEST` once it has finished; the next run into
DIR removes exactly those (never a file of the user's that happens to share a name, and
only once its own config, checkpoint and data have been read), so a plain fit never sits
beside a refit's stale ``refit.ckpt`` and ``selection/``. No torch here: the CLI checks
DIR before it imports torch.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from service.atomic_file import replace_atomically

#: What a `train --out DIR` run writes into DIR (Lightning's CSVLogger: metrics.csv and
#: hparams.yaml), and the validated fit a refit writes into DIR/selection.
RUN_FILES = ("config.yaml", "best.ckpt", "refit.ckpt", "metrics.csv", "hparams.yaml", "result.json")
SELECTION_DIR = "selection"
#: The list of what the run in DIR wrote (paths relative to DIR).
MANIFEST = ".lstm-hpo-run.json"


def run_outputs(out_dir: Path, *, selection: bool) -> list[Path]:
    """Every file a run into ``out_dir`` may write (``selection``: a refit's validated
    fit too), the manifest first."""
    dirs = [out_dir, out_dir / SELECTION_DIR] if selection else [out_dir]
    return [out_dir / MANIFEST, *(d / name for d in dirs for name in RUN_FILES)]


def overwritten_input(
    out_dir: Path, inputs: Iterable[Path], *, selection: bool, config: Path | None = None
) -> Path | None:
    """The first of ``inputs`` (files the run reads: its config, its data) that the run
    would overwrite, or None. ``config`` may be DIR/config.yaml: the run writes the same
    config there; any other input there would be lost."""
    written = {_real(path) for path in run_outputs(out_dir, selection=selection)}
    same = _real(out_dir / "config.yaml")
    for path in inputs:
        resolved = _real(path)
        if resolved in written and not (config is not None and resolved == same == _real(config)):
            return path
    return None


@dataclass(frozen=True)
class RunStart:
    """What :func:`replace_earlier_run` did, for :func:`record_run`."""

    #: The earlier run's files removed (and ``selection/`` when it went).
    removed: list[Path]
    #: When the new run started (``time.time_ns``): files written since are its own.
    started_ns: int
    #: The earlier run's files the new run reads (kept): the run after removes them.
    carried: list[str] = field(default_factory=list)
    #: Why DIR's manifest could not be read (a damaged or foreign file), when it was there:
    #: the earlier run's files then stay, which the user should be told.
    unreadable: str | None = None


def replace_earlier_run(out_dir: Path, *, keep: Iterable[Path] = ()) -> RunStart:
    """Remove the files the earlier run in ``out_dir`` listed in its manifest, and the
    manifest (except ``keep``: what the new run reads; ``selection/`` goes too once
    empty). A directory without a manifest (new, the user's own, or from lstm-hpo before
    2026-12) loses nothing; nor does one whose manifest cannot be read (the result's
    ``unreadable`` says why). Raises OSError, having removed nothing, when a listed file
    cannot be removed (a read-only directory)."""
    started = time.time_ns()
    kept = {_real(path) for path in keep}
    listed, unreadable = _listed(out_dir)
    doomed = [out_dir / f for f in listed if _real(out_dir / f) not in kept]
    carried = [f for f in listed if _real(out_dir / f) in kept]
    for directory in {path.parent for path in doomed} | ({out_dir} if listed else set()):
        if not os.access(directory, os.W_OK | os.X_OK):
            raise OSError(f"cannot replace the earlier run in {out_dir}: {directory} is read-only")
    for path in doomed:
        path.unlink()
    if listed:
        (out_dir / MANIFEST).unlink(missing_ok=True)
    removed = list(doomed)
    selection_dir = out_dir / SELECTION_DIR
    if (
        doomed
        and selection_dir.is_dir()
        and not selection_dir.is_symlink()
        and not any(selection_dir.iterdir())
    ):
        selection_dir.rmdir()
        removed.append(selection_dir)
    return RunStart(removed, started, carried, unreadable)


def record_run(out_dir: Path, start: RunStart, *, selection: bool) -> None:
    """List in the manifest the run files in ``out_dir`` written since the run started,
    and those it carried: what the next run into ``out_dir`` will remove."""
    paths = run_outputs(out_dir, selection=selection)[1:]
    written = [
        str(path.relative_to(out_dir))
        for path in paths
        if _ours(out_dir, path) and path.stat().st_mtime_ns >= start.started_ns
    ]
    written += [f for f in start.carried if f not in written and _ours(out_dir, out_dir / f)]
    document = {"written_by": "lstm-hpo train", "files": written}
    # Replaced, not written into: a link there is never written through, and an
    # unreadable or damaged manifest goes as a whole.
    text = (json.dumps(document) + "\n").encode("utf-8")
    replace_atomically(out_dir / MANIFEST, lambda f: f.write(text))


def _real(path: Path) -> Path:
    """``path`` with every link followed, as far as they lead: a link loop (which
    ``Path.resolve`` raises RuntimeError for on Python 3.11) stays as it is."""
    return Path(os.path.realpath(path))


def _listed(out_dir: Path) -> tuple[list[str], str | None]:
    """The manifest's files that a run can have written and that lie in ``out_dir`` (a
    hand-edited manifest or a symlinked ``selection/`` cannot make a run remove anything
    else), and why the manifest could not be read (None: it could, or there is none)."""
    path = out_dir / MANIFEST
    if path.is_symlink():  # not written by a run (it replaces the file): may list anything
        return [], "a symbolic link, not a run's list"
    if not path.exists():
        return [], None
    if not path.is_file():  # a FIFO would block the read; a directory is refused earlier
        return [], "not a regular file"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        return [], str(err) or type(err).__name__
    files = document.get("files") if isinstance(document, dict) else None
    if not isinstance(files, list):
        return [], 'not a JSON object with a "files" list'
    allowed = set(RUN_FILES) | {f"{SELECTION_DIR}/{name}" for name in RUN_FILES}
    ours = [f for f in files if isinstance(f, str) and f in allowed and _ours(out_dir, out_dir / f)]
    return ours, None


def _ours(out_dir: Path, path: Path) -> bool:
    """A regular file at ``path``, reached without leaving ``out_dir`` through a link."""
    if (
        not path.is_file()
        or path.is_symlink()
        or (path.parent.is_symlink() and path.parent != out_dir)
    ):
        return False
    return _real(path).parent in {_real(out_dir), _real(out_dir / SELECTION_DIR)}
