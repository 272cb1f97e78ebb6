"""The evaluation suite's pure parts: family specs, the sampler comparison, the tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.evaluate import KNOWN_FAMILIES, TASKS, family_spec, load_base_spec
from bench.harness import StudyRun
from bench.search_efficiency import CONFIGS, compare, config_spec, markdown
from service.search_space import CategoricalDistribution, IntDistribution, parse_spec


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("family", KNOWN_FAMILIES)
def test_every_family_of_every_shipped_spec_is_a_valid_study(task: str, family: str) -> None:
    base = load_base_spec(task, quick=False)
    spec = parse_spec(family_spec(base, family, 3, "x"))
    assert spec.study.seed == 3 and spec.name == "x"
    if family == "shipped":  # the file as users submit it: the same space, the same pruner
        shipped = parse_spec(base)
        assert spec.space == shipped.space and spec.study.pruner == shipped.study.pruner
        return
    cell = spec.space["cell"]
    assert cell == ("lstm" if family in ("stacked_lstm", "lstm_1layer") else family)
    layers = spec.space["num_layers"]
    if family == "stacked_lstm":
        low = layers.low if isinstance(layers, IntDistribution) else layers
        assert isinstance(low, int) and low >= 2
    elif family == "lstm_1layer":
        assert layers == 1 and spec.space["dropout"] == 0.0
    else:
        assert "forget_bias" not in spec.space


def test_an_unknown_family_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"'lstm2'.*shipped"):
        family_spec(load_base_spec("adding", quick=False), "lstm2", 0, "x")


def test_the_shipped_char_lm_spec_searches_stateful_bptt_on_english_prose() -> None:
    spec = parse_spec(load_base_spec("char_lm", quick=False))
    assert spec.task.kind == "char_lm" and spec.task.dataset == "moby_dick"
    stateful = spec.space["stateful"]
    assert isinstance(stateful, CategoricalDistribution) and True in stateful.choices


def test_the_shipped_airline_spec_is_the_1960_hold_out() -> None:
    task = parse_spec(load_base_spec("forecast", quick=False)).task
    assert task.kind == "forecast"
    assert (task.test_size, task.horizon) == (12, 12)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_search_configurations_set_sampler_pruner_and_seed(config: str) -> None:
    # The shipped adding spec has a pruner warm-up: a configuration without a pruner must
    # still be a valid study.
    spec = parse_spec(config_spec(load_base_spec("adding", quick=False), config, 4))
    assert (spec.study.sampler, spec.study.pruner) == CONFIGS[config]
    assert spec.study.seed == 4


def run(best: float | None, trials: int, pruned: int, wall_s: float = 60.0) -> StudyRun:
    return StudyRun(
        study={},
        trials=[],
        best_so_far=[],
        best_value=best,
        best_config=None,
        wall_s=wall_s,
        trials_per_hour=trials / wall_s * 3600,
        counts={"complete": trials - pruned, "pruned": pruned, "failed": 0},
    )


def test_compare_counts_seeds_where_each_pruned_tpe_is_better_or_equal() -> None:
    runs = {
        "tpe_hyperband": [run(0.10, 30, 20), run(0.20, 30, 20), run(None, 30, 30)],
        "tpe_sha": [run(0.05, 60, 50), run(0.30, 60, 50), run(0.20, 60, 50)],
        "tpe": [run(0.10, 10, 0), run(0.15, 10, 0), run(0.30, 10, 0)],
        "random": [run(0.12, 12, 0), run(0.40, 12, 0)],  # one seed short: compared on 2
    }
    minimized = compare(runs, maximize=False)
    hb = minimized["tpe_hyperband"]["against"]
    assert hb["tpe"]["better_or_equal"] == "1/3"  # tie yes, worse, none
    assert hb["tpe"]["trials_per_hour_ratio"] == pytest.approx(3.0)
    assert hb["random"]["better_or_equal"] == "2/2"
    assert hb["random"]["trials_per_hour_ratio"] == pytest.approx(2.5)
    assert minimized["tpe_sha"]["against"]["tpe"]["better_or_equal"] == "2/3"
    assert minimized["tpe_sha"]["against"]["tpe"]["trials_per_hour_ratio"] == pytest.approx(6.0)
    assert set(hb) == {"tpe", "random"}  # pruned configurations are not opponents
    assert "against" not in minimized["tpe"]
    assert minimized["tpe_hyperband"]["pruned"] == [20, 20, 30]
    maximized = compare(runs, maximize=True)
    assert maximized["tpe_hyperband"]["against"]["tpe"]["better_or_equal"] == "2/3"


def test_the_summary_tables_each_pruned_configuration_against_each_unpruned_one() -> None:
    runs = {"tpe_median": [run(0.1, 40, 10)], "tpe": [run(0.2, 10, 0)]}
    machine = {
        "cores": 2,
        "cpu": "x",
        "gpu": None,
        "python": "3.11",
        "torch": "2.13",
        "date": "d",
        "commit": "c",
    }
    results = {
        "command": "c",
        "machine": machine,
        "task": "classify",
        "budget_minutes": 2.0,
        "workers": 2,
        "compare": compare(runs, maximize=False),
        "importances": {"lr": 0.5},
    }
    lines = markdown(results).splitlines()
    assert "| tpe_median | 0.1 | 2400 | 10 / 40 |" in lines
    assert "| tpe_median | tpe | 1/1 | 4.00x |" in lines


def test_a_refit_family_reports_the_refit_and_its_validated_fits_side_by_side() -> None:
    """--finalists refit: the family's test figures are the refits'; the validated fits'
    (same configs, trained on train only) are summarised beside them, and only then."""
    from bench.evaluate import summarise_family

    refit = [run(0.05, 10, 2), run(0.04, 10, 2)]
    for r, (refit_acc, fit_acc) in zip(refit, [(0.98, 0.97), (0.99, 0.96)], strict=True):
        r.test_value = refit_acc
        r.retrain = {"how": "refit", "test_value": refit_acc, "validated_test_value": fit_acc}
    s = summarise_family(refit, "maximize", "minimize")
    assert s["test"]["mean"] == pytest.approx(0.985) and s["test"]["best"] == 0.99
    assert s["validated_test"]["mean"] == pytest.approx(0.965)
    assert (s["validated_test"]["best"], s["validated_test"]["n"]) == (0.97, 2)

    plain = run(0.05, 10, 2)
    plain.test_value = 0.97
    assert summarise_family([plain], "maximize", "minimize")["validated_test"]["n"] == 0


def test_refit_pairs_are_compared_per_seed_in_the_better_direction() -> None:
    """bench.refit_paired: a gain is the refit's improvement (lower RMSE, higher accuracy),
    tested paired; failed runs are left out of the pairs."""
    from bench.refit_paired import compare

    rmse: list[dict[str, Any]] = [
        {"validated": 20.0, "refit": 18.0},
        {"validated": 22.0, "refit": 21.0},
        {"validated": 19.0, "refit": 19.0},
        {"validated": 25.0, "refit": None},  # a refit that failed
    ]
    c = compare(rmse, maximize=False)
    assert c["n"] == 3 and (c["better"], c["equal"], c["worse"]) == (2, 1, 0)
    assert c["gain_mean"] == pytest.approx(1.0)  # RMSE fell by 1 on average
    assert c["gain_ci95"][0] < 1.0 < c["gain_ci95"][1] and 0.0 < c["p_value"] < 1.0
    assert (c["validated_mean"], c["refit_mean"]) == (pytest.approx(61 / 3), pytest.approx(58 / 3))

    acc = compare([{"validated": 0.97, "refit": 0.96}, {"validated": 0.98, "refit": 0.97}], True)
    assert acc["gain_mean"] == pytest.approx(-0.01) and acc["worse"] == 2
    assert compare([{"validated": None, "refit": 0.9}], True) == {"n": 0}


def _suite_run(out: Path, studies: dict[str, list[tuple[int, float]]], **settings: Any) -> Path:
    """A results.json as `bench.evaluate` writes it: adding, ``studies`` = family -> (seed,
    test value) per study, each family's importances ranking lr by its first seed."""
    from bench.evaluate import load_base_spec, report_task

    runs: dict[str, list[StudyRun]] = {}
    found: dict[str, dict[str, float]] = {}
    for family, seeded in studies.items():
        for seed, test in seeded:
            r = run(test * 10, 4, 1)
            # As run_study reads a study back (no spec); the seed in its name, as
            # bench.evaluate names it (and since 2026-12-01 as "seed" too).
            r.study = {"name": f"eval-adding-{family}-s{seed}", "optuna_study_name": "x"}
            if family == "gru":
                r.study["seed"] = seed
            r.best_so_far = [(10.0, test * 10)]
            r.test_value = test
            runs.setdefault(family, []).append(r)
        lr = 0.2 + 0.1 * seeded[0][0]
        found[family] = {"lr": lr, "hidden_size": 1 - lr}
    out.mkdir()
    results = {
        "command": f"python -m bench.evaluate --out {out.name}",
        "machine": {
            "cores": 2,
            "cpu": "x",
            "gpu": None,
            "python": "3",
            "torch": "2",
            "date": "2026-12-01",
            "commit": out.name,
        },
        "budget_minutes": 25.0,
        "workers": 2,
        "seeds": 1,
        "finalists": "checkpoint",
        "tasks": {
            "adding": report_task(
                "adding",
                load_base_spec("adding", quick=False),
                runs,
                found,
                out=out,
                budget_minutes=25.0,
                baselines_found={},
            )
        },
    } | settings
    (out / "results.json").write_text(json.dumps(results))
    return out


