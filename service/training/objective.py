"""The only place an Optuna trial is seen: sample its config, train it, report, return.

Also builds the sampler and pruner a spec asks for, so that every worker process builds
them the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from service.artifacts import CHECKPOINT_KINDS, CheckpointStore
from service.artifacts import original_trial_number as original_number
from service.errors import DataError, InvalidSpec
from service.estimate import GB, estimate_config, too_large_reason
from service.search_space import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    ResolvedConfig,
    StudySpec,
    SyntheticTask,
    check_data_paths,
    grid_steps,
    parse_bound,
    sample_config,
)
from service.states import (
    BASELINES_ATTR,
    CONFIG_ATTR,
    RESUMED_FROM_ATTR,
    RETRY_OF_ATTR,
    TEST_METRICS_ATTR,
    TEST_VALUE_ATTR,
    VAL_METRICS_ATTR,
)
from service.training.interrupts import TrialGuard

log = logging.getLogger("lstm_hpo.worker")


class SyntheticFailure(RuntimeError):
    """The synthetic task was told to fail for this configuration (``fail_when``)."""


class NonFiniteMetric(RuntimeError):
    """A trial's validation metric is NaN or infinite: the trial FAILs (never PRUNED, and
    never a value), whatever the pruner would make of it (Optuna's prune NaN)."""

    def __init__(self, value: float, metric: str, epoch: int | None = None) -> None:
        where = f"{metric}" if epoch is None else f"{metric} at epoch {epoch}"
        super().__init__(f"metric is {value} ({where})")


def check_finite(value: float, metric: str, epoch: int | None = None) -> float:
    """``value`` when it is finite; else raises :class:`NonFiniteMetric`."""
    if not math.isfinite(value):
        raise NonFiniteMetric(value, metric, epoch)
    return value


def run_trial(
    trial: optuna.Trial,
    spec: StudySpec,
    *,
    data_roots: tuple[Path, ...] | None = None,
    accelerator: str = "auto",
    worker_memory_gb: float | None = None,
    checkpoints: TrialCheckpoints | None = None,
    guard: TrialGuard | None = None,
    on_configured: Callable[[], None] | None = None,
) -> float:
    """Train the config ``trial`` samples from ``spec``; return its best validation metric.

    ``on_configured`` is called once the config is sampled and recorded on the trial,
    before it trains (the worker publishes the trial's set-up there in one transaction:
    :meth:`service.worker_storage.WorkerStorage.publish_setup`).

    With ``worker_memory_gb`` (the worker's ``LSTM_HPO_WORKER_MEMORY_GB``), a config whose
    estimated training step needs more is not trained: see :func:`prune_if_too_large`.

    With ``checkpoints``, a real trial saves a checkpoint at the end of every epoch, and a
    retry resumes from the last one its chain saved (see :func:`_resume_point`).

    With ``guard``, every step boundary checks the worker's preemption notice and the
    study's ``trial_timeout_s`` (:mod:`service.training.interrupts`).

    Raises ``optuna.TrialPruned`` when the pruner stops it, ``TrialPreempted`` /
    ``TrialTimedOut`` when the guard stops it, and any training error as is (the worker
    records it as the trial's failure reason).
    """
    # The submit check, again at the read: a data root's link may have changed since.
    if outside := check_data_paths(spec.task, data_roots):
        raise DataError(f"{outside[0]}")
    config = sample_config(trial, spec)
    trial.set_user_attr(CONFIG_ATTR, config.model_dump(mode="json", exclude_none=True))
    if worker_memory_gb is not None:
        prune_if_too_large(trial, config, worker_memory_gb, data_roots)
    record_model_cost(trial, spec, config, accelerator, data_roots)
    if spec.study.confirm_of is not None and isinstance(config.task, SyntheticTask):
        trial.set_user_attr(TEST_VALUE_ATTR, synthetic_test_value(config))
    if on_configured is not None:
        on_configured()
    if isinstance(config.task, SyntheticTask):
        return _synthetic(trial, config, config.task, guard or TrialGuard(), spec)

    # torch + lightning are imported only where training happens: the API server never does.
    from optuna_integration import PyTorchLightningPruningCallback

    from service.training.fit import (
        configure_torch_threads,
        fit_config,
        leave_signals_to_the_worker,
    )

    # A worker loads torch here, at its first real trial; its threads: OMP_NUM_THREADS.
    configure_torch_threads()
    if guard is not None:  # a worker's trial: SIGTERM / SIGUSR1 are the worker's
        leave_signals_to_the_worker()
    with tempfile.TemporaryDirectory(prefix="lstm-hpo-resume-") as tmp:
        resume_from = (
            _resume_point(trial, checkpoints, Path(tmp), report=not spec.is_multi_objective)
            if checkpoints
            else None
        )
        # The finite check first: the pruner must never see (and prune on) a NaN. Optuna
        # cannot report (nor prune) a multi-objective trial's curve.
        callbacks = [_finite_metric_callback(spec.metric.name)]
        if not spec.is_multi_objective:
            callbacks.append(PyTorchLightningPruningCallback(trial, monitor=spec.metric.name))
        result = fit_config(
            config,
            callbacks=callbacks,
            data_roots=data_roots,
            accelerator=accelerator,
            evaluate_test=spec.study.confirm_of is not None,  # a confirmation's trial
            save_checkpoint=checkpoints.saver(original_trial_number(trial))
            if checkpoints
            else None,
            resume_from=resume_from,
            late_callbacks=[guard.lightning_callback()] if guard else (),
        )
    trial.set_user_attr(BASELINES_ATTR, result.val_baselines)
    if result.val_metrics:
        trial.set_user_attr(VAL_METRICS_ATTR, result.val_metrics)
    if result.test_value is not None:  # a confirmation study's trial (service.confirm)
        trial.set_user_attr(TEST_VALUE_ATTR, result.test_value)
        trial.set_user_attr(TEST_METRICS_ATTR, result.test_metrics)
    if result.value is None:
        raise RuntimeError(f"no finite validation {spec.metric.name} in any epoch")
    return result.value


@dataclass(frozen=True)
class TrialCheckpoints:
    """Where a worker's trial keeps its checkpoints: the store, the study's job id, and a
    check the worker runs before each save (it raises once the trial is no longer the
    worker's: a reaped trial must stop, and must not overwrite its retry's checkpoints)."""

    store: CheckpointStore
    job_id: str
    check_owned: Callable[[], None] = lambda: None

    def saver(self, original_number: int) -> Callable[[Path, str], None]:
        """``fit_config``'s ``save_checkpoint`` hook for the chain of ``original_number``."""

        def save(path: Path, kind: str) -> None:
            self.check_owned()
            if kind not in CHECKPOINT_KINDS:
                raise ValueError(f"unknown checkpoint kind {kind!r}")
            try:
                self.store.save(self.job_id, original_number, kind, path)
            except OSError as err:  # the trial is worth more than its checkpoint: go on
                log.warning(
                    "trial %d: could not save its %s checkpoint: %s", original_number, kind, err
                )

        return save


def original_trial_number(trial: optuna.Trial) -> int:
    """The number of the first trial of ``trial``'s retry chain (its own if not a retry):
    the key of the chain's checkpoints."""
    return original_number(trial.user_attrs, trial.number)


def _resume_point(
    trial: optuna.Trial, checkpoints: TrialCheckpoints, tmp: Path, *, report: bool = True
) -> Path | None:
    """For a retry whose chain saved a checkpoint: fetch it into ``tmp``, report the
    validation values of the epochs it holds to ``trial`` (the pruner sees the whole
    curve), record :data:`RESUMED_FROM_ATTR`, and return its path. None for a first
    attempt, or when there is no readable checkpoint (the retry starts at epoch 0)."""
    if RETRY_OF_ATTR not in trial.user_attrs:
        return None  # a fresh trial never resumes (a reused job id could hold stale files)
    from service.training.fit import read_checkpoint_progress

    original = original_trial_number(trial)
    path = tmp / "resume.ckpt"
    try:
        if not checkpoints.store.fetch(checkpoints.job_id, original, "last", path):
            return None
        progress = read_checkpoint_progress(path)
    except Exception as err:  # a torn or foreign file: start over rather than fail the trial
        log.warning(
            "trial %d: checkpoint of trial %d unusable (%s); starting at epoch 0",
            trial.number,
            original,
            err,
        )
        return None
    for step, value in enumerate(progress.history if report else ()):
        trial.report(value, step=step)
    trial.set_user_attr(RESUMED_FROM_ATTR, progress.epochs_done)
    log.info(
        "resumed trial %d from epoch %d (checkpoint of trial %d)",
        trial.number,
        progress.epochs_done,
        original,
    )
    return path


#: Trial user attributes holding the model's cost (``record_model_cost``).
PARAMS_ATTR = "params"
LATENCY_ATTR = "latency_ms"


def record_model_cost(
    trial: optuna.Trial,
    spec: StudySpec,
    config: ResolvedConfig,
    accelerator: str = "auto",
    data_roots: tuple[Path, ...] | None = None,
) -> None:
    """Record the trial's ``params`` (every trial that trains a model: the dashboard shows
    it) and, when ``study.objectives`` or ``study.constraints`` names it, ``latency_ms``
    (:func:`~service.training.fit.measure_model_cost`), as user attributes; then apply
    ``study.constraints``: each is an Optuna constraint (``trial.set_constraint``: the
    amount by which it is broken; <= 0 is feasible), and a configuration that breaks one
    raises ``optuna.TrialPruned`` untrained, with the reason.

    The synthetic task trains no model: its "cost" is a deterministic function of the
    params (``hidden_size**2 * num_layers * 4`` parameters), so tests can drive this.
    """
    constraints = spec.study.constraints or {}
    wanted = {*spec.objectives, *constraints} & {PARAMS_ATTR, LATENCY_ATTR}
    if isinstance(config.task, SyntheticTask):
        n = int(config.params.hidden_size or 1) ** 2 * config.params.num_layers * 4
        costs = {PARAMS_ATTR: float(n), LATENCY_ATTR: round(0.01 * math.sqrt(n), 6)}
    elif LATENCY_ATTR in wanted:
        from service.training.fit import measure_model_cost

        cost = measure_model_cost(config, accelerator=accelerator, data_roots=data_roots)
        costs = {PARAMS_ATTR: float(cost.params), LATENCY_ATTR: round(cost.latency_ms, 6)}
    else:
        try:
            costs = {PARAMS_ATTR: float(estimate_config(config, data_roots).params)}
        except InvalidSpec:
            return  # the data cannot be read: training fails on it, with the reason
    for name, value in costs.items():
        if name in wanted or name == PARAMS_ATTR:
            trial.set_user_attr(name, int(value) if name == PARAMS_ATTR else value)
    broken = []
    for name, bound_text in constraints.items():
        op, bound = parse_bound(bound_text)
        excess = costs[name] - bound if op == "<=" else bound - costs[name]
        trial.set_constraint(name, excess)
        if excess > 0:
            broken.append(f"{name} {costs[name]:.6g} breaks {op} {bound:g}")
    if broken:
        raise optuna.TrialPruned(f"infeasible (study.constraints): {'; '.join(broken)}")


def objective_values(spec: StudySpec, metric_value: float, trial: optuna.Trial) -> list[float]:
    """The values a trial tells, in ``study.objectives`` order: the metric's and the
    recorded costs (:func:`record_model_cost`)."""
    return [
        metric_value if name == spec.metric.name else float(trial.user_attrs[name])
        for name in spec.objectives
    ]


#: The Optuna constraint a worker's memory limit sets on each trial: the estimate minus the
#: limit, in GB (> 0: infeasible; constraint-aware samplers such as TPE rank those last).
MEMORY_CONSTRAINT = "memory_gb"


def prune_if_too_large(
    trial: optuna.Trial,
    config: ResolvedConfig,
    worker_memory_gb: float,
    data_roots: tuple[Path, ...] | None = None,
) -> None:
    """Record ``config``'s memory estimate as the trial's :data:`MEMORY_CONSTRAINT`
    (``trial.set_constraint``) and raise ``optuna.TrialPruned`` at once, untrained, with
    the reason ("too large for a worker: 12.3 GB > 8 GB") when it exceeds the limit.

    Whatever ``study.on_too_large`` says: a space refused at submit never gets here, and
    one accepted (``prune``, or a server with a higher limit than this worker) must not
    run a config this worker cannot hold.
    """
    try:
        cost = estimate_config(config, data_roots)
    except InvalidSpec:
        return  # the data cannot be read: training fails on it, with the reason
    trial.set_constraint(MEMORY_CONSTRAINT, (cost.total_bytes - worker_memory_gb * GB) / GB)
    reason = too_large_reason(cost, worker_memory_gb)
    if reason is not None:
        raise optuna.TrialPruned(reason)


def _finite_metric_callback(metric: str) -> Any:
    """A Lightning callback that raises :class:`NonFiniteMetric` at the end of a validation
    epoch whose ``metric`` is NaN/inf (before the pruning callback reports it)."""
    from lightning.pytorch.callbacks import Callback

    class FiniteMetric(Callback):
        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            value = trainer.callback_metrics.get(metric)
            if value is not None and not trainer.sanity_checking:
                check_finite(float(value), metric, trainer.current_epoch)

    return FiniteMetric()


def _matches(params: Mapping[str, Any], when: Mapping[str, Any] | None) -> bool:
    """Every name in ``when`` has its value (a list: one of them; an absent one is None)."""
    return bool(when) and all(_holds(params.get(k), v) for k, v in (when or {}).items())


def _holds(value: Any, wanted: Any) -> bool:
    return value == wanted or (isinstance(wanted, list) and value in wanted)


def synthetic_value(params: Mapping[str, Any]) -> float:
    """A deterministic, smooth function of the params with its optimum at a known point."""
    target = {"num_layers": 2, "hidden_size": 128, "dropout": 0.2, "lr": 3e-3}
    value = 0.0
    for name, best in target.items():
        x = params.get(name)
        if isinstance(x, int | float) and not isinstance(x, bool):
            scale = math.log10 if name in ("lr", "hidden_size") else float
            value += (scale(max(float(x), 1e-12)) - scale(best)) ** 2
    # A tiny deterministic term per config so that ties are broken reproducibly.
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).digest()
    return value + digest[0] / 2560.0


