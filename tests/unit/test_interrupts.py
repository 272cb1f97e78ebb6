"""The step guard: a preemption notice stops a trial at its epoch's end, or at the next
step once the grace is over; the per-trial time limit stops it at the next step."""

from __future__ import annotations

import pytest

from service.errors import TrialPreempted, TrialTimedOut, trial_timeout_reason
from service.training.interrupts import PreemptNotice, TrialGuard


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_no_notice_and_no_limit_never_stops() -> None:
    clock = Clock()
    guard = TrialGuard(clock=clock)
    clock.now += 1e9
    guard.after_step(3)
    guard.after_epoch(4)


def test_a_notice_stops_at_the_epoch_end_before_its_deadline() -> None:
    clock = Clock()
    notice: list[PreemptNotice] = []
    guard = TrialGuard(notice=lambda: notice[0] if notice else None, clock=clock)
    notice.append(PreemptNotice("SIGTERM", received_at=100.0, deadline=120.0))
    clock.now = 110.0
    guard.after_step(2)  # within the grace: training goes on towards the epoch's end
    with pytest.raises(TrialPreempted) as stopped:
        guard.after_epoch(3)
    assert (stopped.value.signal_name, stopped.value.epochs_done) == ("SIGTERM", 3)
    assert "preempted (SIGTERM) after 3 epoch(s)" in stopped.value.message


def test_a_notice_stops_at_the_next_step_once_the_grace_is_over() -> None:
    clock = Clock()
    notice = PreemptNotice("SIGUSR1", received_at=100.0, deadline=105.0)
    guard = TrialGuard(notice=lambda: notice, clock=clock)
    clock.now = 105.0
    with pytest.raises(TrialPreempted) as stopped:
        guard.after_step(2)
    assert stopped.value.epochs_done == 2  # what a resume finds saved


def test_the_time_limit_stops_at_the_next_step_with_the_reason() -> None:
    clock = Clock()
    guard = TrialGuard(timeout_s=2.5, clock=clock)
    clock.now = 102.5
    guard.after_step(0)  # exactly at the limit: not past it
    clock.now = 102.6
    with pytest.raises(TrialTimedOut) as stopped:
        guard.after_step(0)
    assert stopped.value.message == trial_timeout_reason(2.5) == "exceeded trial_timeout_s (2.5 s)"
    with pytest.raises(TrialTimedOut):
        guard.after_epoch(1)