def test_merge_gathers_seeds_and_families_split_across_runs(tmp_path: Path) -> None:
    from bench.evaluate import main

    a = _suite_run(tmp_path / "a", {"stacked_lstm": [(1, 0.001)]})
    b = _suite_run(tmp_path / "b", {"stacked_lstm": [(2, 0.003)], "gru": [(0, 0.5)]})

    assert main(["--merge", str(a), str(b), "--out", str(tmp_path / "all")]) == 0

    merged = json.loads((tmp_path / "all" / "results.json").read_text())
    adding = merged["tasks"]["adding"]
    stacked = adding["families"]["stacked_lstm"]["test"]
    assert (stacked["n"], stacked["best"]) == (2, 0.001)
    assert stacked["mean"] == pytest.approx(0.002)
    assert adding["families"]["gru"]["test"]["n"] == 1
    # Weighed by the studies each mean is over: (0.3 + 0.4) / 2.
    assert adding["importances"]["stacked_lstm"]["lr"] == pytest.approx(0.35)
    assert adding["importances_n"] == {"stacked_lstm": 2, "gru": 1}
    assert merged["seed_list"] == [0, 1, 2]
    summary = (tmp_path / "all" / "summary.md").read_text()
    assert "- from `python -m bench.evaluate --out a`" in summary
    assert "commit b." in summary
    assert "| stacked_lstm (searched) | 0.002 ± 0.0014 (n=2) | 0.001 |" in summary
    assert (tmp_path / "all" / "adding_best_so_far.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("other", "settings", "says"),
    [
        ({"stacked_lstm": [(2, 0.1)]}, {"budget_minutes": 15.0}, "budget_minutes 15.0 but 25.0"),
        ({"stacked_lstm": [(2, 0.1)]}, {"workers": 1}, "workers 1 but 2"),
        ({"stacked_lstm": [(2, 0.1)]}, {"finalists": "refit"}, "a refit scores another"),
        ({"stacked_lstm": [(1, 0.1)]}, {}, "adding stacked_lstm seed 1 is in"),
    ],
    ids=["budget", "workers", "refit", "same-seed"],
)
def test_merge_refuses_runs_that_do_not_compare(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    other: dict[str, list[tuple[int, float]]],
    settings: dict[str, Any],
    says: str,
) -> None:
    from bench.evaluate import main

    a = _suite_run(tmp_path / "a", {"stacked_lstm": [(1, 0.001)]})
    b = _suite_run(tmp_path / "b", other, **settings)

    with pytest.raises(SystemExit) as exited:
        main(["--merge", str(a), str(b), "--out", str(tmp_path / "all")])

    assert exited.value.code == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "all" / "results.json").exists()


