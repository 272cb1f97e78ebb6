"""The layout of a `lstm-hpo train --out DIR` directory: one run per directory.

A run records what it writes in :data:`MANIFEST` before it writes anything; the next run
into DIR removes exactly those files (never a file of the user's that happens to share a
name, and only once its own config, checkpoint and data have been read), so a plain fit
never sits beside a refit's stale ``refit.ckpt`` and ``selection/``. No torch here: the
CLI checks DIR before it imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

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


def overwritten_input(out_dir: Path, inputs: Iterable[Path], *, selection: bool) -> Path | None:
    """The first of ``inputs`` (files the run reads: its data, its ``--init-from``
    checkpoint) that the run would overwrite, or None. The config may be DIR/config.yaml:
    the run writes the same config there."""
    written = {path.resolve() for path in run_outputs(out_dir, selection=selection)}
    written.discard((out_dir / "config.yaml").resolve())
    return next((path for path in inputs if path.resolve() in written), None)


def replace_earlier_run(out_dir: Path, *, selection: bool, keep: Iterable[Path] = ()) -> list[Path]:
    """Remove the files the earlier run in ``out_dir`` listed in its manifest (except
    ``keep``: what the new run reads, listed again for the run after; ``selection/`` goes
    too once empty), then list what this run may write. Returns what was removed. A
    directory without a manifest (new, the user's own, or from lstm-hpo before 2026-12)
    loses nothing. Raises OSError when a file cannot be removed or the manifest cannot be
    written."""
    kept = {path.resolve() for path in keep}
    manifest = out_dir / MANIFEST
    removed: list[Path] = []
    carried: list[str] = []  # an earlier run's file this run reads: the next run removes it
    for relative in _listed(manifest):
        path = out_dir / relative
        if not path.is_file() or path.is_symlink():
            continue
        if path.resolve() in kept:
            carried.append(relative)
        else:
            path.unlink()
            removed.append(path)
    selection_dir = out_dir / SELECTION_DIR
    if removed and selection_dir.is_dir() and not any(selection_dir.iterdir()):
        selection_dir.rmdir()
        removed.append(selection_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = run_outputs(out_dir, selection=selection)[1:]
    listed = [str(path.relative_to(out_dir)) for path in paths]
    listed += [relative for relative in carried if relative not in listed]
    manifest.write_text(json.dumps({"written_by": "lstm-hpo train", "files": listed}) + "\n")
    return removed


def _listed(manifest: Path) -> list[str]:
    """The manifest's files that a run can have written (a hand-edited manifest cannot
    make a run remove anything else); none when there is no readable manifest."""
    try:
        files = json.loads(manifest.read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    allowed = {name for name in RUN_FILES} | {f"{SELECTION_DIR}/{name}" for name in RUN_FILES}
    return [f for f in files if isinstance(f, str) and f in allowed]
