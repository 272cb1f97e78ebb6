"""The evaluation suite: what the shipped search spaces find, at equal wall-clock budget,
against other recurrent cells and classical baselines, on each task's TEST split.

For each task (``--tasks``), model family (``--families``) and search seed (``--seeds``) it
submits one study to a real ``lstm-hpo serve`` (scratch SQLite database, one local worker
process per core, one torch thread each), with the task's shipped spec
(``search_spaces/``) changed only as the family needs, and ``study.timeout_s`` =
``--budget-minutes``. Studies run one after another, so each has the whole machine.
Each study's best config is then retrained with ``lstm-hpo train`` and scored on the
test split (``--finalists checkpoint`` scores the best trial's own checkpoint instead, with
``lstm-hpo train --evaluate``: the same figures on a CPU, checked equal to the digit, and
no retraining on long tasks; ``--finalists refit`` retrains with ``lstm-hpo train --refit``,
on train + validation for the validated fit's best epochs, and reports both). Classical
baselines (``bench/baselines.py``) are computed on the same splits.

Families (each a study of its own, same budget):

- ``stacked_lstm``: the shipped space with ``num_layers >= 2``;
- ``lstm_1layer``: the shipped space with one layer (inter-layer dropout off);
- ``gru`` / ``rnn``: the shipped space with ``cell: gru`` / ``cell: rnn`` (no forget bias);
- ``shipped`` (only when named): the shipped spec as a user submits it (only the seed, the
  name and ``n_trials`` change, as for every family: the budget ends each study).

Written under ``--out`` (default ``bench/results/<quick|full>``): ``results.json`` (every
study, trial and figure), ``summary.md`` (the tables BENCHMARKS.md gathers) and one
``<task>_best_so_far.png`` per task (best validation metric against wall time, each seed
faint and the mean bold).

    python -m bench.evaluate --quick                      # ~2 minutes: the suite's smoke run
    python -m bench.evaluate --budget-minutes 60 --seeds 3
    python -m bench.evaluate --tasks adding,forecast --families stacked_lstm,gru --seeds 3
    python -m bench.evaluate --tasks adding --seeds 2 --first-seed 1  # seeds 1, 2: add to a seed 0
    python -m bench.evaluate --merge RUN_S0 RUN_S12 --out ALL  # one table over both runs
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

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
    retrain_all,
    run_study,
    running_server,
    score_checkpoint,
    seed_int,
    to_jsonable,
    warm_up,
)
from service.search_space import TASK_METRICS, load_spec_file, parse_spec

TASKS: Mapping[str, str] = {
    "adding": "adding.yaml",
    "forecast": "forecast_airline.yaml",
    "classify": "classify_japanese_vowels.yaml",
    "char_lm": "char_lm.yaml",
}
#: The comparison the issue asks for; the default ``--families``.
FAMILIES = ("stacked_lstm", "lstm_1layer", "gru", "rnn")
#: Families run only when named: ``shipped`` is the spec file as users submit it.
EXTRA_FAMILIES = ("shipped",)
KNOWN_FAMILIES = (*FAMILIES, *EXTRA_FAMILIES)

#: --quick: small data and models, so that every part of the suite runs in about 2 minutes.
QUICK_TASK: Mapping[str, Mapping[str, Any]] = {
    "adding": {"seq_len": 30, "n_train": 2000, "n_val": 500, "n_test": 500},
}
QUICK_SPACE: Mapping[str, Any] = {
    "hidden_size": {"type": "int", "low": 8, "high": 32, "log": True},
    "max_epochs": 2,
}
QUICK = {
    "tasks": ("adding",),
    "families": ("stacked_lstm", "gru"),
    "seeds": 1,
    "budget_minutes": 0.25,
}


@dataclass(frozen=True)
class Metric:
    name: str
    direction: str
    #: The test metric ``lstm-hpo train`` reports and what it is.
    test_label: str
    #: The test metric the tables show when it is not the ranked one's (classify is
    #: searched on cross-entropy and reported as accuracy, as the literature reports it).
    test_key: str | None = None


def task_metric(kind: str) -> Metric:
    m = TASK_METRICS[kind]
    label = {
        "adding": "test MSE",
        "forecast": "test RMSE (thousands of passengers)",
        "classify": "test accuracy",
        "char_lm": "test cross-entropy (nats/char)",
    }[kind]
    if kind == "classify":
        return Metric(m.name, m.direction, label, test_key="test_acc")
    return Metric(m.name, m.direction, label)


def family_spec(base: Mapping[str, Any], family: str, seed: int, name: str) -> dict[str, Any]:
    """``base`` (a shipped spec as a mapping) changed as ``family`` needs, seeded ``seed``."""
    spec: dict[str, Any] = json.loads(json.dumps(base))
    space: dict[str, Any] = spec["space"]
    layers = space.get("num_layers", 2)
    top = layers.get("high", 2) if isinstance(layers, dict) else int(layers)
    if family == "stacked_lstm":
        space["cell"] = "lstm"
        space["num_layers"] = {"type": "int", "low": 2, "high": top} if top > 2 else 2
    elif family == "lstm_1layer":
        space["cell"] = "lstm"
        space["num_layers"] = 1
        space["dropout"] = 0.0  # between layers: with one there is none
        space.pop("hidden_mode", None)
    elif family in ("gru", "rnn"):
        space["cell"] = family
        space.pop("forget_bias", None)  # LSTM only
    elif family != "shipped":
        raise ValueError(f"unknown family {family!r} (known: {', '.join(KNOWN_FAMILIES)})")
    spec["name"] = name
    study = spec.setdefault("study", {})
    study["seed"] = seed
    study["n_trials"] = 10_000  # the wall-clock budget ends the study
    return spec


def load_base_spec(task: str, quick: bool) -> dict[str, Any]:
    """The shipped spec of ``task`` as a mapping (validated), shrunk for ``--quick``."""
    path = REPO / "search_spaces" / TASKS[task]
    raw: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    load_spec_file(path)  # the shipped file itself is valid
    if quick:
        raw["task"].update(QUICK_TASK.get(task, {}))
        raw["space"].update(QUICK_SPACE)
        raw["study"].pop("pruner_warmup_epochs", None)  # longer than the quick trials
    parse_spec(raw)  # fail here, not in the server, when a change made it invalid
    return raw


def summarise_family(
    runs: Sequence[StudyRun], test_direction: str, val_direction: str
) -> dict[str, Any]:
    """Mean and spread (sample standard deviation) over seeds of the test and val scores;
    the directions may differ (classify is ranked by cross-entropy, scored by accuracy)."""
    tests = [r.test_value for r in runs if r.test_value is not None]
    vals = [r.best_value for r in runs if r.best_value is not None]

    def stats(xs: list[float], direction: str) -> dict[str, float | int | None]:
        return {
            "mean": statistics.fmean(xs) if xs else None,
            "std": statistics.stdev(xs) if len(xs) > 1 else 0.0 if xs else None,
            "best": (max(xs) if direction == "maximize" else min(xs)) if xs else None,
            "n": len(xs),
        }

    validated = [
        r.retrain["validated_test_value"]
        for r in runs
        if r.retrain.get("validated_test_value") is not None
    ]
    return {
        "test": stats(tests, test_direction),
        "val": stats(vals, val_direction),
        # --finalists refit: the same configs' validated fits (trained on train only).
        "validated_test": stats(validated, test_direction),
        "trials_per_hour": statistics.fmean(r.trials_per_hour for r in runs) if runs else 0.0,
        "trials": sum(sum(r.counts.values()) for r in runs),
    }


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def markdown(results: dict[str, Any]) -> str:
    """The tables BENCHMARKS.md gathers: one per task."""
    lines = [f"Command: `{results['command']}`  "]
    for source in results.get("sources", ()):  # --merge: the runs it gathers
        lines += [f"- from `{source['command']}`  ", f"  {machine_line(source['machine'])}  "]
    if "sources" not in results:
        lines.append(f"{machine_line(results['machine'])}  ")
    seeds = ", ".join(map(str, results.get("seed_list") or range(results["seeds"])))
    lines += [
        f"Budget: {results['budget_minutes']:g} min of search per study, "
        f"{results['workers']} worker process(es) x 1 thread; seeds {seeds}.",
        "",
    ]
    for task, t in results["tasks"].items():
        metric = t["metric"]
        better = "higher" if metric["direction"] == "maximize" else "lower"
        lines += [
            f"#### {task} — {metric['test_label']} ({better} is better)",
            "",
            "| model | test (mean ± sd over seeds) | best seed | "
            f"val {t.get('ranked', metric['name'])} best (mean) | "
            "trials/h | trials |",
            "|---|---|---|---|---|---|",
        ]
        for family, s in t["families"].items():
            test, val = s["test"], s["val"]
            spread = f" ± {_fmt(test['std'], 2)}" if test["n"] > 1 else ""
            lines.append(
                f"| {family} (searched) | {_fmt(test['mean'])}{spread} (n={test['n']}) | "
                f"{_fmt(test['best'])} | {_fmt(val['mean'])} | "
                f"{s['trials_per_hour']:.0f} | {s['trials']} |"
            )
            fit = s.get("validated_test") or {"n": 0}
            if fit["n"]:  # --finalists refit: the row above is the refit's
                spread = f" ± {_fmt(fit['std'], 2)}" if fit["n"] > 1 else ""
                lines.append(
                    f"| {family} (validated fit, not refit) | {_fmt(fit['mean'])}{spread} "
                    f"(n={fit['n']}) | {_fmt(fit['best'])} | | | |"
                )
        for name, b in t["baselines"].items():
            lines.append(f"| {name} (baseline) | {_fmt(b['test'])} | | {_fmt(b.get('val'))} | | |")
        for ref in t["references"]:
            lines.append(
                f"| {ref['model']} (published: {ref['task']}) | {_fmt(ref['value'])} | | | | |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(
    task: str,
    runs: Mapping[str, Sequence[StudyRun]],
    metric: Metric,
    path: Path,
    *,
    budget_minutes: float,
    baseline: tuple[str, float] | None = None,
) -> None:
    """Best validation metric so far against wall time, per family (seeds faint, their mean
    bold), with the budget (dotted) and the primary baseline's validation score (dashed)
    for scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (family, family_runs) in enumerate(runs.items()):
        color = f"C{i}"
        curves = [_step_curve(run) for run in family_runs if run.best_so_far]
        several = len(curves) > 1
        for j, (xs, ys) in enumerate(curves):
            ax.step(
                xs,
                ys,
                where="post",
                color=color,
                alpha=0.3 if several else 1,
                linewidth=1 if several else 1.5,
                label=family if j == 0 and not several else None,
            )
        if several:
            xs, ys = mean_curve(curves)
            ax.step(xs, ys, where="post", color=color, linewidth=2.2, label=f"{family} (mean)")
    ax.axvline(budget_minutes, color="grey", linestyle=":", label="budget")
    if baseline is not None:
        ax.axhline(baseline[1], color="black", linestyle="--", label=f"{baseline[0]} (val)")
    ax.set_xlabel("wall time of the search (minutes)")
    ax.set_ylabel(f"best {metric.name} so far")
    ax.set_title(f"{task}: best-so-far by model family")
    if metric.name in ("val_mse", "val_rmse"):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _step_curve(run: StudyRun) -> tuple[list[float], list[float]]:
    """A run's best-so-far as a step curve in minutes, held to the end of its search."""
    xs = [t / 60 for t, _ in run.best_so_far] + [run.wall_s / 60]
    ys = [v for _, v in run.best_so_far] + [run.best_so_far[-1][1]]
    return xs, ys


