"""``lstm-hpo train CONFIG --out DIR --json`` as a real subprocess, one tiny fit per task kind.

Each budget is about the cheapest that learns reliably on a 2-core CPU with one torch
thread (checked over seeds 0-2). Most of each run's 6-9 s is importing torch and Lightning,
the rejected configs' runs included (``train`` imports the fit module before validating).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.search_space import TASK_METRICS, load_config_file, parse_config
from tests.unit.test_search_space import INT_WRITTEN_AS_FLOAT_BEST_YAML

_SCRIPT = Path(sys.executable).parent / "lstm-hpo"
#: The console script; ``python -m service.cli`` has no ``__main__`` guard and does nothing.
LSTM_HPO = (
    [str(_SCRIPT)]
    if _SCRIPT.exists()
    else [sys.executable, "-c", "from service.cli import app; app(prog_name='lstm-hpo')"]
)
SUMMARY_KEYS = ("metric", "value", "test_value", "baseline")


def run_cli(
    *args: str | Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``lstm-hpo ARGS`` in ``cwd`` (``env`` added to the environment), captured."""
    return subprocess.run(
        [*LSTM_HPO, *map(str, args)],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Write ``config`` as YAML to ``path``."""
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def needs(module: str) -> pytest.MarkDecorator:
    """Skip unless ``module`` (a bundled data set's loader: the ``datasets`` extra) is installed."""
    missing = importlib.util.find_spec(module) is None
    return pytest.mark.skipif(missing, reason=f"{module} missing: pip install 'lstm-hpo[datasets]'")


def error_rate(value: float, direction: str) -> float:
    """The metric as something to minimise (accuracy becomes the error rate)."""
    return value if direction == "minimize" else 1.0 - value


#: (config, factor): the test error must be at most ``factor`` x the baseline's error.
#: Figures seen (test vs baseline): adding 0.005 vs 0.146, forecast RMSE 31-41 vs 53.2 (naive),
#: classify accuracy 0.93-0.95 vs 0.084 (majority), char_lm 2.38 vs 3.16 nats/char (unigram).
TRAIN_CASES = [
    pytest.param(
        {
            "task": {"kind": "adding", "seq_len": 10, "n_train": 2000, "n_val": 200, "n_test": 200},
            "params": {
                "num_layers": 1,
                "hidden_size": 32,
                "lr": 0.01,
                "batch_size": 32,
                "max_epochs": 6,
            },
        },
        0.3,
        id="adding",
    ),
    pytest.param(
        {
            "task": {"kind": "forecast", "dataset": "airline", "lookback": 12},
            "params": {
                "num_layers": 1,
                "hidden_size": 16,
                "lr": 0.02,
                "batch_size": 16,
                "max_epochs": 20,
            },
        },
        0.9,
        id="forecast",
        marks=needs("aeon"),
    ),
    pytest.param(
        {
            "task": {
                "kind": "forecast",
                "dataset": "airline",
                "lookback": 24,
                "horizon": 12,
                "test_size": 12,
                "transform": "log",
            },
            "params": {
                "num_layers": 1,
                "hidden_size": 32,
                "lr": 0.01,
                "batch_size": 16,
                "max_epochs": 30,
            },
        },
        # RMSE in passengers (not logs) against naive's 103: the airline 1960 hold-out.
        0.5,
        id="forecast-log",
        marks=needs("aeon"),
    ),
    pytest.param(
        {
            "task": {"kind": "classify", "dataset": "japanese_vowels"},
            "params": {
                "num_layers": 1,
                "hidden_size": 32,
                "lr": 0.01,
                "batch_size": 32,
                "max_epochs": 4,
            },
        },
        0.3,
        id="classify",
        marks=needs("aeon"),
    ),
    pytest.param(
        {
            "task": {"kind": "char_lm", "max_chars": 100_000},
            "params": {
                "num_layers": 1,
                "hidden_size": 64,
                "lr": 0.01,
                "batch_size": 32,
                "bptt": 50,
                "max_epochs": 1,
            },
        },
        0.9,
        id="char_lm",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("config", "factor"), TRAIN_CASES)
def test_train_beats_baseline_and_writes_run(
    config: dict[str, Any], factor: float, tmp_path: Path
) -> None:
    """One tiny fit: a JSON summary that beats the trivial baseline, and a complete run dir."""
    config_path = write_config(tmp_path / "config-in.yaml", config)
    out = tmp_path / "run"

    args = ("--out", out, "--json", "--threads", "1", "--accelerator", "cpu")
    proc = run_cli("train", config_path, *args, cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(SUMMARY_KEYS) <= summary.keys()
    task_metric = TASK_METRICS[config["task"]["kind"]]
    assert summary["metric"] == task_metric.name
    assert summary["direction"] == task_metric.direction
    value, test, baseline = summary["value"], summary["test_value"], summary["baseline"]
    assert all(isinstance(v, float) and math.isfinite(v) for v in (value, test, baseline))
    if task_metric.direction == "minimize":
        assert test < baseline, summary
    else:
        assert test > baseline, summary
    direction = task_metric.direction
    assert error_rate(test, direction) <= factor * error_rate(baseline, direction), summary

    assert (out / "best.ckpt").is_file()
    assert summary["checkpoint"] == str(out / "best.ckpt")
    assert load_config_file(out / "config.yaml") == parse_config(config)
    assert json.loads((out / "result.json").read_text(encoding="utf-8")) == summary


def test_invalid_param_exits_2_naming_the_field(tmp_path: Path) -> None:
    """A value out of range is a usage error (exit 2) that names the field; nothing trains."""
    path = write_config(
        tmp_path / "bad.yaml", {"task": {"kind": "adding"}, "params": {"dropout": 1.5}}
    )

    proc = run_cli("train", path.name, "--out", "run", "--json", cwd=tmp_path)

    assert proc.returncode == 2
    assert "params.dropout" in proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "run").exists()


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    """A config file that does not exist: exit 2, "cannot read" and the file's name."""
    proc = run_cli("train", "missing.yaml", "--out", "run", "--json", cwd=tmp_path)

    assert proc.returncode == 2
    assert "cannot read missing.yaml" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_spec_that_still_searches_exits_2(tmp_path: Path) -> None:
    """A spec with a distribution left in its space cannot be trained as one config."""
    spec = {
        "task": {"kind": "adding", "seq_len": 10},
        "space": {"hidden_size": {"type": "int", "low": 8, "high": 16}, "lr": 0.01},
    }
    path = write_config(tmp_path / "spec.yaml", spec)

    proc = run_cli("train", path.name, "--out", "run", "--json", cwd=tmp_path)

    assert proc.returncode == 2
    assert "still searches" in proc.stderr
    assert "hidden_size" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_int_written_as_float_trains_as_an_int(tmp_path: Path) -> None:
    """``num_layers: 2.0`` is 2 (two layers of 16), not a traceback."""
    (tmp_path / "best.yaml").write_text(INT_WRITTEN_AS_FLOAT_BEST_YAML, encoding="utf-8")

    args = ("--out", "run", "--json", "--threads", "1", "--accelerator", "cpu")
    proc = run_cli("train", "best.yaml", *args, cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text(encoding="utf-8"))
    assert written["params"]["num_layers"] == 2
    assert written["params"]["hidden_sizes"] == [16, 16]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (INT_WRITTEN_AS_FLOAT_BEST_YAML.replace("2.0", "2.5"), "params.num_layers"),
        (INT_WRITTEN_AS_FLOAT_BEST_YAML.replace("2.0", "[2]"), "params.num_layers"),
        (INT_WRITTEN_AS_FLOAT_BEST_YAML.replace("2.0", "two"), "params.num_layers"),
        (INT_WRITTEN_AS_FLOAT_BEST_YAML.replace("hidden_size: 16", "hidden_size: .nan"), "finite"),
        (INT_WRITTEN_AS_FLOAT_BEST_YAML + "  max_epochs: 2\n", "duplicate key `max_epochs`"),
        (INT_WRITTEN_AS_FLOAT_BEST_YAML.replace("params:", "params: ["), "not valid YAML"),
        ("task: {kind: adding, seq_len: 1e400}\n", "task.seq_len"),
    ],
    ids=["fraction", "list", "text", "nan", "duplicate", "syntax", "overflow"],
)
def test_malformed_config_is_a_clean_error(tmp_path: Path, text: str, says: str) -> None:
    """Whatever is wrong with the file: exit 2, the reason, and no traceback."""
    (tmp_path / "bad.yaml").write_text(text, encoding="utf-8")

    proc = run_cli("train", "bad.yaml", "--out", "run", "--json", cwd=tmp_path)

    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert says in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_config_file_that_is_not_utf8_is_a_clean_error(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_bytes(b"task:\n  kind: \xe9\n")

    proc = run_cli("train", "bad.yaml", "--out", "run", "--json", cwd=tmp_path)

    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "not UTF-8 text (byte 14)" in proc.stderr


# --------------------------------------------------------------------------------------
# --init-from and --evaluate: starting from, or only scoring, a checkpoint
# --------------------------------------------------------------------------------------

#: A tiny adding fit (1,000 sequences of 10: 32 batches an epoch, ~2 s of training).
TINY_ADDING: dict[str, Any] = {
    "task": {"kind": "adding", "seq_len": 10, "n_train": 1000, "n_val": 200, "n_test": 200},
    "params": {"num_layers": 1, "hidden_size": 16, "lr": 0.01, "batch_size": 32, "max_epochs": 3},
}
BATCHES_PER_EPOCH = 32
CPU = ("--threads", "1", "--accelerator", "cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A directory holding ``config.yaml`` and the run ``run/`` it trained, and its summary."""
    root = tmp_path_factory.mktemp("trained")
    write_config(root / "config.yaml", TINY_ADDING)
    proc = run_cli("train", "config.yaml", "--out", "run", "--json", *CPU, cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root, json.loads(proc.stdout.strip().splitlines()[-1])


def last_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return summary


@pytest.mark.parametrize("with_config", [False, True], ids=["from-checkpoint", "config"])
def test_evaluate_scores_what_training_reported(
    trained: tuple[Path, dict[str, Any]], with_config: bool, tmp_path: Path
) -> None:
    """``--evaluate best.ckpt`` trains nothing and scores the checkpoint exactly as the fit
    that wrote it did: its validation value, test value and baselines; the checkpoint
    records its task, so the config may be left out."""
    root, reported = trained
    config = [str(root / "config.yaml")] if with_config else []

    proc = run_cli(
        "train", *config, "--evaluate", root / "run" / "best.ckpt", "--json", *CPU, cwd=tmp_path
    )

    assert proc.returncode == 0, proc.stderr
    summary = last_json(proc)
    assert list(summary)[:4] == list(SUMMARY_KEYS)
    assert summary.keys() == reported.keys()
    assert summary["value"] == pytest.approx(reported["value"], rel=1e-6)
    assert summary["test_value"] == pytest.approx(reported["test_value"], rel=1e-6)
    for key in ("metric", "direction", "baseline", "baselines", "val_baselines", "best_epoch"):
        assert summary[key] == reported[key], key
    assert summary["history"] == []
    assert summary["checkpoint"] == str(root / "run" / "best.ckpt")
    assert list(tmp_path.iterdir()) == []  # nothing written: no runs/, no logs


def test_init_from_starts_at_the_checkpoint_with_a_fresh_optimizer(
    trained: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """``--init-from``: before any training the model scores exactly the checkpoint's best
    validation value (its weights were loaded), and after one epoch its optimizer has taken
    one epoch of steps, not the checkpoint's three plus one (weights only, fresh Adam)."""
    import torch

    root, reported = trained
    ckpt = root / "run" / "best.ckpt"
    one_epoch = {**TINY_ADDING, "params": {**TINY_ADDING["params"], "max_epochs": 1}}
    write_config(tmp_path / "finetune.yaml", one_epoch)

    proc = run_cli(
        "train", "finetune.yaml", "--init-from", ckpt, "--out", "ft", "--json", *CPU, cwd=tmp_path
    )

    assert proc.returncode == 0, proc.stderr
    summary = last_json(proc)
    assert summary["initial_value"] == pytest.approx(reported["value"], rel=1e-6)
    assert summary["init_from"] == str(ckpt)
    assert len(summary["history"]) == 1
    assert reported["initial_value"] is None  # a fit from scratch has none
    written = torch.load(tmp_path / "ft" / "best.ckpt", map_location="cpu", weights_only=False)
    assert written["global_step"] == BATCHES_PER_EPOCH
    adam = written["optimizer_states"][0]["state"][0]
    assert int(adam["step"]) == BATCHES_PER_EPOCH
    assert written["hyper_parameters"]["task"] == parse_config(one_epoch).task.model_dump(
        mode="json", exclude_none=True
    )


def test_init_from_another_architecture_exits_2_naming_the_fields(
    trained: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, _ = trained
    other = {**TINY_ADDING, "params": {**TINY_ADDING["params"], "hidden_size": 8, "cell": "gru"}}
    write_config(tmp_path / "other.yaml", other)
    ckpt = root / "run" / "best.ckpt"

    proc = run_cli("train", "other.yaml", "--init-from", ckpt, "--out", "run", *CPU, cwd=tmp_path)

    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{ckpt}: The checkpoint's model does not fit the config's architecture" in proc.stderr
    assert "params.cell: checkpoint lstm, config gru" in proc.stderr
    assert "params.hidden_size: layer widths: checkpoint [16], config [8]" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_evaluating_a_checkpoint_of_another_architecture_says_only_why(
    trained: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, _ = trained
    other = {**TINY_ADDING, "params": {**TINY_ADDING["params"], "hidden_size": 8}}
    write_config(tmp_path / "other.yaml", other)

    proc = run_cli(
        "train", "other.yaml", "--evaluate", root / "run" / "best.ckpt", *CPU, cwd=tmp_path
    )

    assert proc.returncode == 2, proc.stderr
    assert "params.hidden_size" in proc.stderr and proc.stdout == ""


def test_a_forecast_model_is_scored_only_under_its_own_transform(tmp_path: Path) -> None:
    """A model of log changes read as raw changes reports numbers that mean nothing (it
    "beat the baseline"): --evaluate refuses it naming the field; --init-from notes it."""
    series = tmp_path / "s.csv"
    series.write_text("t,y\n" + "".join(f"{i},{100 + i + 10 * (i % 12)}\n" for i in range(80)))
    task = {"kind": "forecast", "path": str(series), "column": "y", "lookback": 6}
    params = {"num_layers": 1, "hidden_size": 8, "max_epochs": 1}
    write_config(tmp_path / "log.yaml", {"task": {**task, "transform": "log"}, "params": params})
    other = {**task, "normalize": "none"}  # levels, not changes: a second such field
    write_config(tmp_path / "none.yaml", {"task": other, "params": params})
    assert run_cli("train", "log.yaml", "--out", "run", *CPU, cwd=tmp_path).returncode == 0
    ckpt = tmp_path / "run" / "best.ckpt"

    refused = run_cli("train", "none.yaml", "--evaluate", ckpt, "--json", *CPU, cwd=tmp_path)
    own = run_cli("train", "log.yaml", "--evaluate", ckpt, "--json", *CPU, cwd=tmp_path)
    tuned = run_cli("train", "none.yaml", "--init-from", ckpt, "--out", "t", *CPU, cwd=tmp_path)

    assert refused.returncode == 2 and refused.stdout == "", refused.stderr
    said = " ".join(refused.stderr.split())
    both = "task.normalize: checkpoint last_value, config none; task.transform: checkpoint log"
    assert f"({both}, config none): its outputs mean" in said, said
    assert own.returncode == 0, own.stderr
    assert tuned.returncode == 0, tuned.stderr
    noted = " ".join(tuned.stderr.split())
    assert "trained on another output scale: task.transform: checkpoint log, config none" in noted


@pytest.mark.parametrize("option", ["--evaluate", "--init-from"])
@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"not a checkpoint\n", "is not a PyTorch checkpoint, or it is damaged"),
        (None, "cannot read checkpoint"),
    ],
    ids=["garbage", "missing"],
)
def test_unusable_checkpoint_exits_2_naming_the_file(
    tmp_path: Path, option: str, content: bytes | None, says: str
) -> None:
    if content is not None:
        (tmp_path / "x.ckpt").write_bytes(content)
    write_config(tmp_path / "config.yaml", TINY_ADDING)
    out = ("--out", "run") if option == "--init-from" else ()

    proc = run_cli("train", "config.yaml", option, "x.ckpt", *out, *CPU, cwd=tmp_path)

    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert says in proc.stderr and "x.ckpt" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_evaluate_needs_the_config_when_the_checkpoint_does_not_record_its_task(
    trained: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """A checkpoint written before checkpoints recorded their task: the config is required."""
    import torch

    root, _ = trained
    ckpt = torch.load(root / "run" / "best.ckpt", map_location="cpu", weights_only=False)
    del ckpt["hyper_parameters"]["task"]
    torch.save(ckpt, tmp_path / "old.ckpt")

    proc = run_cli("train", "--evaluate", "old.ckpt", "--json", *CPU, cwd=tmp_path)

    assert proc.returncode == 2, proc.stderr
    assert "old.ckpt does not record the task it was trained on" in proc.stderr
    assert "lstm-hpo train CONFIG.yaml --evaluate old.ckpt" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("config.yaml", "--evaluate", "a.ckpt", "--init-from", "a.ckpt"), "exclude each other"),
        (("config.yaml", "--evaluate", "a.ckpt", "--out", "run"), "--evaluate writes nothing"),
        (("--init-from", "a.ckpt"), "missing CONFIG"),
        ((), "missing CONFIG"),
    ],
    ids=["evaluate+init-from", "evaluate+out", "init-from without config", "nothing"],
)
def test_misuse_is_a_usage_error(tmp_path: Path, args: tuple[str, ...], says: str) -> None:
    write_config(tmp_path / "config.yaml", TINY_ADDING)
    (tmp_path / "a.ckpt").write_bytes(b"")

    proc = run_cli("train", *args, cwd=tmp_path)

    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option", ["--output", "--checkpoint"])
def test_best_refuses_a_file_it_could_not_write_before_asking_the_server(
    tmp_path: Path, option: str
) -> None:
    """Was a traceback after the download (and a stray .part for --checkpoint). No server
    runs here: the refusal comes first."""
    server = ("--server", "http://127.0.0.1:9")
    into_dir = run_cli("best", "0123abcd", option, tmp_path, *server, cwd=tmp_path)
    assert into_dir.returncode == 2, into_dir.stderr
    assert "is a directory; give a file name" in into_dir.stderr
    (tmp_path / "file").write_text("")
    under_file = run_cli("best", "0123abcd", option, "file/best.yaml", *server, cwd=tmp_path)
    assert under_file.returncode == 2 and "cannot make" in under_file.stderr, under_file.stderr
    same = run_cli("best", "0123abcd", "-o", "x", "--checkpoint", "x", *server, cwd=tmp_path)
    assert same.returncode == 2 and "both" in same.stderr, same.stderr
    nowhere = run_cli("best", "0123abcd", option, "new/sub/x", *server, cwd=tmp_path)
    assert nowhere.returncode == 1, nowhere.stderr  # the server is unreachable
    assert not (tmp_path / "new").exists()  # no directory made for a download that failed
    for proc in (into_dir, under_file, same, nowhere):
        assert "Traceback" not in proc.stderr and proc.stdout == ""


# --------------------------------------------------------------------------------------
# --refit: retrain on train + validation for the validated fit's epochs
# --------------------------------------------------------------------------------------

#: TINY_ADDING's train + validation splits (1,000 + 200 sequences) in batches of 32.
REFIT_BATCHES_PER_EPOCH = 38


def test_refit_trains_on_train_and_validation_for_the_validated_best_epochs(
    tmp_path: Path,
) -> None:
    """``--refit``: a validated fit first (into OUT/selection), then a fit from scratch on
    train + validation for its best epoch + 1, scored on the test split; ``--refit-epochs``
    with those epochs is the same refit (same seed, same data) without the validated fit,
    and ``--evaluate`` of the refit's checkpoint scores its test value again."""
    import torch

    config = {**TINY_ADDING, "params": {**TINY_ADDING["params"], "max_epochs": 4}}
    write_config(tmp_path / "config.yaml", config)

    proc = run_cli(
        "train", "config.yaml", "--refit", "--out", "refit", "--json", *CPU, cwd=tmp_path
    )

    assert proc.returncode == 0, proc.stderr
    summary = last_json(proc)
    assert list(summary)[:4] == list(SUMMARY_KEYS)
    selection = summary["refit"]["selection"]
    epochs = selection["best_epoch"] + 1
    assert summary["refit"] == {"epochs": epochs, "splits": "train+val", "selection": selection}
    # The validation figures are the validated fit's: the refit trained on that split.
    assert summary["value"] == selection["value"] and summary["best_epoch"] == epochs - 1
    validated = json.loads((tmp_path / "refit" / "selection" / "result.json").read_text())
    assert selection["test_value"] == validated["test_value"] != summary["test_value"]
    assert math.isfinite(summary["test_value"]) and summary["test_value"] < summary["baseline"]
    assert summary["checkpoint"] == str(tmp_path / "refit" / "refit.ckpt")
    written = torch.load(tmp_path / "refit" / "refit.ckpt", map_location="cpu", weights_only=False)
    assert written["global_step"] == epochs * REFIT_BATCHES_PER_EPOCH  # train + validation
    assert written["epoch"] == epochs - 1  # the last epoch trained, not a best-by-validation

    again = run_cli(
        "train", "config.yaml", "--refit-epochs", str(epochs), "--out", "again", "--json", *CPU,
        cwd=tmp_path,
    )  # fmt: skip

    assert again.returncode == 0, again.stderr
    direct = last_json(again)
    assert direct["test_value"] == pytest.approx(summary["test_value"], rel=1e-6)
    assert direct["refit"] == {"epochs": epochs, "splits": "train+val", "selection": None}
    assert direct["value"] is None and not (tmp_path / "again" / "selection").exists()

    scored = run_cli("train", "--evaluate", tmp_path / "refit" / "refit.ckpt", "--json", *CPU,
                     cwd=tmp_path)  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    rescored = last_json(scored)
    assert rescored["test_value"] == pytest.approx(summary["test_value"], rel=1e-6)
    # The checkpoint says it is a refit: its validation score is on data it trained on.
    assert rescored["refit"] == {"epochs": epochs, "splits": "train+val", "selection": None}
    plain = run_cli("train", "--evaluate", tmp_path / "refit" / "selection" / "best.ckpt",
                    "--json", *CPU, cwd=tmp_path)  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    assert last_json(plain)["refit"] is None


@pytest.mark.parametrize(
    ("params", "args", "says"),
    [
        ({}, ("--refit", "--evaluate", "a.ckpt"), "--evaluate trains nothing"),
        ({}, ("--refit-epochs", "2", "--init-from", "a.ckpt"), "--init-from fine-tunes"),
        ({}, ("--refit-epochs", "0"), "Invalid value for '--refit-epochs'"),
        ({}, ("--refit-epochs", "4"), "--refit-epochs: 4 must be 1..params.max_epochs (3)"),
        ({"lr_schedule": "plateau"}, ("--refit",), "params.lr_schedule: plateau follows the"),
    ],
    ids=["evaluate", "init-from", "zero-epochs", "past-max-epochs", "plateau"],
)
def test_refit_misuse_exits_2_and_writes_nothing(
    tmp_path: Path, params: dict[str, Any], args: tuple[str, ...], says: str
) -> None:
    config = {**TINY_ADDING, "params": {**TINY_ADDING["params"], **params}}
    write_config(tmp_path / "config.yaml", config)
    (tmp_path / "a.ckpt").write_bytes(b"")

    out = () if "--evaluate" in args else ("--out", "run")  # --evaluate refuses --out

    proc = run_cli("train", "config.yaml", *args, *out, *CPU, cwd=tmp_path)

    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert says in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_the_reported_history_holds_every_epoch_when_the_best_is_not_the_last(
    tmp_path: Path,
) -> None:
    """Testing the best checkpoint restores the callbacks' states of its epoch; the result's
    history must still be every epoch's validation metric (it once stopped at the best)."""
    noisy = {**TINY_ADDING, "params": {**TINY_ADDING["params"], "lr": 0.2, "max_epochs": 4}}
    write_config(tmp_path / "config.yaml", noisy)

    proc = run_cli("train", "config.yaml", "--out", "run", "--json", *CPU, cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    summary = last_json(proc)
    assert summary["best_epoch"] < 3  # the precondition: a later epoch was worse
    assert len(summary["history"]) == 4
    assert summary["history"][summary["best_epoch"]] == summary["value"] == min(summary["history"])
    assert (
        json.loads((tmp_path / "run" / "result.json").read_text())["history"] == summary["history"]
    )


@pytest.mark.parametrize(
    ("file", "args", "says"),
    [
        ("run", (), "--out run: run is a file, not a directory"),
        ("run", ("--refit",), "--out run: run is a file, not a directory"),
        ("deep", ("--out", "deep/run"), "--out deep/run: deep is a file, not a directory"),
        ("run/selection", ("--refit",), "--out run: run/selection is a file, not a directory"),
        ("run/best.ckpt/x", (), "--out run: run/best.ckpt is a directory; the run writes a file"),
        (
            "run/.lstm-hpo-run.json/x",
            (),
            "--out run: run/.lstm-hpo-run.json is a directory; the run writes a file",
        ),
    ],
    ids=[
        "out-is-a-file",
        "refit-out-is-a-file",
        "parent-is-a-file",
        "selection-is-a-file",
        "run-file-is-a-directory",
        "manifest-is-a-directory",
    ],
)
def test_an_out_that_cannot_be_written_exits_2_before_training(
    tmp_path: Path, file: str, args: tuple[str, ...], says: str
) -> None:
    write_config(tmp_path / "config.yaml", TINY_ADDING)
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file).write_text("not a directory\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = () if "--out" in args else ("--out", "run")

    proc = run_cli("train", "config.yaml", *args, *out, *CPU, cwd=tmp_path)

    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert says in proc.stderr, proc.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_directory_holds_one_run_and_keeps_what_the_run_reads(tmp_path: Path) -> None:
    """Training into an --out an earlier `train` used removes the files that run listed in
    its manifest (a plain fit once sat beside a refit's stale refit.ckpt and selection/),
    says so, and keeps anything else there and every file the new run reads (here its
    --init-from checkpoint, inside the old selection/)."""
    one_epoch = {**TINY_ADDING, "params": {**TINY_ADDING["params"], "max_epochs": 1}}
    write_config(tmp_path / "config.yaml", one_epoch)
    refit = run_cli("train", "config.yaml", "--refit", "--out", "run", "--json", *CPU,
                    cwd=tmp_path)  # fmt: skip
    assert refit.returncode == 0, refit.stderr
    assert "held an earlier run" not in refit.stderr  # a new directory: nothing to say
    (tmp_path / "run" / "notes.txt").write_text("mine\n")
    selected = tmp_path / "run" / "selection" / "best.ckpt"

    fine_tuned = run_cli("train", "config.yaml", "--init-from", selected, "--out", "run",
                         "--json", *CPU, cwd=tmp_path)  # fmt: skip

    assert fine_tuned.returncode == 0, fine_tuned.stderr
    said = " ".join(fine_tuned.stderr.split())
    assert "note: run held an earlier run; removed config.yaml, refit.ckpt," in said
    assert "selection/config.yaml" in said and "selection/best.ckpt" not in said  # it is read
    assert last_json(fine_tuned)["init_from"] == str(selected)
    left = {str(p.relative_to(tmp_path / "run")) for p in (tmp_path / "run").rglob("*")}
    assert left == {"notes.txt", "selection", "selection/best.ckpt", *PLAIN_RUN_FILES}

    plain = run_cli("train", "config.yaml", "--out", "run", "--json", *CPU, cwd=tmp_path)

    assert plain.returncode == 0, plain.stderr
    left = {str(p.relative_to(tmp_path / "run")) for p in (tmp_path / "run").rglob("*")}
    assert left == {"notes.txt", *PLAIN_RUN_FILES}  # selection/ went with its last file
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine\n"


def test_a_run_that_is_refused_loses_nothing_of_the_earlier_one(tmp_path: Path) -> None:
    """The earlier run is replaced only once the new run's checkpoint and data are read:
    a checkpoint of another architecture exits 2 and leaves the directory as it was."""
    one_epoch = {**TINY_ADDING, "params": {**TINY_ADDING["params"], "max_epochs": 1}}
    write_config(tmp_path / "config.yaml", one_epoch)
    first = run_cli("train", "config.yaml", "--out", "run", "--json", *CPU, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    wider = {**one_epoch, "params": {**one_epoch["params"], "hidden_size": 32}}
    write_config(tmp_path / "wider.yaml", wider)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*")}

    refused = run_cli(
        "train", "wider.yaml", "--init-from", "run/best.ckpt", "--out", "run", *CPU, cwd=tmp_path
    )  # fmt: skip (fine-tuning in place: allowed)

    assert refused.returncode == 2, refused.stderr
    assert "hidden_size" in refused.stderr and "held an earlier run" not in refused.stderr
    assert "Training ->" not in refused.stdout
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*")} == before


@pytest.mark.parametrize(
    ("inside", "args"),
    [("hparams.yaml", ()), ("selection/result.json", ("--refit",))],
    ids=["config-named-as-a-run-file", "config-in-a-refit-selection"],
)
def test_an_input_the_run_would_overwrite_exits_2(
    tmp_path: Path, inside: str, args: tuple[str, ...]
) -> None:
    config = tmp_path / "run" / inside
    config.parent.mkdir(parents=True)
    write_config(config, TINY_ADDING)
    before = config.read_bytes()

    proc = run_cli("train", config, "--out", "run", *args, *CPU, cwd=tmp_path)

    assert proc.returncode == 2, proc.stderr
    assert f"training would overwrite {config}, which it reads" in " ".join(proc.stderr.split())
    assert config.read_bytes() == before


#: What a plain `train --out run` leaves in run/: its files and the list of them.
PLAIN_RUN_FILES = (
    ".lstm-hpo-run.json",
    "best.ckpt",
    "config.yaml",
    "hparams.yaml",
    "metrics.csv",
    "result.json",
)


def test_data_that_do_not_fit_the_config_exit_2_and_keep_the_earlier_run(
    tmp_path: Path,
) -> None:
    """As `train --help` says: data that do not fit the config are an input error (exit 2,
    one line naming the file and column), found before the earlier run is replaced."""
    (tmp_path / "series.csv").write_text("month,x\n" + "".join(f"{i},{i}\n" for i in range(80)))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lstm-hpo-run.json").write_text('{"files": ["best.ckpt"]}')
    (tmp_path / "run" / "best.ckpt").write_text("an earlier run's\n")
    task = {"kind": "forecast", "path": str(tmp_path / "series.csv"), "column": "y"}
    write_config(tmp_path / "config.yaml", {"task": task, "params": {"max_epochs": 1}})

    for refit in ((), ("--refit",)):
        proc = run_cli("train", "config.yaml", "--out", "run", *refit, *CPU, cwd=tmp_path)

        assert proc.returncode == 2, proc.stderr
        assert "no column 'y'" in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stdout == ""  # a refused run says only why: no "Training ->", no phase
        assert (tmp_path / "run" / "best.ckpt").read_text() == "an earlier run's\n"


def test_data_named_as_the_run_s_config_is_refused_and_a_quoted_tilde_out_is_expanded(
    tmp_path: Path,
) -> None:
    """DIR/config.yaml may be the run's own config (rewritten as itself), never its data;
    ``--out '~/x'`` (quoted: no shell expanded it) is the home directory's x, every file."""
    data = tmp_path / "run" / "config.yaml"
    data.parent.mkdir()
    data.write_text("month,y\n" + "".join(f"{i},{100 + i}\n" for i in range(80)))
    task = {"kind": "forecast", "path": str(data), "column": "y"}
    write_config(tmp_path / "forecast.yaml", {"task": task, "params": {"max_epochs": 1}})
    before = data.read_bytes()

    refused = run_cli("train", "forecast.yaml", "--out", "run", *CPU, cwd=tmp_path)

    assert refused.returncode == 2, refused.stderr
    assert f"training would overwrite {data}" in " ".join(refused.stderr.split())
    assert data.read_bytes() == before

    one_epoch = {**TINY_ADDING, "params": {**TINY_ADDING["params"], "max_epochs": 1}}
    write_config(tmp_path / "config.yaml", one_epoch)
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home)}
    quoted = run_cli("train", "config.yaml", "--out", "~/x", "--json", *CPU, cwd=tmp_path, env=env)

    assert quoted.returncode == 0, quoted.stderr
    assert {p.name for p in (home / "x").iterdir()} == set(PLAIN_RUN_FILES)
    assert not (tmp_path / "~").exists()


def test_a_damaged_manifest_is_reported_and_replaced(tmp_path: Path) -> None:
    """The earlier run's files stay (nothing says which were its), the user is told, and
    the new run's manifest makes the next run clean again."""
    one_epoch = {**TINY_ADDING, "params": {**TINY_ADDING["params"], "max_epochs": 1}}
    write_config(tmp_path / "config.yaml", one_epoch)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lstm-hpo-run.json").write_text("{truncated")
    (tmp_path / "run" / "refit.ckpt").write_text("an earlier run's\n")

    proc = run_cli("train", "config.yaml", "--out", "run", *CPU, cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stderr.split())
    assert f"note: cannot read {Path('run') / '.lstm-hpo-run.json'}" in said, said
    assert "the earlier run's files there are left as they are" in said
    assert (tmp_path / "run" / "refit.ckpt").exists()
    manifest = json.loads((tmp_path / "run" / ".lstm-hpo-run.json").read_text())
    assert "best.ckpt" in manifest["files"] and "refit.ckpt" not in manifest["files"]
