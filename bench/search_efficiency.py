"""Search efficiency: TPE + Hyperband against TPE without pruning, random search and a GP
sampler, on one task at the same wall-clock budget per study, over several seeds; and
which hyperparameters mattered (Optuna's fANOVA importances over every completed trial).

Every study goes through a real ``lstm-hpo serve`` (scratch SQLite, one worker process per
core), one after another, each with ``study.timeout_s`` = ``--budget-minutes``. Reported
per configuration: the best validation metric per seed, trials per hour (finished trials:
complete + pruned + failed), and for each TPE configuration with a pruner (Hyperband,
successive halving, median) the seeds where its best is better than or equal to each
unpruned configuration's, and its trials per hour against theirs. Targets (issue 10):
better or equal in >= 4 of 5 seeds, and >= 2.5x the trials per hour of unpruned TPE.

    python -m bench.search_efficiency --task forecast --seeds 5 --budget-minutes 2
    python -m bench.search_efficiency --quick           # ~2 minutes, 2 configurations

Written under ``--out`` (default ``bench/results/search_<task>``): ``results.json``,
``summary.md``, ``best_so_far.png`` and ``importances.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.evaluate import TASKS, load_base_spec
from bench.harness import (
    REPO,
    Machine,
    StudyRun,
    add_workers_option,
    exit_on_sigterm,
    importances,
    machine_line,
    plot_importances,
    positive_float,
    positive_int,
    run_study,
    running_server,
    to_jsonable,
    warm_up,
)
from service.search_space import parse_spec

#: name -> (sampler, pruner)
CONFIGS: Mapping[str, tuple[str, str]] = {
    "tpe_hyperband": ("tpe", "hyperband"),
    # Successive halving is Hyperband's single bracket: TPE then models every trial, where
    # under Hyperband Optuna's TPE sees only the trials of the current trial's bracket.
    "tpe_sha": ("tpe", "successive_halving"),
    "tpe_median": ("tpe", "median"),
    "tpe": ("tpe", "none"),
    "random": ("random", "none"),
    "gp": ("gp", "none"),
}
#: What a run compares unless ``--configs`` says otherwise: the issue's four.
DEFAULT_CONFIGS = ("tpe_hyperband", "tpe", "random", "gp")


def config_spec(base: Mapping[str, Any], config: str, seed: int) -> dict[str, Any]:
    """``base`` searched with ``config``'s sampler and pruner, seeded ``seed``."""
    spec: dict[str, Any] = json.loads(json.dumps(base))
    sampler, pruner = CONFIGS[config]
    spec["name"] = f"search-{config}-s{seed}"
    spec["study"].update(sampler=sampler, pruner=pruner, seed=seed, n_trials=10_000)
    if pruner == "none":
        spec["study"].pop("pruner_warmup_epochs", None)  # nothing to warm up
    return spec