def mean_curve(
    curves: Sequence[tuple[Sequence[float], Sequence[float]]],
) -> tuple[list[float], list[float]]:
    """The mean of step curves (each ``(xs, ys)``, ys held after each x) at every x of any
    of them, from the time every curve has a value to the time the first one ends."""
    start = max(xs[0] for xs, _ in curves)
    end = min(xs[-1] for xs, _ in curves)
    grid = sorted({x for xs, _ in curves for x in xs if start <= x <= end})
    means = []
    for x in grid:
        held = [ys[max(i for i, t in enumerate(xs) if t <= x)] for xs, ys in curves]
        means.append(statistics.fmean(held))
    return grid, means


def references_for(task: str) -> list[dict[str, Any]]:
    from bench.baselines import PUBLISHED_REFERENCES

    prefix = {
        "adding": "adding",
        "forecast": "airline",
        "classify": "japanese_vowels",
        "char_lm": "char",
    }[task]
    return [to_jsonable(ref) for key, ref in PUBLISHED_REFERENCES.items() if key.startswith(prefix)]


def primary_baseline(found: Mapping[str, Any], maximize: bool) -> tuple[str, float] | None:
    """The classical baseline hardest to beat on the validation split, for the plot."""
    scored = [(name, b["val"]) for name, b in found.items() if b.get("val") is not None]
    if not scored:
        return None
    return (max if maximize else min)(scored, key=lambda nb: float(nb[1]))


