"""Train one resolved config with Lightning: the path of `lstm-hpo train` and of every trial."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.seed import isolate_rng

from service.search_space import (
    Direction,
    ResolvedConfig,
    TaskMetric,
    check_refit,
    stage_metric,
    task_metric,
)
from service.training.checkpoints import REFIT_KEY, SavedModel, load_model_weights
from service.training.data import TaskData, build_task_data
from service.training.data.base import InMemoryDataModule, split_batch
from service.training.model import count_parameters
from service.training.module import LSTMLightningModule
from service.training.run_dir import SELECTION_DIR


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
    #: Every validation metric at the best epoch (``val_loss``, ``val_acc``, ...): what
    #: the ranked one is reported beside.
    val_metrics: dict[str, float] = field(default_factory=dict)
    #: Every test-split metric of the best checkpoint (when evaluated).
    test_metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None
    description: str = ""
    #: The epoch (0-based) training continued at when it resumed from a checkpoint.
    resumed_from_epoch: int | None = None
    #: The checkpoint whose weights training started from (``init_from``).
    init_from: str | None = None
    #: With ``init_from``: the validation metric of those weights, before any training.
    initial_value: float | None = None
    #: A refit (:func:`refit_config`): ``epochs`` trained on train + validation, and
    #: ``selection``, the validated fit those epochs came from (None when they were given).
    refit: dict[str, Any] | None = None

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
    """Records the monitored validation metric after each epoch; kept in checkpoints, so a
    resumed fit knows every epoch's value (its best-so-far and the curve for the pruner)."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.values: list[float] = []
        #: Every ``val_*`` metric of each recorded epoch.
        self.all_values: list[dict[str, float]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is not None:
            self.values.append(float(value))
            self.all_values.append(_stage_metrics(trainer.callback_metrics, "val"))

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "values": list(self.values), "all": self.all_values}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.values = [float(v) for v in state_dict["values"]]
        # A checkpoint from before "all" was kept holds the ranked metric alone.
        self.all_values = list(state_dict.get("all", [{self.metric: v} for v in self.values]))


def _stage_metrics(metrics: Mapping[str, Any], stage: str) -> dict[str, float]:
    """The ``<stage>_*`` epoch metrics of ``metrics`` (Lightning's logged values) as floats."""
    return {
        name: float(value)
        for name, value in metrics.items()
        if name.startswith(f"{stage}_") and not name.endswith("_step")
    }


#: ``save(path, kind)``: store the checkpoint file at ``path`` as the trial's ``kind``
#: checkpoint (``"last"`` every epoch; ``"best"`` too when the epoch is the best so far).
SaveCheckpoint = Callable[[Path, str], None]


class EpochCheckpoints(Callback):
    """At the end of every training epoch (after its validation), writes a Lightning
    checkpoint (model, optimizers, LR schedulers, loops and epoch, callback states: the
    validation history, early stopping's best score) to a temporary file and hands it to
    ``save`` as ``"last"`` and, when its metric is the best so far, as ``"best"``.

    Pruned or failed epochs (the pruning and finite-metric callbacks raise in
    ``on_validation_end``) are never saved.
    """

    def __init__(self, save: SaveCheckpoint, history: ValidationHistory, direction: Direction):
        self.save = save
        self.history = history
        self.direction = direction

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        values = self.history.values
        _, best_epoch = _best(values, self.direction)
        is_best = best_epoch is not None and best_epoch == len(values) - 1
        with tempfile.TemporaryDirectory(prefix="lstm-hpo-ckpt-") as tmp:
            path = Path(tmp) / "epoch.ckpt"
            trainer.save_checkpoint(path)
            self.save(path, "last")
            if is_best:
                self.save(path, "best")


class RngStates(Callback):
    """Keeps the global RNG states (torch, numpy, Python; CUDA where present) in every
    checkpoint, which Lightning does not: a fit resumed from one draws the same shuffles
    and dropout masks as an uninterrupted fit (in every fit, so any checkpoint resumes)."""

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _collect_rng_states(include_cuda=torch.cuda.is_available())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callback states before the first epoch's data loader draws
        # its shuffle seed: from here on the RNG streams continue as they were.
        _set_rng_states(state_dict["rng"])


class RefitRecord(Callback):
    """Writes a refit's record into its checkpoints (``checkpoints.REFIT_KEY``), so that
    ``train --evaluate`` can say the validation split was trained on."""

    def __init__(self, record: Mapping[str, Any]) -> None:
        self.record = dict(record)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[REFIT_KEY] = self.record


