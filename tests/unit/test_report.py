"""service.report's pure functions: failure causes, CSV (formula injection), progress and
its ETA, the HTML page (escaping, notes for 0/1/2 trials) and the PNGs it embeds."""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from service import report
from service.durations import fmt_duration
from service.queue import JobRecord
from service.schemas import StudyPublic, TrialCounts, TrialPublic
from service.states import CONFIG_ATTR, FAILURE_ATTR, JobState
from service.states import TrialState as ApiState

NOW = datetime(2026, 1, 2, 12, 0, 0, tzinfo=UTC)
EVIL = "<script>alert('x')</script>"
DISTRIBUTIONS: dict[str, optuna.distributions.BaseDistribution] = {
    "lr": FloatDistribution(1e-4, 1e-1, log=True),
    "num_layers": IntDistribution(1, 4),
    "cell": CategoricalDistribution(["lstm", EVIL]),
}


def _trial(
    number: int,
    state: TrialState,
    value: float | None = None,
    *,
    params: dict[str, Any] | None = None,
    steps: dict[int, float] | None = None,
    seconds: float = 10.0,
    reason: str | None = None,
    config: dict[str, Any] | None = None,
) -> FrozenTrial:
    params = (
        {"lr": 0.01, "num_layers": 1 + number % 4, "cell": "lstm"} if params is None else params
    )
    start = (NOW - timedelta(seconds=seconds + 100)).astimezone().replace(tzinfo=None)
    attrs: dict[str, Any] = {}
    if reason is not None:
        attrs[FAILURE_ATTR] = reason
    if config is not None:
        attrs[CONFIG_ATTR] = config
    trial = optuna.trial.create_trial(
        state=state,
        value=value,
        params=params,
        distributions={k: DISTRIBUTIONS[k] for k in params},
        intermediate_values=steps or {},
        user_attrs=attrs,
    )
    trial.number = number
    trial.datetime_start = start
    if state.is_finished():
        trial.datetime_complete = start + timedelta(seconds=seconds)
    else:
        trial.datetime_complete = None
        trial.datetime_start = (NOW - timedelta(seconds=seconds)).astimezone().replace(tzinfo=None)
    return trial


def _job(**changes: Any) -> JobRecord:
    job = JobRecord(
        id="abc123",
        name="study",
        owner="local",
        state=JobState.RUNNING,
        spec={},
        optuna_study_name="study-abc",
        n_trials=10,
        max_retries=1,
        timeout_s=None,
        n_running=0,
        n_finished=0,
        n_complete=0,
        idempotency_key=None,
        error=None,
        created_at=NOW,
        started_at=NOW,
        deadline_at=None,
        finished_at=None,
        last_claimed_at=None,
    )
    return replace(job, **changes)


def _study(**changes: Any) -> StudyPublic:
    fields: dict[str, Any] = {
        "id": "abc123",
        "name": "study",
        "state": JobState.RUNNING,
        "task": "synthetic",
        "metric": "value",
        "direction": "minimize",
        "n_trials": 10,
        "n_finished": 0,
        "counts": TrialCounts(),
        "created_at": NOW,
        "dashboard_url": "http://x/dashboard/studies/1",
        "optuna_study_name": "study-abc",
    }
    return StudyPublic(**(fields | changes))


# --------------------------------------------------------------------------------------
# Failures


def test_failure_causes_group_reasons_that_differ_only_in_numbers() -> None:
    trials = [
        _trial(0, TrialState.FAIL, reason="diverged: val_loss is nan at epoch 3"),
        _trial(1, TrialState.COMPLETE, 1.0),
        _trial(2, TrialState.FAIL, reason="diverged: val_loss is nan at epoch 7\ntraceback"),
        _trial(3, TrialState.FAIL, reason="out of memory: CUDA out of memory"),
        _trial(4, TrialState.FAIL),
        _trial(5, TrialState.PRUNED, reason="pruned at epoch 2"),
    ]
    groups = report.failure_groups(trials)
    assert [(g.cause, g.trials) for g in groups] == [
        ("diverged: val_loss is nan at epoch N", (0, 2)),
        ("out of memory: CUDA out of memory", (3,)),
        (report.NO_REASON, (4,)),
    ]
    assert groups[0].example == "diverged: val_loss is nan at epoch 3"
    assert report.failure_groups([]) == []


# --------------------------------------------------------------------------------------
# CSV


