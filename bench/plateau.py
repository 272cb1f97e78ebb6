"""Which adding-problem trials left the mean's plateau, by depth, width and initialisation.

Every model of the adding problem (Hochreiter & Schmidhuber 1997) first predicts the mean
(MSE ~0.167) for thousands of updates, then leaves that plateau within an epoch or two,
or never does within its epochs. Whether a trial left it is read from its per-epoch
validation MSE in the suite's ``results.json`` (``bench.evaluate``): a minimum below
``--threshold`` (0.002, ~1% of the plateau's value). Prints one row per (layers, width
bin, init) and Fisher's exact test (scipy) of the two groups ``--split`` names.

    python -m bench.plateau bench/results/adding_shipped_s* bench/results/adding_2layer_*
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLATEAU_LEFT_BELOW = 0.002


@dataclass(frozen=True)
class PlateauTrial:
    """One LSTM trial of an adding study: its shape, init and whether it left the plateau."""

    run: str
    layers: int
    hidden: int
    init: str
    lr: float
    epochs: int
    left: bool


def plateau_trials(
    result_dirs: Iterable[Path], threshold: float = PLATEAU_LEFT_BELOW
) -> Iterator[PlateauTrial]:
    """The LSTM trials with at least one epoch in the adding studies of ``result_dirs``.
    A parameter the study did not search is read from its spec (fixed values) or, for a
    model family (``stacked_lstm``: 2 layers), from the trial's best config when known."""
    for folder in result_dirs:
        results = json.loads((folder / "results.json").read_text())
        task = results["tasks"].get("adding")
        if task is None:
            continue
        fixed: dict[str, Any] = {
            name: value for name, value in task["spec"]["space"].items() if _is_fixed(value)
        }
        for family, studies in task["studies"].items():
            for study in studies:
                best = (study.get("best_config") or {}).get("params", {})
                for trial in study["trials"]:
                    curve = trial.get("intermediate_values") or {}
                    params = {**fixed, **trial["params"]}
                    cell = params.get("cell", best.get("cell", "lstm"))
                    if not curve or cell != "lstm":
                        continue
                    layers = params.get("num_layers", _family_layers(family, best))
                    yield PlateauTrial(
                        run=folder.name,
                        layers=int(layers),
                        hidden=int(params["hidden_size"]),
                        init=str(params.get("init", best.get("init", "?"))),
                        lr=float(params.get("lr", best.get("lr", 0.0))),
                        epochs=len(curve),
                        left=min(curve.values()) < threshold,
                    )


def _is_fixed(value: Any) -> bool:
    return not (isinstance(value, dict) and "type" in value)


def _family_layers(family: str, best: dict[str, Any]) -> int:
    if family == "lstm_1layer":
        return 1
    return int(best.get("num_layers", 2 if family == "stacked_lstm" else 1))


def table(trials: list[PlateauTrial], width_split: int) -> str:
    """Markdown: trials that left the plateau / trials, by layers, width bin and init."""
    cells: dict[tuple[int, str, str], list[bool]] = defaultdict(list)
    for trial in trials:
        width = f"<= {width_split}" if trial.hidden <= width_split else f"> {width_split}"
        cells[(trial.layers, width, trial.init)].append(trial.left)
    lines = ["| layers | hidden | init | left the plateau |", "|---|---|---|---|"]
    for (layers, width, init), lefts in sorted(cells.items()):
        lines.append(f"| {layers} | {width} | {init} | {sum(lefts)} of {len(lefts)} |")
    return "\n".join(lines)


def fisher(a: list[bool], b: list[bool]) -> float:
    """Two-sided p of Fisher's exact test: do groups ``a`` and ``b`` leave it as often?"""
    from scipy.stats import fisher_exact  # statsmodels' dependency (the datasets extra)

    table_ = [[sum(a), len(a) - sum(a)], [sum(b), len(b) - sum(b)]]
    return float(fisher_exact(table_).pvalue)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="bench.evaluate output folders")
    parser.add_argument("--threshold", type=float, default=PLATEAU_LEFT_BELOW)
    parser.add_argument("--width-split", type=int, default=56, help="hidden units")
    parser.add_argument("--layers", type=int, default=2, help="the depth the tests compare")
    args = parser.parse_args(argv)
    if missing := [str(run) for run in args.runs if not (run / "results.json").is_file()]:
        parser.error(f"no results.json in {', '.join(missing)}")
    trials = list(plateau_trials(args.runs, args.threshold))
    print(table(trials, args.width_split))
    deep = [t for t in trials if t.layers == args.layers]
    narrow = [t.left for t in deep if t.hidden <= args.width_split]
    wide = [t.left for t in deep if t.hidden > args.width_split]
    ortho = [t.left for t in deep if t.init == "orthogonal"]
    xavier = [t.left for t in deep if t.init == "xavier_uniform"]
    print(
        f"\n{args.layers} layers: hidden <= {args.width_split} {sum(narrow)} of {len(narrow)}, "
        f"wider {sum(wide)} of {len(wide)} (Fisher p = {fisher(narrow, wide):.2g}); "
        f"orthogonal {sum(ortho)} of {len(ortho)}, xavier {sum(xavier)} of {len(xavier)} "
        f"(p = {fisher(ortho, xavier):.2g})"
    )


if __name__ == "__main__":
    main()
