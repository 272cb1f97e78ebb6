"""shared/cases/relative-path.yaml: a study over a CSV named relative to the data directory;
its best config names the file so that `lstm-hpo train best.yaml` finds it on the same
machine from any directory. A real worker trains two tiny forecasters."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import yaml

from service import studies
from service.auth import LOCAL
from service.migrate import upgrade_schema
from service.search_space import SpecLimits, parse_spec
from service.worker import Worker, WorkerOptions
from tests.acceptance.conftest import CLI

SPEC = {
    "name": "relative-path",
    "task": {
        "kind": "forecast",
        "path": "relative-path.csv",
        "column": "value",
        "lookback": 6,
        "horizon": 1,
    },
    "space": {
        "num_layers": 1,
        "hidden_size": {"type": "int", "low": 8, "high": 16},
        "batch_size": 8,
        "max_epochs": 1,
    },
    "study": {"n_trials": 2, "sampler": "random", "pruner": "none", "seed": 0},
}


def _write_series(path: Path) -> None:
    rows = [f"1990-{i:03d},{100 + 10 * math.sin(i / 3) + i:.2f}" for i in range(60)]
    path.write_text("month,value\n" + "\n".join(rows) + "\n", encoding="utf-8")


def test_best_config_trains_from_another_directory(tmp_path: Path) -> None:
    datasets = tmp_path / "data" / "datasets"
    datasets.mkdir(parents=True)
    _write_series(datasets / "relative-path.csv")
    url = f"sqlite:///{tmp_path / 'data' / 'lstm-hpo.db'}"
    storage = studies.optuna_storage(url)
    upgrade_schema(url)
    limits = SpecLimits(data_roots=(datasets,))
    backend = studies.open_backend(url, limits=limits, base_url="http://t", storage=storage)
    worker = Worker(
        WorkerOptions(
            database_url=url,
            data_roots=(datasets,),
            poll_interval_s=0.05,
            idle_exit_s=0.0,
            accelerator="cpu",
        )
    )
    try:
        study, _ = studies.submit_study(backend, parse_spec(SPEC, limits), principal=LOCAL)
        assert worker.run() == 2
        [best] = studies.best_configs(backend, study.id, principal=LOCAL)
    finally:
        worker.engine.dispose()
        if worker.storage is not None:
            worker.storage.engine.dispose()
        backend.sessions.kw["bind"].dispose()
        storage.engine.dispose()

    named = Path(best.config["task"]["path"])
    assert named.is_absolute() and named == (datasets / "relative-path.csv").resolve()
    config = tmp_path / "best.yaml"
    config.write_text(yaml.safe_dump(best.config), encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [*CLI, "train", str(config), "--json", "--accelerator", "cpu", "--out", "run"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (elsewhere / "run" / "result.json").exists()


# A home that does not exist made Path.expanduser raise: a traceback, not this message.
@pytest.mark.parametrize("path", ["not-here.csv", "~nobody-of-that-name/not-here.csv"])
def test_train_says_where_it_looked_for_a_relative_path(tmp_path: Path, path: str) -> None:
    config = tmp_path / "best.yaml"
    task = {**SPEC["task"], "path": path}  # type: ignore[dict-item]
    config.write_text(yaml.safe_dump({"task": task, "params": {"max_epochs": 1}}))
    data_dir = tmp_path / "data"
    result = subprocess.run(
        [*CLI, "train", str(config), "--accelerator", "cpu"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LSTM_HPO_DATA_DIR": str(data_dir)},
    )
    assert result.returncode != 0
    message = " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert path in message and str(data_dir / "datasets") in message, message
    assert "LSTM_HPO_DATA_DIR" in message or "LSTM_HPO_DATA_ROOTS" in message, message
