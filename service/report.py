"""What a user decides and watches by: a study's HTML report, its trials as CSV, and its
progress (running trials, an ETA, the timeout left).

Pure functions over Optuna's ``FrozenTrial``s (or the API's ``TrialPublic``s) and the job
row, plus :func:`load_snapshot`, the one function here that reads the database; it checks
ownership as every study route does (another principal's study is ``StudyNotFound``).

The plots are Optuna's matplotlib ones (``optuna.visualization.matplotlib``, Agg backend),
drawn on an in-memory copy of the study's trials, one report at a time (:data:`_PLOT_LOCK`).
A plot Optuna cannot draw (too few trials, no parameter, zero variance) becomes a short
note in the page, never an error.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
import math
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

from service import queue, studies
from service.auth import Principal
from service.durations import fmt_duration
from service.errors import LstmHpoError, OptunaStudyDeleted
from service.schemas import ProgressPublic, RunningTrialPublic, StudyPublic, TrialPublic
from service.search_space import dump_yaml
from service.states import CONFIG_ATTR, FAILURE_ATTR

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)
Direction = Literal["minimize", "maximize"]

#: Rows of the report's top-k table unless asked otherwise.
DEFAULT_TOP_K = 10
#: Characters of a failure reason the report shows (a traceback can be long).
MAX_REASON_CHARS = 600

# --------------------------------------------------------------------------------------
# Reading one study (the only database access of this module)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudySnapshot:
    """Everything a report or a progress answer is made of, read at one moment."""

    study: StudyPublic
    job: queue.JobRecord
    trials: list[FrozenTrial]
    #: The best config as ``GET /v1/studies/{id}/best?format=yaml`` gives it (None: no
    #: completed trial yet, see ``best_note``).
    best_yaml: str | None = None
    best_note: str | None = None


def load_snapshot(
    backend: studies.Backend, job_id: str, *, principal: Principal, with_best: bool = True
) -> StudySnapshot:
    """Read a study, its job row, its trials and (``with_best``) its best config.

    Raises ``StudyNotFound`` for an unknown id or another principal's study. A study whose
    Optuna half was deleted has no trials (its job reads as failed, as ``get`` shows it).
    """
    study = studies.get_study(backend, job_id, principal=principal)
    job = queue.get_job(backend.sessions, job_id, owner=principal.owner_filter)
    try:
        optuna_id = studies.optuna_study_id(backend, job.optuna_study_name)
        # Only what this study ran: warm-start copies seed its sampler, nothing more.
        trials = studies.own_trials(backend.storage.get_all_trials(optuna_id, deepcopy=False))
    except OptunaStudyDeleted:
        trials = []
    best_yaml = best_note = None
    if with_best:
        try:
            (best,) = studies.best_configs(backend, job_id, principal=principal, k=1)
            best_yaml = dump_yaml(best.config)
        except LstmHpoError as err:  # NoCompletedTrials, mostly
            best_note = err.message
    return StudySnapshot(study, job, list(trials), best_yaml, best_note)


def load_progress(
    backend: studies.Backend, job_id: str, *, principal: Principal, now: datetime
) -> ProgressPublic:
    """:func:`progress` of a study, read without building every trial of it: its running
    trials, and its finished trials' mean duration computed in SQL
    (:func:`service.studies.progress_inputs`). Raises ``StudyNotFound`` as
    :func:`load_snapshot` does."""
    job, running, n_timed, mean_s = studies.progress_inputs(backend, job_id, principal=principal)
    return progress_of(job, running, n_timed=n_timed, mean_s=mean_s, now=now)


# --------------------------------------------------------------------------------------
# Trials: values, epochs, ranking, failures
# --------------------------------------------------------------------------------------


def utc(moment: datetime | None) -> datetime | None:
    """Optuna's trial times are naive local times (``datetime.now()``): made aware, in UTC."""
    return moment.astimezone(UTC) if moment is not None else None


def trial_value(trial: FrozenTrial) -> float | None:
    """A single-objective trial's finite value; None for NaN/inf, no value, or several."""
    values = trial.values
    if values is None or len(values) != 1 or not math.isfinite(values[0]):
        return None
    return float(values[0])


def trial_duration_s(trial: FrozenTrial) -> float | None:
    """Seconds from start to finish of a finished trial; None while it runs."""
    duration = trial.duration
    return duration.total_seconds() if duration is not None else None