def _synthetic(
    trial: optuna.Trial,
    config: ResolvedConfig,
    task: SyntheticTask,
    guard: TrialGuard,
    spec: StudySpec,
) -> float:
    params = config.params.model_dump(mode="json")
    if _matches(params, task.fail_when):
        raise SyntheticFailure(f"synthetic failure for {task.fail_when}")
    epochs = config.params.max_epochs
    final = float("nan") if _matches(params, task.nan_when) else synthetic_value(params)
    for epoch in range(epochs):
        while _matches(params, task.hang_when):  # stuck inside a step: no guard check
            time.sleep(1.0)
        if task.sleep_s:
            time.sleep(task.sleep_s / epochs)
        guard.after_step(epoch)
        # Converges towards the final value like a learning curve.
        value = check_finite(final * (1.0 + 1.0 / (epoch + 1)), "value", epoch)
        if not spec.is_multi_objective:
            trial.report(value, step=epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")
        if epoch + 1 < epochs:
            guard.after_epoch(epoch + 1)
    return final


def trial_seed(spec: StudySpec, slot: int) -> int:
    """A distinct sampler seed per trial slot, so parallel workers do not propose the same point."""
    base = spec.study.seed if spec.study.seed is not None else 0
    return (base * 1_000_003 + slot) % (2**32)


def build_sampler(spec: StudySpec, seed: int | None) -> optuna.samplers.BaseSampler:
    """The sampler ``spec.study.sampler`` names, seeded with ``seed``."""
    name = spec.study.sampler
    if name == "tpe":
        # Optuna 5: multivariate TPE with constant liar is the default, which is what many
        # workers sharing one study need (running trials count as pessimistic results).
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    # The grid's seed is the study's, never the slot's: Optuna's GridSampler shuffles the
    # grid with it and gives trial number k grid point k, so every worker must hold the
    # same order for each point to run exactly once (per-slot seeds ran some points twice).
    return QueueGridSampler(grid_search_space(spec), seed=spec.study.seed or 0)


class QueueGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its ``study.stop()`` once the grid is exhausted.

    That call only works inside ``study.optimize``; our workers ``ask``/``tell``, and the
    queue (not the sampler) decides how many trials run: past the grid's end the sampler
    revisits grid points, as Optuna's does with several workers.
    """

    def after_trial(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        state: optuna.trial.TrialState,
        values: Sequence[float] | None,
    ) -> None:
        return None


def grid_search_space(spec: StudySpec) -> dict[str, list[Any]]:
    """Every searched parameter's grid, each value inside ``[low, high]``.

    Floats need a ``step`` that divides ``high - low`` (both checked at validation); the
    number of steps is floored with a tolerance (0.1 fits 9 times into [0, 0.9]), so even
    an unchecked step never puts a point above ``high``.
    """
    grid: dict[str, list[Any]] = {}
    for name, dist in spec.searched().items():
        if isinstance(dist, CategoricalDistribution):
            grid[name] = list(dist.choices)
        elif isinstance(dist, IntDistribution):
            grid[name] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, FloatDistribution) and dist.step is not None:
            n = grid_steps(dist.low, dist.high, dist.step)
            points = np.round(dist.low + dist.step * np.arange(n + 1), 12)
            grid[name] = [float(v) for v in np.clip(points, dist.low, dist.high)]
    return grid


def build_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The pruner ``spec.study.pruner`` names; resources are epochs, and no trial is pruned
    before it has trained more than ``study.pruner_warmup_epochs`` epochs."""
    name = spec.study.pruner
    warmup = spec.study.pruner_warmup_epochs
    max_epochs = spec.space.get("max_epochs")
    # Optuna's steps are 0-based epochs (step s has trained s + 1 epochs); Hyperband and
    # successive halving need a resource of at least 1.
    resource = max(1, warmup)
    max_resource: int | str = max(max_epochs, resource) if isinstance(max_epochs, int) else "auto"
    if name == "median":
        # n_min_trials: the median at a step needs 5 curves that reached it; warm-start
        # copies (study.warm_start_from) count as complete trials but carry no curve.
        return optuna.pruners.MedianPruner(
            n_startup_trials=5, n_warmup_steps=warmup, n_min_trials=5
        )
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=resource, max_resource=max_resource)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=resource)
    return optuna.pruners.NopPruner()


def synthetic_test_value(config: ResolvedConfig) -> float:
    """The synthetic task's stand-in for a confirmation trial's test metric (it has no
    test split): its validation value plus a small deterministic term of its params, seed
    included (0.01-0.05), so the confirmation's statistics are tested without training."""
    params = config.params.model_dump(mode="json")
    digest = hashlib.sha256(json.dumps([params, "test"], sort_keys=True).encode()).digest()
    return synthetic_value(params) + 0.01 + digest[0] / 6400.0
