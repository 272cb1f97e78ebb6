"""The layout of a `lstm-hpo train --out DIR` directory: one run per directory.

No torch here: the CLI checks and clears the directory before it imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

#: What a `train --out DIR` run writes into DIR (Lightning's CSVLogger: metrics.csv and
#: hparams.yaml), and the validated fit a refit writes into DIR/selection.
RUN_FILES = ("config.yaml", "best.ckpt", "refit.ckpt", "metrics.csv", "hparams.yaml", "result.json")
SELECTION_DIR = "selection"


def clear_run_outputs(out_dir: Path, keep: Iterable[Path] = ()) -> list[Path]:
    """Remove what an earlier `train` run left in ``out_dir`` (:data:`RUN_FILES`, and the
    same in ``out_dir/selection``, which goes too once empty), so that a directory holds
    one run: a plain fit into a refit's directory would otherwise sit beside its stale
    ``refit.ckpt`` and ``selection/``. Files in ``keep`` (what the new run reads: its
    config, ``--init-from`` checkpoint, data) and anything not named here stay. Returns
    what was removed."""
    kept = {path.resolve() for path in keep}
    removed: list[Path] = []
    selection = out_dir / SELECTION_DIR
    for directory in (selection, out_dir):
        if not directory.is_dir():
            continue
        for name in RUN_FILES:
            path = directory / name
            if path.is_file() and path.resolve() not in kept:
                path.unlink()
                removed.append(path)
    if selection.is_dir() and not any(selection.iterdir()):
        selection.rmdir()
        removed.append(selection)
    return removed