def test_merge_refuses_a_changed_spec_a_missing_run_and_no_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench.evaluate import main

    a = _suite_run(tmp_path / "a", {"stacked_lstm": [(1, 0.001)]})
    b = _suite_run(tmp_path / "b", {"stacked_lstm": [(2, 0.1)]})
    changed = json.loads((b / "results.json").read_text())
    changed["tasks"]["adding"]["spec"]["space"]["max_epochs"] = 99
    (b / "results.json").write_text(json.dumps(changed))

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "results.json").write_text("[]")
    inside = tmp_path / "inside"
    inside.mkdir()
    broken = json.loads((b / "results.json").read_text())
    broken["tasks"]["adding"]["studies"] = {"stacked_lstm": "x"}
    (inside / "results.json").write_text(json.dumps(broken))
    other_run = _suite_run(tmp_path / "other", {"gru": [(5, 0.2)]})
    all_ = str(tmp_path / "all")
    cases: list[tuple[list[str], str]] = [
        ([str(a), str(b), "--out", all_], "the adding spec differs"),
        ([str(a), str(tmp_path / "nowhere"), "--out", all_], "cannot read it"),
        ([str(a), str(damaged), "--out", all_], "not the results.json of a bench.evaluate run"),
        ([str(inside), "--out", all_], "not the results.json of a bench.evaluate run"),
        ([str(a), str(b)], "--merge needs --out"),
        ([str(a), str(b), "--out", str(a)], "--out must be a new directory"),
        ([str(a), str(b), "--out", str(other_run)], "holds a run's results"),
    ]
    for args, says in cases:
        with pytest.raises(SystemExit) as exited:
            main(["--merge", *args])
        assert exited.value.code == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "all").exists()  # a refused merge leaves nothing behind


