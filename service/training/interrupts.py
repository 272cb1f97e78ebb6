"""Stopping a trial between steps: a preemption notice and the per-trial time limit.

A :class:`TrialGuard` is checked at every step boundary of a trial (the end of a training
batch, the end of an epoch after its checkpoint was written; each "epoch" of the synthetic
task). It never interrupts a step: a step cut in half leaves the model, optimizer and RNG
states in no state worth saving. Importing this module does not import torch.

Preemption (``service.worker`` sets the notice on SIGTERM / SIGUSR1): the trial keeps
training until the end of its current epoch, whose checkpoint a retry resumes from, or
until the notice's deadline (``LSTM_HPO_PREEMPT_GRACE_S`` after the signal), whichever
comes first; at the deadline it stops at the next batch and the retry resumes from the
previous epoch's checkpoint. So at most the current epoch is lost, and nothing when it
ends within the grace. Checkpoints are written at epoch ends only: Lightning warns that
resuming a mid-epoch checkpoint without resumable data loaders gives unreliable results
("You're resuming from a checkpoint that ended before the epoch ended"), and a resumed
trial must end exactly as an uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.errors import TrialPreempted, TrialTimedOut


@dataclass(frozen=True)
class PreemptNotice:
    """The worker was told to stop: by which signal, when, and until when the trial may go
    on towards its epoch's end (both ``time.monotonic()`` seconds)."""

    signal_name: str
    received_at: float
    deadline: float


class TrialGuard:
    """The checks a trial runs at its step boundaries.

    ``notice()``: the worker's preemption notice, or None. ``timeout_s``: the study's
    ``trial_timeout_s`` (None: no limit), counted from this guard's creation. Raises
    :class:`~service.errors.TrialTimedOut` or :class:`~service.errors.TrialPreempted`.
    """

    def __init__(
        self,
        *,
        notice: Callable[[], PreemptNotice | None] = lambda: None,
        timeout_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.notice = notice
        self.timeout_s = timeout_s
        self.clock = clock
        self.started = clock()

    def after_step(self, epochs_done: int) -> None:
        """At the end of a training batch: stop when the time limit or the preemption
        deadline has passed (``epochs_done``: the epochs a resume would find saved)."""
        now = self.clock()
        if self.timeout_s is not None and now - self.started > self.timeout_s:
            raise TrialTimedOut(self.timeout_s)
        notice = self.notice()
        if notice is not None and now >= notice.deadline:
            raise TrialPreempted(notice.signal_name, epochs_done)

    def after_epoch(self, epochs_done: int) -> None:
        """At the end of an epoch, after its checkpoint: stop on any preemption notice."""
        notice = self.notice()
        if notice is not None:
            raise TrialPreempted(notice.signal_name, epochs_done)
        self.after_step(epochs_done)

    def lightning_callback(self) -> Any:
        """A Lightning callback running :meth:`after_step` after every training batch and
        :meth:`after_epoch` after every epoch. Put it after the checkpoint callback: hooks
        run in list order, and the epoch's checkpoint must be written first."""
        from lightning.pytorch.callbacks import Callback

        guard = self

        class StepGuard(Callback):
            def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
                guard.after_step(trainer.current_epoch)

            def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
                epochs_done = trainer.current_epoch + 1
                if trainer.should_stop or epochs_done >= (trainer.max_epochs or 0) > 0:
                    return  # the trial ends now anyway: let it record its result
                guard.after_epoch(epochs_done)

        return StepGuard()