@dataclass(frozen=True)
class CheckpointProgress:
    """What a trial checkpoint says about the training it holds."""

    #: Epochs trained: the (0-based) epoch a fit resumed from it starts at.
    epochs_done: int
    #: The validation metric after each of those epochs.
    history: list[float]


def read_checkpoint_progress(path: Path) -> CheckpointProgress:
    """The epochs and validation history stored in a checkpoint :class:`EpochCheckpoints`
    wrote (ValueError when it is not one)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    states = ckpt.get("callbacks", {}) if isinstance(ckpt, dict) else {}
    history = next(
        (s for key, s in states.items() if str(key).startswith("ValidationHistory")), None
    )
    if history is None or "epoch" not in ckpt:
        raise ValueError(f"{path} is not an lstm-hpo trial checkpoint")
    return CheckpointProgress(epochs_done=int(ckpt["epoch"]) + 1, history=list(history["values"]))


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
    save_checkpoint: SaveCheckpoint | None = None,
    resume_from: Path | None = None,
    init_from: SavedModel | None = None,
    late_callbacks: Sequence[Callback] = (),
    on_start: Callable[[], None] | None = None,
) -> FitResult:
    """Train ``config`` and return its metrics.

    With ``out_dir``, the best checkpoint, ``config.yaml``, ``metrics.csv`` and
    ``result.json`` are written there and (by default) the best checkpoint is evaluated on
    the test split. Without it nothing touches the disk (the worker's trial path).
    Divergence (NaN/inf loss) raises ``module.DivergedError``.

    ``save_checkpoint`` (the worker's trial path): called at the end of every epoch with a
    checkpoint file (see :class:`EpochCheckpoints`). ``resume_from``: such a checkpoint of
    this same config; training continues at the epoch after it, and the result (history,
    best value) covers the epochs before it too.

    ``late_callbacks`` run after every other callback, the epoch checkpoint's included (the
    worker's step guard: a preempted trial stops only once its epoch is saved).

    ``init_from`` (`lstm-hpo train --init-from`): a checkpoint's model whose weights training
    starts from, and only its weights: the optimizer and LR schedule start afresh and epochs
    count from 0 (fine-tuning). Raises :class:`~service.errors.CheckpointMismatch` naming
    what differs when its network is not the one the config builds. The result's
    ``initial_value`` is the validation metric of those weights before training.

    ``on_start``: called once the data and model are ready, before anything is written
    (`train --out`: the earlier run in the directory is replaced only then, so a run that
    its data or checkpoint refuse loses nothing).
    """
    if init_from is not None and resume_from is not None:
        raise ValueError("init_from starts a new fit; resume_from continues one: not both")
    params = config.params
    metric, data, model = _prepare(config, init_from, data_roots)
    if on_start is not None:
        on_start()
    initial_value: float | None = None
    if init_from is not None:
        initial_value = _score(model, data, "val", metric.name, accelerator)
    history = ValidationHistory(metric.name)
    all_callbacks: list[Callback] = [history, RngStates(), *callbacks]
    if save_checkpoint is not None:
        all_callbacks.append(EpochCheckpoints(save_checkpoint, history, metric.direction))
    resumed_from_epoch: int | None = None
    if resume_from is not None:
        resumed_from_epoch = read_checkpoint_progress(resume_from).epochs_done
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
    all_callbacks += late_callbacks
    trainer = _trainer(
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
    # weights_only=False: our own checkpoints hold RNG states (numpy arrays, tuples).
    trainer.fit(model, datamodule=data.datamodule, ckpt_path=resume_from, weights_only=False)
    # Copied now: testing the best checkpoint restores the callbacks' states as they were
    # at that epoch, which would cut the history off there.
    values, all_values = list(history.values), list(history.all_values)
    value, best_epoch = _best(values, metric.direction)
    test_value: float | None = None
    test_metrics: dict[str, float] = {}
    if evaluate_test is None:
        evaluate_test = checkpoint is not None
    if evaluate_test and value is not None:
        ckpt = checkpoint.best_model_path if checkpoint and checkpoint.best_model_path else None
        results = trainer.test(
            model, datamodule=data.datamodule, ckpt_path=ckpt, verbose=False, weights_only=False
        )
        test_value = float(results[0][stage_metric(metric.name, "test")])
        test_metrics = _stage_metrics(results[0], "test")
    result = FitResult(
        metric=metric.name,
        direction=metric.direction,
        value=value,
        test_value=test_value,
        **_baselines(data),
        history=values,
        best_epoch=best_epoch,
        val_metrics=all_values[best_epoch] if best_epoch is not None else {},
        test_metrics=test_metrics,
        checkpoint=checkpoint.best_model_path
        if checkpoint and checkpoint.best_model_path
        else None,
        description=data.description,
        resumed_from_epoch=resumed_from_epoch,
        init_from=str(init_from.path) if init_from is not None else None,
        initial_value=initial_value,
    )
    if out_dir is not None:
        (out_dir / "result.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
    return result


def refit_config(
    config: ResolvedConfig,
    *,
    out_dir: Path,
    epochs: int | None = None,
    progress: bool = False,
    accelerator: str = "auto",
    data_roots: tuple[Path, ...] | None = None,
    on_phase: Callable[[str], None] | None = None,
    on_start: Callable[[], None] | None = None,
) -> FitResult:
    """Retrain ``config`` on the train and validation splits together, for the number of
    epochs its validated fit peaked at, and score the final weights on the test split.

    The refit of early stopping in Goodfellow, Bengio & Courville, *Deep Learning* (2016),
    sec. 7.8 (its first strategy: retrain from scratch on all the data for the epochs the
    validated run took), and scikit-learn's ``refit``: the validation split chose the
    config and its epoch count; it then trains too. Measured on the bundled JapaneseVowels
    and airline tasks (BENCHMARKS.md, "Refitting the finalist"): no gain, paired over seeds.

    ``epochs`` None: first fit ``config`` as :func:`fit_config` does (into
    ``out_dir/selection``: validated, early stopping as configured), then refit for its
    best epoch + 1. Same seed, same initial weights; the LR schedule is the config's (a
    cosine still spans ``max_epochs``), so the refit replays the validated fit's rates.
    Written to ``out_dir``: ``config.yaml``, ``refit.ckpt`` (the last epoch's),
    ``metrics.csv``, ``result.json``. The result's ``value``, ``val_metrics`` and
    ``best_epoch`` are the validated fit's (None when ``epochs`` was given): validation
    scores of the refit model would be on data it trained on. ``refit`` holds
    ``epochs``, ``splits`` and ``selection`` (the validated fit's value, best epoch and
    test scores, for comparison). ``on_phase`` is told, in a line, when each fit starts;
    ``on_start`` is called as :func:`fit_config` calls it, once, before the first fit.

    Raises :class:`~service.errors.InvalidConfig` as
    :func:`~service.search_space.check_refit` does (the plateau schedule; ``epochs``
    outside 1..max_epochs); RuntimeError when the validated fit has no epoch with a finite
    metric; the errors of :func:`fit_config` otherwise.
    """
    params = config.params
    check_refit(params, epochs)
    say = on_phase or (lambda _: None)
    selection: FitResult | None = None
    if epochs is None:

        def selection_started() -> None:  # its line once the data are read: after the CLI's
            if on_start is not None:
                on_start()
            where = out_dir / SELECTION_DIR
            say(f"1/2 validated fit (train; validation picks the epoch) -> {where}")

        selection = fit_config(
            config,
            out_dir=out_dir / SELECTION_DIR,
            progress=progress,
            accelerator=accelerator,
            data_roots=data_roots,
            on_start=selection_started,
        )
        if selection.best_epoch is None:
            raise RuntimeError("refit: the validated fit had no epoch with a finite metric")
        epochs = selection.best_epoch + 1
        say(f"2/2 refit: {epochs} epoch(s) on train + validation -> {out_dir}")
    metric, data, model = _prepare(config, None, data_roots)
    if not isinstance(data.datamodule, InMemoryDataModule):
        raise TypeError(f"{config.task.kind}: its data module cannot train on validation")
    if selection is None and on_start is not None:
        on_start()
    data.datamodule.train_on_val = True
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
    # monitor=None: the last epoch's weights (there is no unseen validation to pick by).
    checkpoint = ModelCheckpoint(dirpath=out_dir, filename="refit", enable_version_counter=False)
    record = {"epochs": epochs, "splits": "train+val"}
    trainer = _trainer(
        max_epochs=epochs,
        accelerator=accelerator,
        devices=1,
        gradient_clip_val=params.grad_clip or None,
        callbacks=[RefitRecord(record), checkpoint],
        logger=L.pytorch.loggers.CSVLogger(out_dir, name="", version=""),
        limit_val_batches=0,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=out_dir,
    )
    trainer.fit(model, datamodule=data.datamodule)
    results = trainer.test(model, datamodule=data.datamodule, verbose=False)
    test_metrics = _stage_metrics(results[0], "test")
    chosen = None
    if selection is not None:
        chosen = {
            key: getattr(selection, key)
            for key in ("value", "best_epoch", "test_value", "test_metrics", "checkpoint")
        }
    result = FitResult(
        metric=metric.name,
        direction=metric.direction,
        value=selection.value if selection else None,
        test_value=test_metrics.get(stage_metric(metric.name, "test")),
        **_baselines(data),
        history=selection.history if selection else [],
        best_epoch=selection.best_epoch if selection else None,
        val_metrics=selection.val_metrics if selection else {},
        test_metrics=test_metrics,
        checkpoint=checkpoint.best_model_path or None,
        description=f"{data.description}; refit on train + val for {epochs} epoch(s)",
        refit={**record, "selection": chosen},
    )
    (out_dir / "result.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
    return result


def _baselines(data: TaskData) -> dict[str, Any]:
    """The :class:`FitResult` fields that report a task's trivial baselines."""
    primary = data.primary_baseline
    return {
        "baseline": data.test_baselines.get(primary),
        "baseline_name": primary,
        "baselines": dict(data.test_baselines),
        "val_baselines": dict(data.val_baselines),
    }


def evaluate_checkpoint(
    config: ResolvedConfig,
    saved: SavedModel,
    *,
    accelerator: str = "auto",
    data_roots: tuple[Path, ...] | None = None,
    on_start: Callable[[], None] | None = None,
) -> FitResult:
    """Score a checkpoint's model on the validation and test splits of ``config``'s task,
    without training (`lstm-hpo train --evaluate`); ``on_start`` is called once the data
    and model are ready.

    The data are built exactly as :func:`fit_config` builds them (same seed, same splits),
    so the best checkpoint of a fit scores what that fit reported. ``value`` is the
    validation metric, ``best_epoch`` the epoch the weights are from, ``history`` empty;
    ``refit`` the checkpoint's refit record (its validation split was trained on: ``value``
    is then no held-out score). Raises :class:`~service.errors.CheckpointMismatch` as
    :func:`fit_config` does.
    """
    metric, data, model = _prepare(config, saved, data_roots)
    if on_start is not None:
        on_start()
    val_metrics = _score_all(model, data, "val", accelerator)
    test_metrics = _score_all(model, data, "test", accelerator)
    return FitResult(
        metric=metric.name,
        direction=metric.direction,
        value=val_metrics.get(metric.name),
        test_value=test_metrics.get(stage_metric(metric.name, "test")),
        **_baselines(data),
        val_metrics=val_metrics,
        test_metrics=test_metrics,
        best_epoch=saved.epoch,
        checkpoint=str(saved.path),
        description=data.description,
        refit={**saved.refit, "selection": None} if saved.refit else None,
    )


def _prepare(
    config: ResolvedConfig, weights: SavedModel | None, data_roots: tuple[Path, ...] | None
) -> tuple[TaskMetric, TaskData, LSTMLightningModule]:
    """Seed, build the task's data and the module: the same for a fit and an evaluation,
    so that a checkpoint scores what its fit reported."""
    silence_lightning()
    L.seed_everything(config.params.seed, workers=True, verbose=False)
    data = build_task_data(config.task, config.params, data_roots)
    return task_metric(config.task), data, _build_module(config, data, weights)


def _build_module(
    config: ResolvedConfig, data: TaskData, weights: SavedModel | None
) -> LSTMLightningModule:
    """The LightningModule for ``config`` on ``data``; with ``weights``, theirs (checked)."""
    model = LSTMLightningModule(
        params=config.params.model_dump(mode="json"),
        problem=dataclasses.asdict(data.problem),
        # Recorded in every checkpoint, so that the file says what it was trained on.
        task=config.task.model_dump(mode="json", exclude_none=True),
    )
    if weights is not None:
        load_model_weights(model, weights, config.params, data.problem, config.task.kind)
    return model


@dataclass(frozen=True)
class ModelCost:
    """What a config's network costs to keep and to run, measured on the real module."""

    #: Trainable parameters.
    params: int
    #: Median wall time of one forward pass at batch 1 (one sample of the validation
    #: split), in milliseconds, on the device the worker trains on.
    latency_ms: float


def measure_model_cost(
    config: ResolvedConfig,
    *,
    accelerator: str = "auto",
    data_roots: tuple[Path, ...] | None = None,
    repeats: int = 30,
) -> ModelCost:
    """Build ``config``'s module (untrained: latency does not depend on the weights) and
    time ``repeats`` forward passes at batch 1 after 5 warm-up passes, under
    ``torch.inference_mode``; CUDA is synchronised around each pass. Deterministic only in
    ``params``: the latency is a measurement of this machine, as users deploy it.
    """
    import time

    _metric, data, module = _prepare(config, None, data_roots)
    device = torch.device(
        "cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"
    )
    module = module.to(device).eval()
    data.datamodule.setup("fit")
    batch = next(iter(data.datamodule.val_dataloader()))
    parts = split_batch(data.problem, batch)
    x = parts.x[:1].to(device)
    lengths = parts.lengths[:1] if parts.lengths is not None else None
    times = []
    with torch.inference_mode():
        for i in range(5 + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            module(x, lengths)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 5:
                times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    return ModelCost(
        params=count_parameters(module.model, trainable_only=True),
        latency_ms=times[len(times) // 2],
    )


def _score(
    model: LSTMLightningModule, data: TaskData, stage: str, metric: str, accelerator: str
) -> float | None:
    """``model``'s ``metric`` (``val_*``) on the ``stage`` split (see :func:`_score_all`)."""
    return _score_all(model, data, stage, accelerator).get(stage_metric(metric, stage))


def _score_all(
    model: LSTMLightningModule, data: TaskData, stage: str, accelerator: str
) -> dict[str, float]:
    """Every metric of ``model`` on the ``stage`` ("val" or "test") split, by its logged
    name (``test_loss``, ``test_acc``, ...), with a Trainer of its own (no logger,
    checkpoints or callbacks of a fit see it)."""
    trainer = _trainer(
        accelerator=accelerator,
        devices=1,
        # Under inference mode the metrics' states would become inference tensors, which
        # the fit that follows (init_from) could not update in place.
        inference_mode=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # Evaluation draws from the global RNGs (each data loader's base seed): a fit that
    # follows must draw the same shuffles and dropout masks as one without it.
    with isolate_rng():
        if stage == "val":
            results = trainer.validate(model, datamodule=data.datamodule, verbose=False)
        else:
            results = trainer.test(model, datamodule=data.datamodule, verbose=False)
    return _stage_metrics(results[0], stage) if results else {}


#: Set by :func:`leave_signals_to_the_worker`: every Trainer of this process keeps out of
#: SIGTERM / SIGUSR1 and of Slurm's environment.
_WORKER_OWNS_SIGNALS = threading.Event()


def leave_signals_to_the_worker() -> None:
    """Make every Trainer of this process leave SIGTERM and SIGUSR1 to the worker.

    Lightning's own handler ends ``fit()`` at the next batch on SIGTERM (a
    ``SIGTERMException``, which is a ``SystemExit``: the process would die without giving
    its trial back) and, when it detects Slurm, requeues the whole Slurm job on SIGUSR1.
    A worker handles both itself (:mod:`service.training.interrupts`: checkpoint at the
    epoch's end, requeue the trial), and runs one device per process whatever Slurm says.
    """
    _WORKER_OWNS_SIGNALS.set()


def _trainer(**kwargs: Any) -> L.Trainer:
    """``L.Trainer(**kwargs)``; in a worker (:func:`leave_signals_to_the_worker`), one that
    registers no signal handler and ignores Slurm (Lightning's signal connector is private:
    ``register_signal_handlers`` is what ``Trainer._run`` calls; tests/fault/
    test_preemption.py checks that a SIGTERM during a fit is the worker's)."""
    if not _WORKER_OWNS_SIGNALS.is_set():
        return L.Trainer(**kwargs)
    from lightning.fabric.plugins.environments.lightning import LightningEnvironment

    trainer = L.Trainer(plugins=[LightningEnvironment()], **kwargs)
    trainer._signal_connector.register_signal_handlers = lambda: None  # type: ignore[method-assign]
    return trainer


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
