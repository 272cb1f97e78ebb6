"""``fit_config`` in process: real Lightning fits of tiny LSTMs on the adding problem.

Determinism, early stopping, the no-disk trial path, the step schedule and divergence.
Every fit runs on the CPU with one torch thread and takes well under a second.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback

from service.search_space import ResolvedConfig, parse_config
from service.training.fit import FitResult, fit_config
from service.training.module import DivergedError

#: Tiny but learnable: 10-step sequences, a 16-wide single layer.
ADDING_TASK = {"kind": "adding", "seq_len": 10, "n_train": 200, "n_val": 100, "n_test": 50}
TINY = {"num_layers": 1, "hidden_size": 16, "batch_size": 32, "lr": 0.01, "max_epochs": 3}


#: Every test here trains: one torch thread, as a worker runs (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def adding_config(task: dict[str, Any] | None = None, **params: Any) -> ResolvedConfig:
    """A resolved adding-problem config: :data:`TINY` params updated by ``params``."""
    return parse_config({"task": task or ADDING_TASK, "params": {**TINY, **params}})


def fit_cpu(config: ResolvedConfig, **kwargs: Any) -> FitResult:
    """``fit_config`` on the CPU, whatever accelerator the machine has."""
    return fit_config(config, accelerator="cpu", **kwargs)


def test_same_seed_gives_identical_history_and_value() -> None:
    """Two fits with one seed agree bit for bit; another seed trains a different model."""
    first = fit_cpu(adding_config(seed=7))
    second = fit_cpu(adding_config(seed=7))
    other = fit_cpu(adding_config(seed=8))

    assert len(first.history) == TINY["max_epochs"]
    assert all(math.isfinite(v) for v in first.history)
    assert first.history == second.history
    assert first.value == second.value
    assert first.best_epoch == second.best_epoch
    assert other.value != first.value
    assert other.history != first.history
    # The data depends only on the task, never on the model's seed.
    assert other.baselines == first.baselines


@pytest.mark.parametrize(
    ("params", "patience"),
    [
        # lr 1e-12 cannot move a float32 weight: the metric is exactly flat from epoch 0.
        pytest.param({"optimizer": "sgd", "lr": 1e-12, "max_epochs": 10}, 2, id="plateau"),
        # Ten training sequences and a 64-wide layer at lr 0.05: the best epoch comes early.
        pytest.param(
            {"hidden_size": 64, "lr": 0.05, "batch_size": 10, "max_epochs": 30},
            3,
            id="overfit",
        ),
    ],
)
def test_early_stopping_stops_before_max_epochs(params: dict[str, Any], patience: int) -> None:
    """Training stops ``patience`` epochs after the last improvement, before ``max_epochs``."""
    task = {**ADDING_TASK, "n_train": 10}
    config = adding_config(task, early_stopping_patience=patience, **params)

    result = fit_cpu(config)

    assert len(result.history) < config.params.max_epochs
    assert result.best_epoch is not None
    assert len(result.history) == result.best_epoch + patience + 1
    if config.params.lr < 1e-9:
        assert result.best_epoch == 0
        assert len(set(result.history)) == 1


def test_without_out_dir_nothing_is_written_and_test_is_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's trial path: metrics in memory only, no files, no test-split evaluation."""
    monkeypatch.chdir(tmp_path)  # Lightning's default_root_dir is the working directory

    result = fit_cpu(adding_config(max_epochs=2))

    assert list(tmp_path.iterdir()) == []
    assert result.test_value is None
    assert result.checkpoint is None
    assert result.value is not None
    assert result.value == min(result.history)
    assert len(result.history) == 2
    # The baseline is known without training, so it is reported anyway.
    assert result.baseline_name == "constant"
    assert result.baseline is not None


class LearningRates(Callback):
    """Records the first parameter group's learning rate at the start of each training epoch."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.values.append(float(trainer.optimizers[0].param_groups[0]["lr"]))


def test_step_schedule_trains_and_decays_per_epoch() -> None:
    """``lr_schedule: step`` runs epoch e at ``lr * decay ** max(0, e - start + 1)``."""
    config = adding_config(lr_schedule="step", lr=0.02, lr_decay=0.5, lr_decay_start=1)
    rates = LearningRates()

    result = fit_cpu(config, callbacks=[rates])

    assert len(result.history) == config.params.max_epochs
    assert all(math.isfinite(v) for v in result.history)
    assert rates.values == pytest.approx([0.02, 0.01, 0.005])


def test_divergence_raises_diverged_error() -> None:
    """SGD at the largest allowed lr without clipping blows up: an error, not NaN metrics."""
    config = adding_config(optimizer="sgd", lr=100.0, grad_clip=0.0, max_epochs=5)

    with pytest.raises(DivergedError, match="training diverged") as caught:
        fit_cpu(config)

    assert not math.isfinite(caught.value.loss)
    assert caught.value.epoch < config.params.max_epochs


def test_rerun_into_same_out_dir_replaces_best_checkpoint(tmp_path: Path) -> None:
    """Training into an existing output directory leaves one ``best.ckpt``: the new run's."""
    config = adding_config(max_epochs=1)
    fit_cpu(config, out_dir=tmp_path)

    result = fit_cpu(config, out_dir=tmp_path)

    assert result.checkpoint == str(tmp_path / "best.ckpt")
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["best.ckpt"]


def test_classify_ranked_by_cross_entropy_reports_accuracy_beside(tmp_path: Path) -> None:
    """``task.metric: val_loss``: the fit monitors validation cross-entropy (its value is
    the lowest epoch's), and records every validation metric of that epoch and every
    test metric beside it, accuracy included; the primary baseline is the class prior."""
    rows = []
    for i in range(60):  # two separable classes, lengths 3-6
        label = "a" if i % 2 else "b"
        offset = 1.0 if label == "a" else -1.0
        x = [[offset + 0.1 * ((i * 7 + t) % 5), offset] for t in range(3 + i % 4)]
        rows.append({"x": x, "label": label, "split": "test" if i >= 48 else "train"})
    path = tmp_path / "seq.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    task = {"kind": "classify", "path": str(path), "metric": "val_loss"}
    result = fit_cpu(
        parse_config({"task": task, "params": {**TINY, "max_epochs": 4}}),
        out_dir=tmp_path / "out",
    )
    assert (result.metric, result.direction) == ("val_loss", "minimize")
    assert result.value == min(result.history) and result.best_epoch is not None
    assert result.val_metrics["val_loss"] == result.value
    assert 0.0 <= result.val_metrics["val_acc"] <= 1.0
    assert result.test_value == result.test_metrics["test_loss"]
    assert 0.0 <= result.test_metrics["test_acc"] <= 1.0
    assert result.baseline_name == "prior" and result.baseline == pytest.approx(math.log(2))
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["test_metrics"] == result.test_metrics
