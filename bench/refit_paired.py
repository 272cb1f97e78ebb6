"""Does refitting on train + validation pay? A paired comparison over training seeds.

A finalist's test score after one retrain mixes the config's quality with its training
seed's luck (on the airline series the seed-to-seed spread of one config is several RMSE
points). So each best config of an evaluation run (``bench/results/<run>/results.json``,
``python -m bench.evaluate``) is trained with ``lstm-hpo train --refit --json`` under
``--seeds`` training seeds: each run is a validated fit (train only, the plain
``train``'s result) and its refit (train + validation, same seed, the validated fit's best
epochs), so the two test scores of one seed form a pair. Reported per config and over all
pairs: the mean of each, the mean paired difference with its 95% t interval and p, and in
how many pairs the refit was better, equal or worse.

    python -m bench.refit_paired bench/results/classify_shipped_refit --seeds 5 \\
        --out bench/results/refit_paired_classify

Writes ``results.json`` and ``summary.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.evaluate import task_metric
from bench.harness import (
    REPO,
    Machine,
    StudyRun,
    add_workers_option,
    machine_line,
    positive_int,
    retrain_all,
    to_jsonable,
)
from service.confirm import paired_t_test


def pairs_of(results: dict[str, Any], seeds: int, workers: int) -> list[dict[str, Any]]:
    """Train every finalist of ``results`` with ``--refit`` under seeds 0..seeds-1; one
    record per (task, family, study, seed) with both test scores (None on failure)."""
    todo: list[tuple[StudyRun, Path]] = []
    records: list[dict[str, Any]] = []
    scratch = Path(tempfile.mkdtemp(prefix="lstm-hpo-refit-"))
    for task, entry in results["tasks"].items():
        for family, studies in entry["studies"].items():
            for study in studies:
                if study.get("best_config") is None:
                    continue
                for seed in range(seeds):
                    run = StudyRun(**study)
                    run.best_config = json.loads(json.dumps(study["best_config"]))
                    assert run.best_config is not None
                    run.best_config["params"]["seed"] = seed
                    run.test_metric = task_metric(task).test_key
                    name = study["study"]["name"]
                    todo.append((run, scratch / name / f"seed{seed}"))
                    records.append({"task": task, "family": family, "study": name, "seed": seed})
    print(f"refit_paired: {len(todo)} validated fits + refits, {workers} at a time ...")
    retrain_all(todo, parallel=workers, refit=True)
    for record, (run, _) in zip(records, todo, strict=True):
        record["refit"] = run.test_value
        record["validated"] = run.retrain.get("validated_test_value")
        record["refit_epochs"] = run.retrain.get("refit_epochs")
        record["error"] = run.retrain.get("error")
    return records


def compare(records: list[dict[str, Any]], maximize: bool) -> dict[str, Any]:
    """Mean of each, the refit's mean paired gain (positive: better) with its 95% t interval
    and two-sided p (``service.confirm.paired_t_test``, the test `lstm-hpo confirm` uses),
    and counts of pairs where the refit was better, equal (within 1e-9) or worse."""
    done = [r for r in records if r["refit"] is not None and r["validated"] is not None]
    out: dict[str, Any] = {"n": len(done)}
    if not done:
        return out
    sign = 1.0 if maximize else -1.0
    gains = [sign * (r["refit"] - r["validated"]) for r in done]
    test = paired_t_test([sign * r["refit"] for r in done], [sign * r["validated"] for r in done])
    return out | {
        "validated_mean": statistics.fmean(r["validated"] for r in done),
        "refit_mean": statistics.fmean(r["refit"] for r in done),
        "gain_mean": test.mean_difference,
        "gain_ci95": (test.ci95_low, test.ci95_high),
        "p_value": test.p_value,
        "better": sum(g > 1e-9 for g in gains),
        "equal": sum(abs(g) <= 1e-9 for g in gains),
        "worse": sum(g < -1e-9 for g in gains),
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Command: `{results['command']}`  ", machine_line(results["machine"]), ""]
    for task, t in results["tasks"].items():
        lines += [
            f"#### {task} — {t['label']} ({'higher' if t['maximize'] else 'lower'} is better)",
            "",
            "| config (study) | pairs | validated fit (mean) | refit (mean) | refit gain, "
            "mean [95% CI] | p (paired t) | better / equal / worse |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, c in [*t["per_study"].items(), ("**all**", t["all"])]:
            if not c["n"]:
                lines.append(f"| {name} | 0 | | | | | |")
                continue
            low, high = c["gain_ci95"]
            interval = f" [{low:+.3g}, {high:+.3g}]" if low is not None else ""
            p = "-" if c["p_value"] is None else f"{c['p_value']:.3g}"
            lines.append(
                f"| {name} | {c['n']} | {c['validated_mean']:.4g} | {c['refit_mean']:.4g} | "
                f"{c['gain_mean']:+.3g}{interval} | {p} | "
                f"{c['better']} / {c['equal']} / {c['worse']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.refit_paired", description=__doc__)
    parser.add_argument("run", type=Path, help="an evaluation run's directory (results.json)")
    parser.add_argument("--seeds", type=positive_int, default=5, help="training seeds (5)")
    parser.add_argument("--out", type=Path, help="default: bench/results/refit_paired_<run>")
    add_workers_option(parser)
    args = parser.parse_args(argv)
    source = args.run / "results.json"
    if not source.is_file():
        parser.error(f"{source}: no such file (run python -m bench.evaluate first)")
    out = args.out or REPO / "bench" / "results" / f"refit_paired_{args.run.name}"
    out.mkdir(parents=True, exist_ok=True)
    records = pairs_of(json.loads(source.read_text()), args.seeds, args.workers)
    results: dict[str, Any] = {
        "command": "python -m bench.refit_paired " + " ".join(argv or sys.argv[1:]),
        "machine": to_jsonable(Machine.describe()),
        "records": records,
        "tasks": {},
    }
    for task in dict.fromkeys(r["task"] for r in records):
        mine = [r for r in records if r["task"] == task]
        metric = task_metric(task)
        maximize = metric.test_key == "test_acc" or metric.direction == "maximize"
        studies = dict.fromkeys(r["study"] for r in mine)
        results["tasks"][task] = {
            "label": metric.test_label,
            "maximize": maximize,
            "per_study": {
                s: compare([r for r in mine if r["study"] == s], maximize) for s in studies
            },
            "all": compare(mine, maximize),
        }
    (out / "results.json").write_text(json.dumps(to_jsonable(results), indent=1))
    summary = markdown(results)
    (out / "summary.md").write_text(summary + "\n")
    print(summary)
    failed = [r for r in records if r["error"]]
    for r in failed:
        print(f"failed: {r['study']} seed {r['seed']}: {str(r['error'])[-300:]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