def epochs_reported(intermediate_values: Mapping[int, Any]) -> int:
    """Epochs a trial reported to the pruner: its last (0-based) step + 1; 0 for none."""
    return max(intermediate_values) + 1 if intermediate_values else 0


def ranked(trials: Iterable[FrozenTrial], direction: str) -> list[FrozenTrial]:
    """COMPLETE trials with a finite value, best first (``direction``: minimize | maximize)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and trial_value(t) is not None]
    return sorted(done, key=lambda t: trial_value(t) or 0.0, reverse=direction == "maximize")


def param_names(trials: Iterable[FrozenTrial | TrialPublic]) -> list[str]:
    """Every parameter name any of ``trials`` has, sorted (as Optuna's trials_dataframe)."""
    return sorted({name for t in trials for name in t.params})


_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
NO_REASON = "(no reason recorded)"


def failure_cause(reason: str | None) -> str:
    """The cause a failure reason groups under: its first line with every number as ``N``
    (``"diverged at epoch 3"`` and ``"... epoch 7"`` are one cause)."""
    if not reason or not reason.strip():
        return NO_REASON
    first = reason.strip().splitlines()[0].strip()
    return _NUMBER.sub("N", first)


@dataclass(frozen=True)
class FailureGroup:
    """FAILed trials that share a cause (:func:`failure_cause`)."""

    cause: str
    #: Trial numbers, ascending.
    trials: tuple[int, ...]
    #: The first of their full reasons.
    example: str


def failure_groups(trials: Iterable[FrozenTrial]) -> list[FailureGroup]:
    """FAILed trials grouped by the cause of their reason (``FAILURE_ATTR``), largest group
    first (ties: the earliest trial first). Pruned trials are not failures."""
    groups: dict[str, list[FrozenTrial]] = {}
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.state == TrialState.FAIL:
            reason = trial.user_attrs.get(FAILURE_ATTR)
            groups.setdefault(failure_cause(_text(reason)), []).append(trial)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[1][0].number))
    return [
        FailureGroup(
            cause,
            tuple(t.number for t in members),
            _text(members[0].user_attrs.get(FAILURE_ATTR)) or NO_REASON,
        )
        for cause, members in ordered
    ]


def _text(value: object) -> str | None:
    return None if value is None else str(value)


# --------------------------------------------------------------------------------------
# CSV (for spreadsheets)
# --------------------------------------------------------------------------------------

