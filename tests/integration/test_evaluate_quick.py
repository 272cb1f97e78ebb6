"""``python -m bench.evaluate --quick`` end to end, so that the evaluation suite cannot rot:
a real server and workers, studies per model family, finalists retrained on the test split,
classical baselines, the plot and the Markdown table."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_evaluation_runs_every_part_of_the_suite(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        # --first-seed: the quick run's one seed is 2 (a long suite split across runs).
        # --budget-minutes: 6 s studies, not 15 (the first trials always finish): the
        # suite's every part still runs, in CI's time.
        [
            *(sys.executable, "-m", "bench.evaluate", "--quick", "--first-seed", "2"),
            *("--budget-minutes", "0.1", "--out", str(out)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert results["machine"]["cores"] >= 1 and results["machine"]["commit"]
    assert (results["seeds"], results["seed_list"]) == (1, [2])
    adding = results["tasks"]["adding"]
    assert adding["metric"]["name"] == "val_mse"
    assert set(adding["families"]) == {"stacked_lstm", "gru"}
    for family, runs in adding["studies"].items():
        [run] = runs
        assert run["study"]["state"] == "succeeded", family
        assert run["study"]["name"] == f"eval-adding-{family}-s2"
        assert run["counts"]["complete"] >= 1
        # The finalist was retrained by `lstm-hpo train` and scored on the test split.
        assert math.isfinite(run["test_value"]) and run["retrain"]["seconds"] > 0
        assert run["best_config"]["params"]["cell"] == ("gru" if family == "gru" else "lstm")
        times = [t for t, _ in run["best_so_far"]]
        values = [v for _, v in run["best_so_far"]]
        assert times == sorted(times) and values == sorted(values, reverse=True)
    stacked = adding["studies"]["stacked_lstm"][0]["best_config"]["params"]
    assert stacked["num_layers"] >= 2
    # The mean predictor of the adding problem: MSE about 1/6 (Hochreiter & Schmidhuber).
    assert adding["baselines"]["train_mean"]["test"] == pytest.approx(1 / 6, abs=0.03)
    assert any("Bai" in ref["source"] for ref in adding["references"])

    assert (out / "adding_best_so_far.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "| stacked_lstm (searched) |" in summary and "| train_mean (baseline) |" in summary
    assert "python -m bench.evaluate --quick" in summary and "; seeds 2." in summary

    # --rescore: a finalist whose retrain failed is retrained; the searches are not re-run.
    scored = adding["studies"]["gru"][0]["test_value"]
    results["tasks"]["adding"]["studies"]["gru"][0]["test_value"] = None
    (out / "results.json").write_text(json.dumps(results))
    rescored = subprocess.run(
        [sys.executable, "-m", "bench.evaluate", "--rescore", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert rescored.returncode == 0, rescored.stdout[-3000:] + rescored.stderr[-3000:]
    again = json.loads((out / "results.json").read_text())
    gru = again["tasks"]["adding"]["studies"]["gru"][0]
    assert gru["test_value"] == pytest.approx(scored)  # a seeded retrain is the same run
    assert again["tasks"]["adding"]["families"]["gru"]["test"]["n"] == 1
    assert "retraining 1 finalist(s)" in rescored.stdout