@pytest.mark.parametrize(
    ("text", "safe"),
    [
        ("=1+1", "'=1+1"),
        ("+cmd", "'+cmd"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("lstm", "lstm"),
        ("", ""),
        ("a=b", "a=b"),
    ],
)
def test_csv_safe_defuses_formulas(text: str, safe: str) -> None:
    assert report.csv_safe(text) == safe


def _public(number: int, **fields: Any) -> TrialPublic:
    base: dict[str, Any] = {
        "number": number,
        "state": ApiState.COMPLETE,
        "params": {},
        "intermediate_values": {},
    }
    return TrialPublic(**(base | fields))


def test_trials_csv_one_row_per_trial_numbers_stay_numbers_text_is_defused() -> None:
    started = datetime(2026, 1, 2, 10, 0, 0, tzinfo=UTC)
    trials = [
        _public(
            0,
            value=-0.25,
            params={"lr": 0.001, "cell": "=HYPERLINK(evil)"},
            started_at=started,
            finished_at=started + timedelta(seconds=12.5),
            duration_s=12.5,
            intermediate_values={0: 1.0, 1: 0.5, 2: None},
        ),
        _public(
            1,
            state=ApiState.FAILED,
            params={"lr": -1e-3, "num_layers": 2},
            failure_reason="-1 is not a size, @here",
        ),
        _public(2, state=ApiState.RUNNING),
    ]
    rows = list(csv.reader(io.StringIO(report.trials_csv(trials))))
    assert rows[0] == [
        "number",
        "state",
        "value",
        "params_cell",
        "params_lr",
        "params_num_layers",
        "started_at",
        "finished_at",
        "duration_s",
        "epochs",
        "failure_reason",
    ]
    assert rows[1] == [
        "0",
        "complete",
        "-0.25",  # a number, not text: no apostrophe
        "'=HYPERLINK(evil)",
        "0.001",
        "",
        "2026-01-02T10:00:00+00:00",
        "2026-01-02T10:00:12.500000+00:00",
        "12.5",
        "3",
        "",
    ]
    assert rows[2][1:3] == ["failed", ""]
    assert rows[2][4:6] == ["-0.001", "2"]
    assert rows[2][-1] == "'-1 is not a size, @here"
    assert rows[3][:2] == ["2", "running"] and rows[3][-2:] == ["0", ""]
    assert len(rows) == 4
    # RFC 4180 line ends; no trial: the header alone.
    assert report.trials_csv([]).count("\r\n") == 1


# --------------------------------------------------------------------------------------
# Progress


def test_progress_eta_from_finished_durations_and_running_trials() -> None:
    trials = [
        _trial(0, TrialState.COMPLETE, 1.0, seconds=10.0),
        _trial(1, TrialState.PRUNED, seconds=20.0),
        _trial(2, TrialState.FAIL, seconds=30.0),
        _trial(
            3,
            TrialState.RUNNING,
            seconds=5.0,
            steps={0: 2.0, 1: 1.5},
            config={"task": {"kind": "synthetic"}, "params": {"max_epochs": 6}},
        ),
        _trial(4, TrialState.RUNNING, seconds=25.0),
    ]
    job = _job(n_trials=10, n_finished=3, n_running=2)
    got = report.progress(job, trials, now=NOW)
    assert got.mean_trial_s == pytest.approx(20.0)
    # Running: trial 3 has 4 epochs left at 2.5 s each; trial 4 (no epoch yet) is past the
    # mean, 0 s. 10 - 3 - 2 = 5 not started x 20 s. 2 at once.
    assert got.eta_s == pytest.approx((10.0 + 0.0 + 5 * 20.0) / 2)
    assert "5 not started" in got.eta_basis and "2 running at once" in got.eta_basis
    first, second = got.running
    assert (first.number, first.epoch, first.max_epochs, first.last_value) == (3, 2, 6, 1.5)
    assert first.elapsed_s == pytest.approx(5.0)
    assert (second.number, second.epoch, second.max_epochs, second.last_value) == (4, 0, None, None)
    assert got.timeout_left_s is None and not got.timeout_first


def test_progress_without_finished_trials_has_no_eta() -> None:
    got = report.progress(_job(n_running=1), [_trial(0, TrialState.RUNNING)], now=NOW)
    assert got.eta_s is None and got.mean_trial_s is None
    assert "until a trial has finished" in got.eta_basis
    assert report.progress(_job(state=JobState.QUEUED), [], now=NOW).running == []


def test_progress_timeout_left() -> None:
    done = [_trial(0, TrialState.COMPLETE, 1.0, seconds=100.0)]
    queued = report.progress(_job(state=JobState.QUEUED, timeout_s=600.0), [], now=NOW)
    assert queued.timeout_left_s == 600.0  # the clock starts at the first claim
    job = _job(timeout_s=600.0, deadline_at=NOW + timedelta(seconds=50), n_finished=1)
    running = report.progress(job, done, now=NOW)
    assert running.timeout_left_s == pytest.approx(50.0)
    assert running.eta_s == pytest.approx(900.0) and running.timeout_first
    past = report.progress(replace(job, deadline_at=NOW - timedelta(seconds=5)), done, now=NOW)
    assert past.timeout_left_s == 0.0
    ended = report.progress(replace(job, state=JobState.SUCCEEDED), done, now=NOW)
    assert ended.timeout_left_s is None and ended.eta_s is None
    assert "ended" in ended.eta_basis


# --------------------------------------------------------------------------------------
# Plots and the page


def _complete(n: int) -> list[FrozenTrial]:
    return [
        _trial(
            i,
            TrialState.COMPLETE,
            1.0 / (i + 1) + (i % 3),
            params={"lr": 10 ** -(1 + i % 3), "num_layers": 1 + i % 4, "cell": "lstm"},
            steps={0: 3.0, 1: 2.0 + i},
        )
        for i in range(n)
    ]


def test_plots_for_zero_one_and_two_trials_are_notes_where_optuna_cannot_draw() -> None:
    notes = report.draw_plots([], "minimize", "value")
    assert [p.name for p in notes] == [
        "optimization_history",
        "intermediate_values",
        "parallel_coordinate",
        "slice",
        "param_importances",
    ]
    assert all(p.png is None and p.note for p in notes)

    one = {p.name: p for p in report.draw_plots(_complete(1), "minimize", "value")}
    assert one["optimization_history"].png is not None
    assert one["intermediate_values"].png is not None
    assert one["param_importances"].note == "Needs at least 2 completed trials (has 1)."

    # Two trials that differ in no parameter: Optuna's importances refuse (zero variance),
    # which is a note, not an error.
    same = {"lr": 0.01, "num_layers": 2, "cell": "lstm"}
    two = [
        _trial(0, TrialState.COMPLETE, 1.0, params=same),
        _trial(1, TrialState.COMPLETE, 2.0, params=same),
    ]
    by_name = {p.name: p for p in report.draw_plots(two, "maximize", "accuracy")}
    importances = by_name["param_importances"]
    assert (importances.png is None) == (importances.note is not None)

    failed_only = report.draw_plots([_trial(0, TrialState.FAIL, reason="x")], "minimize", "v")
    assert all(p.png is None for p in failed_only)


def test_the_page_escapes_everything_the_user_or_a_trial_wrote() -> None:
    best = _trial(0, TrialState.COMPLETE, 0.1, params={"lr": 0.01, "num_layers": 1, "cell": EVIL})
    failed = _trial(4, TrialState.FAIL, reason=f"{EVIL} & more")
    snapshot = report.StudySnapshot(
        study=_study(name=EVIL, error=EVIL, best_value=0.1, best_trial_number=0),
        job=_job(),
        trials=[best, *_complete(3)[1:], failed],
        best_yaml=f"name: {EVIL}\n",
    )
    plots = [report.Plot("optimization_history", "Optimisation history", png=b"\x89PNG fake")]
    page = report.render_html(snapshot, now=NOW, top_k=2, plots=plots)
    assert "<script" not in page
    escaped = "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;"
    assert f"<h1>{escaped}</h1>" in page and f"<td>{escaped}</td>" in page  # name, param
    assert f"{escaped} &amp; more" in page  # the failure reason
    assert f"name: {escaped}" in page  # the best config
    for anchor in ("summary", "optimization_history", "top", "failures", "best-config"):
        assert f'<section id="{anchor}">' in page
    assert report.extract_pngs(page) == {"optimization_history": b"\x89PNG fake"}
    assert "Top 2 trials" in page and "still running" in page


def test_the_page_of_a_study_without_trials() -> None:
    snapshot = report.StudySnapshot(
        study=_study(state=JobState.QUEUED),
        job=_job(state=JobState.QUEUED),
        trials=[],
        best_note="no trial has completed yet",
    )
    page = report.render_html(snapshot, now=NOW)
    assert page.count('class="note"') >= 8  # five figures, top-k, failures, best config
    assert "No completed trial yet." in page and "no trial has completed yet" in page
    assert report.extract_pngs(page) == {}


def test_fmt_duration() -> None:
    assert fmt_duration(None) == "-"
    assert fmt_duration(12.34) == "12.3 s"
    assert fmt_duration(245) == "4 min 05 s"
    assert fmt_duration(7380) == "2 h 03 min"
    compact = [fmt_duration(s, compact=True) for s in (None, 12.34, 59.6, 245, 7380, 90061)]
    assert compact == ["-", "12s", "1m00s", "4m05s", "2h03m", "25h01m"]