#: A text cell starting with one of these is a formula to a spreadsheet (OWASP: CSV
#: injection); such cells get a leading apostrophe.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(text: str) -> str:
    """``text`` as a spreadsheet shows it but never evaluates: ``'`` before a leading
    ``= + - @``, tab or carriage return."""
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def _csv_cell(value: Any) -> str | int | float:
    """A number stays a number (NaN/inf and None: empty); anything else is safe text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else ""
    if isinstance(value, datetime):
        return value.isoformat()
    return csv_safe(str(value))


def trials_csv(trials: Sequence[TrialPublic]) -> str:
    """One row per trial, in the given order: ``number, state, value, params_<name>...,
    started_at, finished_at, duration_s, epochs, failure_reason`` (times ISO 8601 UTC,
    durations in seconds, empty where unknown). RFC 4180 (CRLF line ends)."""
    names = param_names(trials)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "number",
            "state",
            "value",
            *(csv_safe(f"params_{n}") for n in names),
            "started_at",
            "finished_at",
            "duration_s",
            "epochs",
            "failure_reason",
        ]
    )
    for t in trials:
        row = [t.number, t.state.value, t.value, *(t.params.get(n) for n in names)]
        row += [t.started_at, t.finished_at, t.duration_s]
        row += [epochs_reported(t.intermediate_values), t.failure_reason]
        writer.writerow([_csv_cell(v) for v in row])
    return out.getvalue()


# --------------------------------------------------------------------------------------
# Progress: running trials, ETA, timeout left
# --------------------------------------------------------------------------------------

#: How :func:`progress` estimates the time left (``eta_basis`` gives its numbers).
ETA_METHOD = (
    "(time the running trials still need + trials not started x the mean trial time) / "
    "trials running at once (at least 1). The mean is over the wall times of the finished "
    "trials; a running trial still needs its remaining epochs at its own pace so far "
    "(before its first epoch: the mean less its time so far)"
)


def progress(
    job: queue.JobRecord, trials: Sequence[FrozenTrial], *, now: datetime
) -> ProgressPublic:
    """A study's progress at ``now`` (aware): its running trials (epoch, last intermediate
    value), an ETA (:data:`ETA_METHOD`) and the ``timeout_s`` left."""
    running = [t for t in trials if t.state == TrialState.RUNNING]
    durations = [
        d for t in trials if t.state.is_finished() and (d := trial_duration_s(t)) is not None
    ]
    mean = sum(durations) / len(durations) if durations else None
    return progress_of(job, running, n_timed=len(durations), mean_s=mean, now=now)


def progress_of(
    job: queue.JobRecord,
    running: Sequence[FrozenTrial],
    *,
    n_timed: int,
    mean_s: float | None,
    now: datetime,
) -> ProgressPublic:
    """:func:`progress` from what it needs: the running trials, and how many finished
    trials have a duration and their mean (None for none)."""
    running_public = [_running_trial(t, now) for t in sorted(running, key=lambda t: t.number)]
    mean = mean_s
    eta: float | None = None
    if job.state.is_terminal:
        basis = f"the study has ended ({job.state})"
    elif mean is None:
        basis = "no estimate until a trial has finished"
    else:
        in_flight = max(job.n_running, len(running))
        not_started = max(job.n_trials - job.n_finished - in_flight, 0)
        still = sum(_time_left(r, mean) for r in running_public)
        eta = (still + not_started * mean) / max(in_flight, 1)
        basis = (
            f"({still:.0f} s the {len(running)} running trial(s) still need + {not_started} "
            f"not started x {mean:.1f} s, the mean of {n_timed} finished trial(s)) "
            f"/ {max(in_flight, 1)} running at once"
        )
    timeout_left: float | None = None
    if job.timeout_s is not None and not job.state.is_terminal:
        if job.deadline_at is None:  # the clock starts at the first claimed trial
            timeout_left = job.timeout_s
        else:
            timeout_left = max((job.deadline_at - now).total_seconds(), 0.0)
    return ProgressPublic(
        id=job.id,
        state=job.state,
        n_trials=job.n_trials,
        n_finished=job.n_finished,
        running=running_public,
        mean_trial_s=mean,
        eta_s=eta,
        eta_basis=basis,
        timeout_s=job.timeout_s,
        timeout_left_s=timeout_left,
        timeout_first=eta is not None and timeout_left is not None and timeout_left < eta,
    )


def _time_left(trial: RunningTrialPublic, mean_s: float) -> float:
    """Seconds a running trial should still take: its remaining epochs at its pace so far
    (no early stop assumed), else (no epoch yet, or no ``max_epochs``) the mean less its
    elapsed time; never below 0."""
    elapsed = trial.elapsed_s or 0.0
    if trial.epoch >= 1 and trial.max_epochs is not None:
        return max(elapsed / trial.epoch * (trial.max_epochs - trial.epoch), 0.0)
    return max(mean_s - elapsed, 0.0)


def _running_trial(trial: FrozenTrial, now: datetime) -> RunningTrialPublic:
    started = utc(trial.datetime_start)
    steps = trial.intermediate_values
    last = steps[max(steps)] if steps else None
    config = trial.user_attrs.get(CONFIG_ATTR)
    max_epochs = None
    if isinstance(config, dict) and isinstance(config.get("params"), dict):
        found = config["params"].get("max_epochs")
        max_epochs = found if isinstance(found, int) and not isinstance(found, bool) else None
    return RunningTrialPublic(
        number=trial.number,
        started_at=started,
        elapsed_s=max((now - started).total_seconds(), 0.0) if started else None,
        epoch=epochs_reported(steps),
        max_epochs=max_epochs,
        last_value=last if last is not None and math.isfinite(last) else None,
    )


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plot:
    """One figure of the report: a PNG, or the note saying why there is none."""

    #: File stem and HTML anchor (``optimization_history`` -> ``optimization_history.png``).
    name: str
    title: str
    png: bytes | None = None
    note: str | None = None


#: pyplot keeps global state (the current figure, the style Optuna sets with
#: ``plt.style.use``): two reports drawn at once in the server's thread pool would draw
#: into each other's figures. One report draws at a time; it holds the lock for the
#: seconds its five figures take.
_PLOT_LOCK = threading.Lock()
_PLOT_STUDY_NAME = "lstm-hpo-report"


class _QuietPlotStudies(logging.Filter):
    """Drops Optuna's "A new study created in memory" line for the report's scratch study."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _PLOT_STUDY_NAME not in record.getMessage()