def plot_curves(runs: Mapping[str, Sequence[StudyRun]], ylabel: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (config, config_runs) in enumerate(runs.items()):
        for j, run in enumerate(config_runs):
            if run.best_so_far:
                xs = [t / 60 for t, _ in run.best_so_far] + [run.wall_s / 60]
                ys = [v for _, v in run.best_so_far] + [run.best_so_far[-1][1]]
                ax.step(
                    xs, ys, where="post", color=f"C{i}", alpha=0.5, label=config if j == 0 else None
                )
    ax.set_xlabel("wall time of the search (minutes)")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(runs: Mapping[str, Sequence[StudyRun]], maximize: bool) -> dict[str, Any]:
    """Per configuration: bests per seed, trials/h; and under ``against``, for each TPE
    configuration with a pruner, how it fared against each configuration without one: the
    seeds where its best is better than or equal to the other's (``"k/n"``, seed by seed)
    and the ratio of their trials per hour."""

    def better_or_equal(a: float | None, b: float | None) -> bool:
        if a is None:
            return False
        return b is None or (a >= b if maximize else a <= b)

    out: dict[str, Any] = {}
    for config, config_runs in runs.items():
        out[config] = {
            "best_per_seed": [r.best_value for r in config_runs],
            "trials_per_hour": statistics.fmean(r.trials_per_hour for r in config_runs),
            "trials": [sum(r.counts.values()) for r in config_runs],
            "pruned": [r.counts.get("pruned", 0) for r in config_runs],
        }
    pruned = [c for c in runs if CONFIGS[c][0] == "tpe" and CONFIGS[c][1] != "none"]
    unpruned = [c for c in runs if CONFIGS[c][1] == "none"]
    for config in pruned:
        against: dict[str, Any] = {}
        for other in unpruned:
            pairs = list(zip(runs[config], runs[other], strict=False))
            wins = sum(better_or_equal(a.best_value, b.best_value) for a, b in pairs)
            rate = out[other]["trials_per_hour"]
            against[other] = {
                "better_or_equal": f"{wins}/{len(pairs)}",
                "trials_per_hour_ratio": out[config]["trials_per_hour"] / rate if rate else None,
            }
        out[config]["against"] = against
    return out


def markdown(results: Mapping[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Command: `{results['command']}`  ",
        f"{machine_line(m)} Task {results['task']}, {results['budget_minutes']:g} min "
        f"per study, {results['workers']} worker(s).",
        "",
        "| configuration | best per seed | trials/h | pruned / trials |",
        "|---|---|---|---|",
    ]
    for config, c in results["compare"].items():
        bests = ", ".join("-" if b is None else f"{b:.4g}" for b in c["best_per_seed"])
        lines.append(
            f"| {config} | {bests} | {c['trials_per_hour']:.0f} | "
            f"{sum(c['pruned'])} / {sum(c['trials'])} |"
        )
    duels = [
        (config, other, duel)
        for config, c in results["compare"].items()
        for other, duel in c.get("against", {}).items()
    ]
    if duels:
        lines += [
            "",
            "Targets: better or equal in >= 4 of 5 seeds, >= 2.5x the trials per hour.",
            "",
            "| with pruning | against | better or equal | trials/h ratio |",
            "|---|---|---|---|",
        ]
        for config, other, duel in duels:
            ratio = duel["trials_per_hour_ratio"]
            lines.append(
                f"| {config} | {other} | {duel['better_or_equal']} | "
                f"{'-' if ratio is None else f'{ratio:.2f}x'} |"
            )
    lines += [
        "",
        "fANOVA importances (mean over every study): "
        + ", ".join(f"{p} {v:.2f}" for p, v in results["importances"].items()),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.search_efficiency", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--task",
        choices=list(TASKS),
        help="the task whose shipped spec is searched (default forecast; adding with --quick)",
    )
    parser.add_argument(
        "--configs",
        help=f"comma-separated, of {','.join(CONFIGS)} (default: {','.join(DEFAULT_CONFIGS)}; "
        "tpe_hyperband,random with --quick)",
    )
    parser.add_argument("--seeds", type=positive_int, help="seeds per configuration (default 5)")
    parser.add_argument(
        "--budget-minutes", type=positive_float, help="search wall time per study (default 2)"
    )
    add_workers_option(parser)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the tiny adding task, tpe_hyperband vs random, 2 seeds, 15 s budgets; "
        "options given explicitly still apply",
    )
    parser.add_argument(
        "--out", type=Path, help="results directory (default: bench/results/search_<task>)"
    )
    args = parser.parse_args(argv)
    exit_on_sigterm()  # a stopped run leaves no server or worker behind
    defaults = (
        {"task": "adding", "configs": "tpe_hyperband,random", "seeds": 2, "budget_minutes": 0.25}
        if args.quick
        else {
            "task": "forecast",
            "configs": ",".join(DEFAULT_CONFIGS),
            "seeds": 5,
            "budget_minutes": 2.0,
        }
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    configs = args.configs.split(",")
    for c in configs:
        if c not in CONFIGS:
            parser.error(f"unknown configuration {c!r} (known: {', '.join(CONFIGS)})")
    out = args.out or REPO / "bench" / "results" / f"search_{args.task}"
    out.mkdir(parents=True, exist_ok=True)
    base = load_base_spec(args.task, args.quick)
    # What the studies rank by: the shipped spec's metric (classify's is its cross-entropy).
    metric = parse_spec(base).metric
    command = "python -m bench.search_efficiency " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    print(
        f"search_efficiency: {args.task}, {len(configs)} configurations x {args.seeds} seeds x "
        f"{args.budget_minutes:g} min -> {out}"
    )
    machine = Machine.describe()  # the code the studies run, before anything can change it
    runs: dict[str, list[StudyRun]] = {}
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="lstm-hpo-search-") as scratch,
        running_server(Path(scratch) / "data", args.workers, log=out / "serve.log") as server,
    ):
        warm_up(server, args.workers)
        # Seeds outermost: a slow drift of the machine's speed hits every configuration alike.
        for seed in range(args.seeds):
            for config in configs:
                spec = config_spec(base, config, seed)
                runs.setdefault(config, []).append(
                    run_study(server, spec, budget_s=args.budget_minutes * 60)
                )
        names = [r.study["optuna_study_name"] for rs in runs.values() for r in rs]
        found, _ = importances(server.storage_url, names)
    results: dict[str, Any] = {
        "command": command.strip(),
        "machine": to_jsonable(machine),
        "task": args.task,
        "metric": to_jsonable(metric),
        "budget_minutes": args.budget_minutes,
        "workers": args.workers,
        "compare": compare(runs, metric.direction == "maximize"),
        "importances": found,
        "studies": {c: [to_jsonable(r) for r in rs] for c, rs in runs.items()},
        "wall_minutes": (time.monotonic() - started) / 60,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot_curves(runs, f"best {metric.name} so far", out / "best_so_far.png")
    if found:
        plot_importances(found, f"{args.task}: what mattered", out / "importances.png")
    summary = markdown(results)
    (out / "summary.md").write_text(summary + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
