"""Train one resolved config with Lightning: the path of `lstm-hpo train` and of every trial."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from service.search_space import Direction, ResolvedConfig, task_metric
from service.training.data import build_task_data
from service.training.module import LSTMLightningModule


def silence_lightning() -> None:
    """Turn off Lightning's banners ("GPU available", tips, the num_workers hint).

    Workers run thousands of fits; the messages say nothing the service does not already know.
    """
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # In-memory tensors: worker processes for loading would only add start-up cost.
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*litlogger.*", category=UserWarning)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    # Small data sets have fewer batches than the step-logging interval: nothing is lost.
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    # We write config.yaml into the run directory before the checkpoint callback looks at it.
    warnings.filterwarnings("ignore", message=r".*exists and is not empty.*")


@dataclass(frozen=True)
class FitResult:
    """What one training run achieved."""

    metric: str
    direction: Direction
    #: Best validation metric over the epochs (None if validation never ran).
    value: float | None
    #: The test-split metric of the best checkpoint (None unless evaluated).
    test_value: float | None
    #: The primary trivial baseline on the test split, and every baseline by name.
    baseline: float | None
    baseline_name: str
    baselines: dict[str, float] = field(default_factory=dict)
    val_baselines: dict[str, float] = field(default_factory=dict)
    #: The validation metric after each epoch.
    history: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    checkpoint: str | None = None
    description: str = ""

    @property
    def beats_baseline(self) -> bool:
        """Whether the test metric is better than the primary trivial baseline."""
        if self.test_value is None or self.baseline is None:
            return False
        if self.direction == "minimize":
            return self.test_value < self.baseline
        return self.test_value > self.baseline

    def summary(self) -> dict[str, Any]:
        """The JSON line `lstm-hpo train --json` prints."""
        out = dataclasses.asdict(self)
        return {k: out[k] for k in ("metric", "value", "test_value", "baseline")} | {
            k: v for k, v in out.items() if k not in ("metric", "value", "test_value", "baseline")
        }


class ValidationHistory(Callback):
    """Records the monitored validation metric after each epoch."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.values: list[float] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is not None:
            self.values.append(float(value))


def _best(values: Sequence[float], direction: Direction) -> tuple[float | None, int | None]:
    finite = [(v, i) for i, v in enumerate(values) if math.isfinite(v)]
    if not finite:
        return None, None
    pick = min if direction == "minimize" else max
    value, epoch = pick(finite, key=lambda pair: pair[0])
    return value, epoch


def fit_config(
    config: ResolvedConfig,
    *,
    out_dir: Path | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = False,
    evaluate_test: bool | None = None,
    accelerator: str = "auto",
    data_roots: tuple[Path, ...] | None = None,
) -> FitResult:
    """Train ``config`` and return its metrics.

    With ``out_dir``, the best checkpoint, ``config.yaml``, ``metrics.csv`` and
    ``result.json`` are written there and (by default) the best checkpoint is evaluated on
    the test split. Without it nothing touches the disk (the worker's trial path).
    Divergence (NaN/inf loss) raises ``module.DivergedError``.
    """
    silence_lightning()
    params = config.params
    metric = task_metric(config.task)
    L.seed_everything(params.seed, workers=True, verbose=False)
    data = build_task_data(config.task, params, data_roots)
    model = LSTMLightningModule(
        params=params.model_dump(mode="json"), problem=dataclasses.asdict(data.problem)
    )
    history = ValidationHistory(metric.name)
    all_callbacks: list[Callback] = [history, *callbacks]
    checkpoint: ModelCheckpoint | None = None
    mode = "min" if metric.direction == "minimize" else "max"
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
        checkpoint = ModelCheckpoint(
            dirpath=out_dir,
            filename="best",
            monitor=metric.name,
            mode=mode,
            save_top_k=1,
            enable_version_counter=False,  # a re-run into the same --out replaces best.ckpt
        )
        all_callbacks.append(checkpoint)
    if params.early_stopping_patience:
        all_callbacks.append(
            EarlyStopping(
                monitor=metric.name,
                mode=mode,
                patience=params.early_stopping_patience,
                check_finite=False,
            )
        )
    trainer = L.Trainer(
        max_epochs=params.max_epochs,
        accelerator=accelerator,
        devices=1,
        gradient_clip_val=params.grad_clip or None,
        callbacks=all_callbacks,
        logger=L.pytorch.loggers.CSVLogger(out_dir, name="", version="")
        if out_dir is not None
        else False,
        enable_checkpointing=checkpoint is not None,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=out_dir,
    )
    trainer.fit(model, datamodule=data.datamodule)
    value, best_epoch = _best(history.values, metric.direction)
    test_value: float | None = None
    if evaluate_test is None:
        evaluate_test = checkpoint is not None
    if evaluate_test and value is not None:
        ckpt = checkpoint.best_model_path if checkpoint and checkpoint.best_model_path else None
        results = trainer.test(
            model, datamodule=data.datamodule, ckpt_path=ckpt, verbose=False, weights_only=False
        )
        test_value = float(results[0]["test_" + metric.name.removeprefix("val_")])
    primary = data.primary_baseline
    result = FitResult(
        metric=metric.name,
        direction=metric.direction,
        value=value,
        test_value=test_value,
        baseline=data.test_baselines.get(primary),
        baseline_name=primary,
        baselines=dict(data.test_baselines),
        val_baselines=dict(data.val_baselines),
        history=history.values,
        best_epoch=best_epoch,
        checkpoint=checkpoint.best_model_path
        if checkpoint and checkpoint.best_model_path
        else None,
        description=data.description,
    )
    if out_dir is not None:
        (out_dir / "result.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
    return result


def configure_torch_threads(threads: int | None = None) -> None:
    """Pin torch's intra-op threads: N processes x M threads must fit the cores.

    None: ``OMP_NUM_THREADS`` when it is set (a worker process sets it for its share of the
    cores before it imports torch), else torch's own choice.
    """
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(env) if env.isdigit() else None
    if threads:
        torch.set_num_threads(threads)