logging.getLogger("optuna.storages._in_memory").addFilter(_QuietPlotStudies())


def importance_evaluator() -> tuple[optuna.importance.BaseImportanceEvaluator, str]:
    """fANOVA (seed 0, Optuna's default; needs scikit-learn, which the ``datasets`` extra
    and the Docker image have), else PED-ANOVA (no dependency); with its name."""
    if find_spec("sklearn") is not None:
        return optuna.importance.FanovaImportanceEvaluator(seed=0), "fANOVA"
    return optuna.importance.PedAnovaImportanceEvaluator(), "PED-ANOVA"


def draw_plots(trials: Sequence[FrozenTrial], direction: Direction, metric: str) -> list[Plot]:
    """The report's five figures, in order: optimisation history, intermediate values,
    parallel coordinates, slices, importances. Each is a PNG or a note (a study with 0
    trials gives five notes)."""
    complete = ranked(trials, direction)
    searched = param_names(complete)
    # What Optuna's plot reads: pruned, complete and running trials' reports.
    shown = (TrialState.PRUNED, TrialState.COMPLETE, TrialState.RUNNING)
    with_steps = [t for t in trials if t.intermediate_values and t.state in shown]
    evaluator, evaluator_name = importance_evaluator()

    def no_complete() -> str | None:
        return None if complete else "No completed trial yet."

    def no_params() -> str | None:
        return no_complete() or (None if searched else "No parameter is searched.")

    specs: list[tuple[str, str, str | None, Callable[[Any, optuna.Study], Any]]] = [
        (
            "optimization_history",
            "Optimisation history",
            no_complete(),
            lambda vis, s: vis.plot_optimization_history(s, target_name=metric),
        ),
        (
            "intermediate_values",
            "Intermediate values (what the pruner saw)",
            None if with_steps else "No trial has reported an intermediate value yet.",
            lambda vis, s: _intermediate_values(vis, s, metric),
        ),
        (
            "parallel_coordinate",
            "Parallel coordinates",
            no_params(),
            lambda vis, s: vis.plot_parallel_coordinate(s, target_name=metric),
        ),
        (
            "slice",
            "Slice plots",
            no_params(),
            lambda vis, s: vis.plot_slice(s, target_name=metric),
        ),
        (
            "param_importances",
            f"Hyperparameter importances ({evaluator_name})",
            no_params()
            or (
                None
                if len(complete) >= 2
                else f"Needs at least 2 completed trials (has {len(complete)})."
            ),
            lambda vis, s: vis.plot_param_importances(s, evaluator=evaluator, target_name=metric),
        ),
    ]
    todo = [spec for spec in specs if spec[2] is None]
    pngs: dict[str, bytes | str] = {}
    if todo:
        with _PLOT_LOCK:
            vis, plt = _pyplot()
            study = _scratch_study(trials, direction)
            for name, title, _, draw in todo:
                pngs[name] = _draw_one(title, partial(draw, vis, study), plt)
    plots = []
    for name, title, note, _ in specs:
        found = pngs.get(name)
        if isinstance(found, bytes):
            plots.append(Plot(name, title, png=found))
        else:
            plots.append(Plot(name, title, note=note or found or "Not drawn."))
    return plots


#: Past this many trials the intermediate values' legend (one line per trial) is left out:
#: it would be taller than the plot.
MAX_LEGEND_TRIALS = 20


def _intermediate_values(vis: Any, study: optuna.Study, metric: str) -> Any:
    """Optuna's intermediate values plot, its axes named (epochs are 0-based steps)."""
    axes = vis.plot_intermediate_values(study)
    axes.set_xlabel("epoch (0-based)")
    axes.set_ylabel(metric)
    legend = axes.get_legend()
    if legend is not None and len(axes.get_lines()) > MAX_LEGEND_TRIALS:
        legend.remove()
    return axes


