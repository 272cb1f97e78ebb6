"""Per-epoch trial checkpoints and resuming from them, in process (real Lightning fits of
a tiny LSTM on the 10-step adding problem, CPU, one torch thread).

- ``fit_config(save_checkpoint=...)`` hands over a checkpoint at the end of every epoch
  (``last``) and at every new best (``best``);
- a fit resumed from the checkpoint of an interrupted one continues at the next epoch and
  ends bit for bit where an uninterrupted fit ends (dropout, shuffling and an LR schedule
  included: the RNG states travel in the checkpoint);
- ``run_trial`` of a retry (``retry_of`` set, as the reaper enqueues it) resumes from its
  chain's checkpoint, reports the earlier epochs' values first and records
  ``resumed_from_epoch``; a first attempt never resumes.

The real-process version (kill -9 of a worker) is tests/fault/test_resume.py.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import optuna
import pytest
from lightning.pytorch.callbacks import Callback

from service.artifacts import CheckpointStore, open_artifact_store
from service.search_space import ResolvedConfig, parse_config, parse_spec
from service.states import ORIGINAL_TRIAL_ATTR, RESUMED_FROM_ATTR, RETRY_OF_ATTR
from service.training import fit
from service.training.fit import FitResult, fit_config, read_checkpoint_progress
from service.training.objective import TrialCheckpoints, run_trial

ADDING_TASK = {"kind": "adding", "seq_len": 10, "n_train": 200, "n_val": 100, "n_test": 50}
#: Two layers with dropout between them and a step schedule: every source of state a
#: resume must restore (weights, Adam's moments, the LR, the RNG for dropout and shuffling).
PARAMS: dict[str, Any] = {
    "num_layers": 2,
    "hidden_size": 16,
    "dropout": 0.3,
    "batch_size": 32,
    "lr": 0.01,
    "lr_schedule": "step",
    "lr_decay_start": 2,
    "max_epochs": 5,
    "seed": 3,
}
JOB = "feedc0de" * 4


class Interrupted(Exception):
    """Stands for a worker killed mid-epoch."""


class InterruptAt(Callback):
    """Raises :class:`Interrupted` at the third batch of ``epoch`` (0-based)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.current_epoch == self.epoch and args[-1] == 2:
            raise Interrupted(f"killed during epoch {self.epoch}")


#: Every test here trains: one torch thread, as a worker runs (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config() -> ResolvedConfig:
    return parse_config({"task": ADDING_TASK, "params": PARAMS})


def _fit(**kwargs: Any) -> FitResult:
    return fit_config(_config(), accelerator="cpu", **kwargs)


def test_resumed_fit_continues_at_the_next_epoch_and_ends_identically(tmp_path: Path) -> None:
    uninterrupted = _fit()
    saved: list[tuple[str, int]] = []

    def save(path: Path, kind: str) -> None:
        progress = read_checkpoint_progress(path)
        saved.append((kind, progress.epochs_done))
        shutil.copy(path, tmp_path / f"{kind}.ckpt")

    with pytest.raises(Interrupted):
        _fit(save_checkpoint=save, callbacks=[InterruptAt(3)])
    # A `last` after each of the 3 finished epochs; a `best` whenever the metric improved.
    assert [e for kind, e in saved if kind == "last"] == [1, 2, 3]
    best_epochs = [e for kind, e in saved if kind == "best"]
    assert best_epochs[0] == 1 and best_epochs == sorted(best_epochs)
    progress = read_checkpoint_progress(tmp_path / "last.ckpt")
    assert progress.epochs_done == 3
    assert progress.history == uninterrupted.history[:3]

    resumed = _fit(resume_from=tmp_path / "last.ckpt")
    assert resumed.resumed_from_epoch == 3
    assert resumed.history == uninterrupted.history  # epochs 0-2 from the checkpoint, 3-4 trained
    assert resumed.value == uninterrupted.value
    assert resumed.best_epoch == uninterrupted.best_epoch


def _spec() -> Any:
    return parse_spec(
        {
            "task": ADDING_TASK,
            "space": {**PARAMS, "lr": {"type": "float", "low": 0.005, "high": 0.02}},
            "study": {"n_trials": 2, "sampler": "random", "pruner": "none", "seed": 0},
        }
    )


def test_a_retry_resumes_from_its_chains_checkpoint_and_reports_the_whole_curve(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _spec()
    store: CheckpointStore = open_artifact_store(None, tmp_path)
    checkpoints = TrialCheckpoints(store, JOB)
    study = optuna.create_study(direction="minimize")

    uninterrupted_trial = study.ask()
    uninterrupted = run_trial(uninterrupted_trial, spec, accelerator="cpu")
    study.tell(uninterrupted_trial, uninterrupted)

    # Trial 1 is killed during epoch 3 (its checkpoints: trial-1.*); the reaper FAILs it
    # and enqueues its retry with the same params.
    study.enqueue_trial(uninterrupted_trial.params)
    original = study.ask()
    real_fit = fit.fit_config

    def interrupted_fit(config: ResolvedConfig, **kwargs: Any) -> FitResult:
        return real_fit(config, **{**kwargs, "callbacks": [*kwargs["callbacks"], InterruptAt(3)]})

    with monkeypatch.context() as patched:
        patched.setattr(fit, "fit_config", interrupted_fit)
        with pytest.raises(Interrupted):
            run_trial(original, spec, accelerator="cpu", checkpoints=checkpoints)
    study.tell(original, state=optuna.trial.TrialState.FAIL)
    assert store.exists(JOB, 1, "last") and store.exists(JOB, 1, "best")
    study.enqueue_trial(original.params, user_attrs={RETRY_OF_ATTR: 1, ORIGINAL_TRIAL_ATTR: 1})
    retry = study.ask()
    with caplog.at_level(logging.INFO, logger="lstm_hpo.worker"):
        value = run_trial(retry, spec, accelerator="cpu", checkpoints=checkpoints)
    study.tell(retry, value)

    assert value == uninterrupted  # bit for bit
    frozen = study.trials[retry.number]
    assert frozen.user_attrs[RESUMED_FROM_ATTR] == 3
    # Epochs 0-2 reported from the checkpoint before training, 3-4 by the resumed fit.
    assert frozen.intermediate_values == study.trials[0].intermediate_values
    assert f"resumed trial {retry.number} from epoch 3" in caplog.text


def test_a_first_attempt_never_resumes(tmp_path: Path) -> None:
    """A fresh trial whose key already holds a checkpoint (a job id reused through an
    idempotency key) starts at epoch 0 and overwrites it."""
    spec = _spec()
    store = open_artifact_store(None, tmp_path)
    study = optuna.create_study(direction="minimize")
    first = study.ask()
    run_trial(first, spec, accelerator="cpu", checkpoints=TrialCheckpoints(store, JOB))
    again = optuna.create_study(direction="minimize").ask()
    run_trial(again, spec, accelerator="cpu", checkpoints=TrialCheckpoints(store, JOB))
    assert RESUMED_FROM_ATTR not in again.user_attrs
    assert len(again.study.trials[0].intermediate_values) == PARAMS["max_epochs"]