def baselines(task: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    from bench.baselines import baselines_for

    parsed = parse_spec(spec)
    return {name: to_jsonable(score) for name, score in baselines_for(parsed.task).items()}


def report_task(
    task: str,
    base: Mapping[str, Any],
    runs: Mapping[str, Sequence[StudyRun]],
    found: Mapping[str, Mapping[str, float]],
    *,
    out: Path,
    budget_minutes: float,
    baselines_found: dict[str, Any] | None = None,
    importances_n: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """One task's entry of results.json, and its plots under ``out``. ``found``: each
    family's mean importances, over ``importances_n[family]`` studies (:func:`merge`
    weighs by it; default: every study of the family)."""
    metric = task_metric(task)
    if baselines_found is None:
        baselines_found = baselines(task, base)
    # What the studies ranked by (the spec's metric): the curves' unit. The classical
    # baselines are scored in the test metric's unit, drawn only when that is the same.
    ranked = parse_spec(base).metric
    same_unit = ranked.name == metric.name
    plot(
        task,
        runs,
        Metric(ranked.name, ranked.direction, metric.test_label),
        out / f"{task}_best_so_far.png",
        budget_minutes=budget_minutes,
        baseline=primary_baseline(baselines_found, metric.direction == "maximize")
        if same_unit
        else None,
    )
    main_family = next((f for f in ("stacked_lstm", *runs) if found.get(f)), None)
    if main_family is not None:
        plot_importances(
            found[main_family],
            f"{task} ({main_family}): what mattered",
            out / f"{task}_importances.png",
        )
    return {
        "metric": to_jsonable(metric),
        "ranked": ranked.name,
        "spec": base,
        "families": {
            f: summarise_family(r, metric.direction, ranked.direction) for f, r in runs.items()
        },
        "baselines": baselines_found,
        "references": references_for(task),
        "importances": found,
        "importances_n": {
            f: (importances_n or {}).get(f, len(runs.get(f, ()))) for f in found if found[f]
        },
        "studies": {f: [to_jsonable(run) for run in r] for f, r in runs.items()},
    }


def rescore(out: Path, workers: int) -> dict[str, Any]:
    """Retrain the finalists of ``out/results.json`` that have no test score (a retrain
    that failed), then rebuild its tables and plots; the searches are not run again."""
    results: dict[str, Any] = json.loads((out / "results.json").read_text())
    with tempfile.TemporaryDirectory(prefix="lstm-hpo-rescore-") as scratch:
        for task, entry in results["tasks"].items():
            runs = {f: [StudyRun(**d) for d in ds] for f, ds in entry["studies"].items()}
            for family_runs in runs.values():
                for run in family_runs:
                    run.test_metric = task_metric(task).test_key
            todo = [
                (run, Path(scratch) / task / family / f"s{i}")
                for family, family_runs in runs.items()
                for i, run in enumerate(family_runs)
                if run.test_value is None
            ]
            print(f"  {task}: retraining {len(todo)} finalist(s) without a test score ...")
            retrain_all(todo, parallel=workers, refit=results.get("finalists") == "refit")
            results["tasks"][task] = report_task(
                task,
                entry["spec"],
                runs,
                entry.get("importances", {}),
                out=out,
                budget_minutes=results["budget_minutes"],
                baselines_found=entry.get("baselines"),
                importances_n=entry.get("importances_n"),
            )
    results["rescored"] = Machine.describe().date
    return results


def run_seed(run: Mapping[str, Any]) -> int | None:
    """The search seed of a study in results.json: recorded as ``study.seed`` since
    2026-12-01, before that only in the study's name (``eval-<task>-<family>-s<seed>``)."""
    study = run.get("study") or {}
    if study.get("seed") is not None:
        return int(study["seed"])
    named = re.fullmatch(r"eval-.+-s(\d+)", str(study.get("name", "")))
    return int(named.group(1)) if named else None


def _gather(
    source: Path,
    results: Mapping[str, Any],
    *,
    specs: dict[str, tuple[Path, dict[str, Any]]],
    runs: dict[str, dict[str, list[StudyRun]]],
    weighed: dict[str, dict[str, list[tuple[Mapping[str, float], int]]]],
    where: dict[tuple[str, str, int | None], Path],
) -> None:
    """Add one run's studies and importances to :func:`merge`'s tables."""
    for task, entry in results["tasks"].items():
        spec_from, first_entry = specs.setdefault(task, (source, entry))
        if entry["spec"] != first_entry["spec"]:
            raise ValueError(
                f"{source}: the {task} spec differs from {spec_from}'s (the shipped spec "
                "changed between the runs): their studies searched different spaces"
            )
        for family, studies in entry["studies"].items():
            for study in studies:
                key = (task, family, run_seed(study))
                if key in where:
                    raise ValueError(
                        f"{source}: {task} {family} seed {key[2]} is in {where[key]} too"
                    )
                where[key] = source
                runs.setdefault(task, {}).setdefault(family, []).append(StudyRun(**study))
            found = (entry.get("importances") or {}).get(family)
            if found:
                n = (entry.get("importances_n") or {}).get(family, len(studies))
                weighed.setdefault(task, {}).setdefault(family, []).append((found, n))


def merge(sources: Sequence[Path], out: Path) -> dict[str, Any]:
    """One results.json from several runs of the suite (``--first-seed`` splits a long
    suite across runs or machines; families may be split too): each task's studies side
    by side per family, importances averaged over every study they came from, tables and
    plots rebuilt under ``out``. The searches are not run again.

    Raises ValueError (naming the run and what differs) for a run without results.json;
    runs of another budget or worker count (no longer an equal budget); a refit run with
    one that is not (they score different models; checkpoint and retrain score the same);
    a task whose spec differs (the shipped spec changed between runs); a (task, family,
    seed) in two runs.
    """
    loaded: list[tuple[Path, dict[str, Any]]] = []
    for source in sources:
        path = source / "results.json"
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: cannot read it ({err})") from None
        if not (
            isinstance(results, dict)
            and isinstance(results.get("tasks"), dict)
            and all(k in results for k in ("budget_minutes", "workers", "command", "machine"))
            and all(
                isinstance(t, dict) and {"spec", "studies"} <= t.keys()
                for t in results["tasks"].values()
            )
        ):
            raise ValueError(f"{path}: not the results.json of a bench.evaluate run")
        loaded.append((source, results))
    (first_dir, first), rest = loaded[0], loaded[1:]
    for source, results in rest:
        for setting in ("budget_minutes", "workers"):
            if results.get(setting) != first.get(setting):
                raise ValueError(
                    f"{source}: {setting} {results.get(setting)} but {first.get(setting)} in "
                    f"{first_dir}: "
                    "only runs at an equal budget compare"
                )
        if (results.get("finalists") == "refit") != (first.get("finalists") == "refit"):
            raise ValueError(
                f"{source}: finalists {results.get('finalists')} but {first.get('finalists')} "
                f"in {first_dir}: a refit scores another model than the search's"
            )
    specs: dict[str, tuple[Path, dict[str, Any]]] = {}
    runs: dict[str, dict[str, list[StudyRun]]] = {}
    weighed: dict[str, dict[str, list[tuple[Mapping[str, float], int]]]] = {}
    where: dict[tuple[str, str, int | None], Path] = {}
    for source, results in loaded:
        try:
            _gather(source, results, specs=specs, runs=runs, weighed=weighed, where=where)
        except (AttributeError, KeyError, TypeError) as err:  # a damaged inside
            raise ValueError(
                f"{source / 'results.json'}: not the results.json of a bench.evaluate run "
                f"({type(err).__name__}: {err})"
            ) from None
    merged: dict[str, Any] = {
        "command": "",
        "machine": first["machine"],
        "sources": [
            {"dir": str(d), "command": r["command"], "machine": r["machine"]} for d, r in loaded
        ],
        "budget_minutes": first["budget_minutes"],
        "workers": first["workers"],
        "seeds": len({key[2] for key in where}),
        "seed_list": sorted({key[2] for key in where if key[2] is not None}),
        "finalists": first.get("finalists"),
        "tasks": {},
    }
    out.mkdir(parents=True, exist_ok=True)  # only once the runs are known to merge
    for task, families in runs.items():
        found, counts = {}, {}
        for family, parts in weighed.get(task, {}).items():
            counts[family] = sum(n for _, n in parts)
            params = {p for importance, _ in parts for p in importance}
            means = {
                p: sum(imp.get(p, 0.0) * n for imp, n in parts) / counts[family] for p in params
            }
            found[family] = dict(sorted(means.items(), key=lambda kv: -kv[1]))
        merged["tasks"][task] = report_task(
            task,
            specs[task][1]["spec"],
            families,
            found,
            out=out,
            budget_minutes=first["budget_minutes"],
            baselines_found=specs[task][1].get("baselines"),
            importances_n=counts,
        )
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the tiny adding task (T=30), stacked_lstm and gru, 1 seed, 15 s budgets "
        "(~2 minutes); other options still apply",
    )
    parser.add_argument(
        "--budget-minutes", type=positive_float, help="search wall time per study (default 60)"
    )
    parser.add_argument(
        "--seeds", type=positive_int, help="search seeds per (task, family) (default 3)"
    )
    parser.add_argument(
        "--first-seed",
        type=seed_int,
        default=0,
        help="the first search seed (default 0): --first-seed 3 --seeds 2 runs seeds 3 and 4, "
        "so a long suite can be split across runs or machines and its seeds added later",
    )
    parser.add_argument("--tasks", help=f"comma-separated, of {','.join(TASKS)} (default: all)")
    parser.add_argument(
        "--families",
        help=f"comma-separated, of {','.join(KNOWN_FAMILIES)} (default: "
        f"{','.join(FAMILIES)}; shipped = the spec file unchanged)",
    )
    add_workers_option(parser)
    parser.add_argument(
        "--out", type=Path, help="results directory (default: bench/results/quick or full)"
    )
    parser.add_argument(
        "--finalists",
        choices=["retrain", "checkpoint", "refit"],
        default="retrain",
        help="score each study's best config on the test split by retraining it with "
        "`lstm-hpo train` (default), by evaluating its trial's own checkpoint "
        "(`train --evaluate`: the same weights on a CPU, minutes faster on long tasks), or "
        "by `train --refit` (on train + validation for the validated fit's best epochs; "
        "the validated fit's test score is reported beside it)",
    )
    parser.add_argument(
        "--rescore",
        type=Path,
        metavar="DIR",
        help="no search: retrain the finalists of DIR/results.json that have no test score, "
        "then rewrite its tables and plots",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="no search: gather the results.json of several runs (seeds or families split "
        "across runs or machines, at one budget) into --out, with their tables and plots",
    )
    args = parser.parse_args(argv)
    if args.merge is not None:
        if args.out is None:
            parser.error("--merge needs --out: where the merged results go")
        if args.out.resolve() in {d.resolve() for d in args.merge}:
            parser.error("--out must be a new directory, not one of the --merge runs")
        with suppress(OSError, ValueError, TypeError):  # nothing readable: a new one
            held = json.loads((args.out / "results.json").read_text(encoding="utf-8"))
            if "sources" not in held:
                parser.error(f"--out {args.out} holds a run's results: merge into a new directory")
        try:
            merged = merge(args.merge, args.out)
        except ValueError as err:
            parser.error(str(err))
        merged["command"] = "python -m bench.evaluate " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        (args.out / "results.json").write_text(json.dumps(merged, indent=1))
        summary = markdown(merged)
        (args.out / "summary.md").write_text(summary + "\n")
        print(summary)
        return 0
    exit_on_sigterm()  # a stopped run leaves no server or worker behind
    if args.rescore is not None:
        rescored = rescore(args.rescore, args.workers)
        (args.rescore / "results.json").write_text(json.dumps(rescored, indent=1))
        summary = markdown(rescored)
        (args.rescore / "summary.md").write_text(summary + "\n")
        print(summary)
        return 0

    defaults = (
        QUICK
        if args.quick
        else {
            "tasks": tuple(TASKS),
            "families": FAMILIES,
            "seeds": 3,
            "budget_minutes": 60.0,
        }
    )
    tasks = args.tasks.split(",") if args.tasks else list(defaults["tasks"])  # type: ignore[call-overload]
    families = args.families.split(",") if args.families else list(defaults["families"])  # type: ignore[call-overload]
    seeds = args.seeds or int(defaults["seeds"])  # type: ignore[call-overload]
    budget_min = args.budget_minutes or float(defaults["budget_minutes"])  # type: ignore[arg-type]
    for name, known in (("task", TASKS), ("family", KNOWN_FAMILIES)):
        for value in tasks if name == "task" else families:
            if value not in known:
                parser.error(f"unknown {name} {value!r} (known: {', '.join(known)})")
    out = args.out or REPO / "bench" / "results" / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.evaluate " + " ".join(argv if argv is not None else sys.argv[1:])
    seed_list = list(range(args.first_seed, args.first_seed + seeds))
    total = len(tasks) * len(families) * seeds * budget_min
    print(
        f"evaluate: {len(tasks)} task(s) x {len(families)} family(ies) x {seeds} seed(s) x "
        f"{budget_min:g} min = {total:g} min of search, then retraining; -> {out}"
    )

    results: dict[str, Any] = {
        "command": command.strip(),
        "machine": to_jsonable(Machine.describe()),
        "budget_minutes": budget_min,
        "workers": args.workers,
        "seeds": seeds,
        "seed_list": seed_list,
        "finalists": args.finalists,
        "tasks": {},
    }
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="lstm-hpo-eval-") as scratch,
        running_server(Path(scratch) / "data", args.workers, log=out / "serve.log") as server,
    ):
        warm_up(server, args.workers)  # worker start-up is not part of any study's budget
        for task in tasks:
            base = load_base_spec(task, args.quick)
            runs: dict[str, list[StudyRun]] = {}
            for family in families:
                for seed in seed_list:
                    name = f"eval-{task}-{family}-s{seed}"
                    spec = family_spec(base, family, seed, name)
                    run = run_study(server, spec, budget_s=budget_min * 60)
                    run.test_metric = task_metric(task).test_key
                    run.study["seed"] = seed  # for --merge
                    runs.setdefault(family, []).append(run)
            finalists = [
                (run, Path(scratch) / "runs" / task / family / f"s{seed}")
                for family, family_runs in runs.items()
                for seed, run in zip(seed_list, family_runs, strict=True)
            ]
            if args.finalists == "checkpoint":
                print(f"  scoring the checkpoints of {len(finalists)} finalists of {task} ...")
                for run, where in finalists:
                    score_checkpoint(server, run, where)
            else:
                how = "refitting" if args.finalists == "refit" else "retraining"
                print(f"  {how} {len(finalists)} finalists of {task} ...")
                retrain_all(finalists, parallel=args.workers, refit=args.finalists == "refit")
            found, counts = {}, {}
            for family, family_runs in runs.items():
                names = [r.study["optuna_study_name"] for r in family_runs]
                found[family], counts[family] = importances(server.storage_url, names)
            results["tasks"][task] = report_task(
                task, base, runs, found, out=out, budget_minutes=budget_min, importances_n=counts
            )
            (out / "results.json").write_text(json.dumps(results, indent=1))
    results["wall_minutes"] = (time.monotonic() - started) / 60
    (out / "results.json").write_text(json.dumps(results, indent=1))
    summary = markdown(results)
    (out / "summary.md").write_text(summary + "\n")
    print(summary)
    print(f"evaluate: done in {results['wall_minutes']:.1f} min; {out}/results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