def _pyplot() -> tuple[Any, Any]:
    """Optuna's matplotlib module and pyplot, on the Agg backend (no display, any thread)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    return vis, plt


def _scratch_study(trials: Sequence[FrozenTrial], direction: Direction) -> optuna.Study:
    """An in-memory study holding ``trials`` (the plots read it many times: no database)."""
    study = optuna.create_study(
        storage=optuna.storages.InMemoryStorage(), study_name=_PLOT_STUDY_NAME, direction=direction
    )
    for trial in trials:
        if trial.state == TrialState.WAITING:
            continue
        try:
            study.add_trial(trial)
        except ValueError as err:  # a record Optuna itself would not accept today
            log.warning("report: trial %d left out of the plots: %s", trial.number, err)
    return study


def _draw_one(title: str, draw: Callable[[], Any], plt: Any) -> bytes | str:
    """The PNG of one Optuna plot, or the note saying why Optuna did not draw it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning, matplotlib layout notes
            axes = draw()
            figure: Figure = _figure_of(axes)
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
            return buffer.getvalue()
    except Exception as err:  # one figure Optuna refuses must not cost the whole report
        log.info("report: %s not drawn: %s: %s", title, type(err).__name__, err)
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"Optuna could not draw it: {message}"
    finally:
        plt.close("all")


def _figure_of(axes: Any) -> Figure:
    """The figure of what an Optuna matplotlib function returns (Axes, or an array of them)."""
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    figure: Figure = first.get_figure()
    return figure


_PNG_IMG = re.compile(
    r'<img class="plot" data-plot="([a-z_]+)"[^>]*? src="data:image/png;base64,([A-Za-z0-9+/=]+)"'
)


def extract_pngs(page: str) -> dict[str, bytes]:
    """The figures embedded in a page :func:`render_html` made: plot name -> PNG bytes."""
    return {name: base64.b64decode(data) for name, data in _PNG_IMG.findall(page)}


# --------------------------------------------------------------------------------------
# The HTML page
# --------------------------------------------------------------------------------------


def _e(value: object) -> str:
    """HTML-escaped text of anything (quotes too: safe in attributes)."""
    return html.escape(str(value), quote=True)


def fmt_value(value: float | None) -> str:
    """A metric value for people: 5 significant digits; ``-`` for none."""
    return "-" if value is None else f"{value:.5g}"


def fmt_param(value: Any) -> str:
    """A parameter value for people: floats with 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1100px;padding:0 1rem;color:#222;line-height:1.4}
h1{margin-bottom:.2rem;word-break:break-word}h2{margin-top:2.2rem;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0}nav a{margin-right:1rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.92rem}
th,td{border:1px solid #ddd;padding:.25rem .55rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#555;background:#f8f8f0;border-left:4px solid #cc9;padding:.4rem .8rem}
img.plot{max-width:100%;height:auto;border:1px solid #eee}
pre{background:#f6f8fa;padding:.8rem;overflow-x:auto}code{font-size:.9rem}
""".strip()


def render_html(
    snapshot: StudySnapshot,
    *,
    now: datetime,
    top_k: int = DEFAULT_TOP_K,
    plots: Sequence[Plot] | None = None,
) -> str:
    """The report as one self-contained HTML page (figures as base64 PNGs, no external
    resource). Every text that comes from the user or a trial is escaped. ``plots``
    defaults to :func:`draw_plots` of the snapshot's trials."""
    study, trials = snapshot.study, snapshot.trials
    if plots is None:
        plots = draw_plots(trials, study.direction, study.metric)
    sections = [
        ("summary", "Summary", _summary(snapshot, now)),
        *((p.name, p.title, _plot_html(p)) for p in plots),
        ("top", f"Top {top_k} trials", _top_table(trials, study.direction, top_k)),
        ("failures", "Failures by cause", _failures(trials)),
        ("best-config", "Best config", _best(snapshot)),
    ]
    nav = " ".join(f'<a href="#{_e(anchor)}">{_e(title)}</a>' for anchor, title, _ in sections)
    body = "\n".join(
        f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>\n{content}</section>'
        for anchor, title, content in sections
    )
    when = now.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    live = " (the study is still running: this is a snapshot)" if study.state.is_active else ""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="generator" content="lstm-hpo">\n'
        f"<title>{_e(study.name)} - lstm-hpo report</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n<h1>{_e(study.name)}</h1>\n"
        f'<p class="sub">Study <code>{_e(study.id)}</code>, report made {_e(when)}'
        f"{_e(live)}.</p>\n<nav>{nav}</nav>\n{body}\n</body>\n</html>\n"
    )