def test_the_mean_best_so_far_is_taken_where_every_seed_has_a_value() -> None:
    from bench.evaluate import mean_curve

    first = ([1.0, 3.0, 10.0], [0.5, 0.2, 0.2])
    second = ([2.0, 4.0, 8.0], [0.7, 0.1, 0.1])  # ends first: the mean stops at 8

    xs, ys = mean_curve([first, second])

    assert xs == [2.0, 3.0, 4.0, 8.0]
    assert ys == pytest.approx([0.6, 0.45, 0.15, 0.15])


def _adding_results(folder: Path, trials: list[tuple[int, str, float]]) -> Path:
    """A bench.evaluate results.json of one stacked_lstm adding study (2 layers fixed by
    the family): ``trials`` as (hidden units, init, lowest val MSE)."""
    folder.mkdir()
    study = {
        "best_config": {"params": {"cell": "lstm", "num_layers": 2}},
        "trials": [
            {
                "params": {"hidden_size": hidden, "init": init, "lr": 0.005},
                "intermediate_values": {"0": 0.17, "1": lowest},
            }
            for hidden, init, lowest in trials
        ],
    }
    space = {"hidden_size": {"type": "int", "low": 32, "high": 96}, "max_epochs": 2}
    task = {"spec": {"space": space}, "studies": {"stacked_lstm": [study]}}
    (folder / "results.json").write_text(json.dumps({"tasks": {"adding": task}}))
    return folder


def test_plateau_counts_trials_by_depth_width_and_init(tmp_path: Path) -> None:
    from bench.plateau import fisher, plateau_trials, table

    run = _adding_results(
        tmp_path / "run",
        [(40, "orthogonal", 0.0001), (90, "orthogonal", 0.17), (50, "xavier_uniform", 0.003)],
    )
    trials = list(plateau_trials([run]))
    assert [(t.layers, t.hidden, t.init, t.left) for t in trials] == [
        (2, 40, "orthogonal", True),
        (2, 90, "orthogonal", False),
        (2, 50, "xavier_uniform", False),  # 0.003: near, not below 0.002
    ]
    rows = table(trials, width_split=56).splitlines()
    assert "| 2 | <= 56 | orthogonal | 1 of 1 |" in rows
    assert "| 2 | > 56 | orthogonal | 0 of 1 |" in rows
    assert fisher([True] * 9, [False] * 9) < 0.001 < fisher([True, False], [True, False]) == 1.0