def _rows(pairs: Iterable[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in pairs)


def _summary(snapshot: StudySnapshot, now: datetime) -> str:
    study = snapshot.study
    c = study.counts
    best = fmt_value(study.best_value)
    if study.best_trial_number is not None:
        best += f" (trial {study.best_trial_number})"
    pairs = [
        ("state", str(study.state)),
        ("task / metric", f"{study.task} / {study.metric} ({study.direction})"),
        ("finished", f"{study.n_finished} / {study.n_trials}"),
        (
            "trials",
            f"complete {c.complete}, pruned {c.pruned}, failed {c.failed}, "
            f"running {c.running}, waiting {c.waiting}",
        ),
        ("best", best),
        ("elapsed", fmt_duration(study.elapsed_s)),
    ]
    if study.error:
        pairs.append(("error", study.error))
    if study.state.is_active:
        p = progress(snapshot.job, snapshot.trials, now=now)
        pairs.append(("ETA", f"{fmt_duration(p.eta_s)} ({p.eta_basis})"))
        if p.timeout_left_s is not None:
            pairs.append(("timeout left", fmt_duration(p.timeout_left_s)))
        for r in p.running:
            of = f"/{r.max_epochs}" if r.max_epochs is not None else ""
            pairs.append(
                (
                    f"running: trial {r.number}",
                    f"epoch {r.epoch}{of}, last value {fmt_value(r.last_value)}, "
                    f"for {fmt_duration(r.elapsed_s)}",
                )
            )
    link = f'<p><a href="{_e(study.dashboard_url)}">Open it in optuna-dashboard</a></p>'
    return f"<table>{_rows(pairs)}</table>\n{link}\n"


def _plot_html(plot: Plot) -> str:
    if plot.png is None:
        return f'<p class="note">{_e(plot.note or "Not drawn.")}</p>\n'
    data = base64.b64encode(plot.png).decode("ascii")
    return (
        f'<img class="plot" data-plot="{_e(plot.name)}" alt="{_e(plot.title)}" '
        f'src="data:image/png;base64,{data}">\n'
    )


def _top_table(trials: Sequence[FrozenTrial], direction: str, k: int) -> str:
    top = ranked(trials, direction)[:k]
    if not top:
        return '<p class="note">No completed trial yet.</p>\n'
    names = param_names(top)
    head = "".join(
        f"<th>{_e(h)}</th>" for h in ("rank", "trial", "value", "epochs", "duration", *names)
    )
    rows = []
    for rank, t in enumerate(top, start=1):
        cells = [
            f'<td class="num">{rank}</td>',
            f'<td class="num">{t.number}</td>',
            f'<td class="num">{_e(fmt_value(trial_value(t)))}</td>',
            f'<td class="num">{epochs_reported(t.intermediate_values)}</td>',
            f'<td class="num">{_e(fmt_duration(trial_duration_s(t)))}</td>',
            *(f"<td>{_e(fmt_param(t.params[n]) if n in t.params else '-')}</td>" for n in names),
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    best_of = "lowest" if direction == "minimize" else "highest"
    caption = f"<p>Completed trials, {best_of} value first.</p>\n"
    return f"{caption}<table><tr>{head}</tr>\n" + "\n".join(rows) + "\n</table>\n"


def _failures(trials: Sequence[FrozenTrial]) -> str:
    groups = failure_groups(trials)
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    pruned_note = f"<p>Pruned (stopped early by the pruner, not failures): {pruned}.</p>\n"
    if not groups:
        return f'<p class="note">No trial failed.</p>\n{pruned_note}'
    rows = []
    for g in groups:
        example = (
            g.example
            if len(g.example) <= MAX_REASON_CHARS
            else (g.example[:MAX_REASON_CHARS] + " ...")
        )
        numbers = ", ".join(str(n) for n in g.trials)
        rows.append(
            f'<tr><td>{_e(g.cause)}</td><td class="num">{len(g.trials)}</td>'
            f"<td>{_e(numbers)}</td><td><code>{_e(example)}</code></td></tr>"
        )
    head = "<tr><th>cause</th><th>trials</th><th>numbers</th><th>first reason in full</th></tr>"
    return f"<table>{head}\n" + "\n".join(rows) + f"\n</table>\n{pruned_note}"


def _best(snapshot: StudySnapshot) -> str:
    if snapshot.best_yaml is None:
        return f'<p class="note">{_e(snapshot.best_note or "No completed trial yet.")}</p>\n'
    study_id = snapshot.study.id
    return (
        f"<pre><code>{_e(snapshot.best_yaml)}</code></pre>\n"
        f"<p>Train it: <code>lstm-hpo best {_e(study_id)} -o best.yaml &amp;&amp; "
        "lstm-hpo train best.yaml</code></p>\n"
    )
