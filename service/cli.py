"""The `lstm-hpo` command line."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Column, Table
from rich.text import Text

from service.atomic_file import write_file
from service.config import Settings
from service.durations import fmt_duration
from service.errors import (
    CheckpointMismatch,
    DatabaseUnusable,
    DataError,
    InvalidServerUrl,
    InvalidSpec,
    LstmHpoError,
    SingleHostOnly,
)
from service.training.run_dir import (
    MANIFEST,
    RUN_FILES,
    SELECTION_DIR,
    RunStart,
    overwritten_input,
    record_run,
    replace_earlier_run,
)

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.orm import Session, sessionmaker

    from service.client import Client
    from service.schemas import (
        ConfirmationPublic,
        MetricSummaryPublic,
        ProgressPublic,
        StudyPublic,
    )
    from service.search_space import ResolvedConfig
    from service.training.checkpoints import SavedModel
    from service.training.fit import FitResult
    from service.worker import ProcessPlan, WorkerOptions

app = typer.Typer(
    name="lstm-hpo",
    help="Hyperparameter search for stacked LSTMs: serve the API, run workers, train configs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
# soft_wrap: never break a long path or message across lines (logs get grepped).
err_console = Console(stderr=True, soft_wrap=True)


@app.callback()
def _fit_output_to_the_terminal() -> None:
    # Rich reads COLUMNS when a Console is made: remake both per invocation, so that a
    # command run in-process (typer's CliRunner, a notebook) sizes its tables to the
    # terminal it runs in now, not the one this module was imported under.
    global console, err_console  # noqa: PLW0603 (the reason above)
    console = Console()
    err_console = Console(stderr=True, soft_wrap=True)


def _fail(err: LstmHpoError, code: int = 1) -> typer.Exit:
    if isinstance(err, InvalidSpec):
        headline = err.default_message()
        if isinstance(err, CheckpointMismatch):
            headline = f"{err.path}: {headline}"
        err_console.print(f"[red]error:[/red] {escape(headline)}")
        for e in err.errors:
            err_console.print(f"  - {escape(str(e))}")
    else:
        err_console.print(f"[red]error:[/red] {escape(err.message)}")
        if getattr(err, "status_code", None) == 401:
            hint = "check" if os.environ.get("LSTM_HPO_TOKEN") else "set"
            err_console.print(f"  {hint} LSTM_HPO_TOKEN (or --token): your API token")
    return typer.Exit(code)


@app.command()
def train(
    config: Annotated[
        Path | None,
        typer.Argument(
            help="A resolved config (YAML/JSON), e.g. from `lstm-hpo best`. Optional with "
            "--evaluate when the checkpoint records its task.",
            show_default=False,
        ),
    ] = None,
    *,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output directory (default: runs/<task>-<time>)."),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one final JSON line with the metrics.")
    ] = False,
    accelerator: Annotated[
        str, typer.Option(help="Lightning accelerator: auto | cpu | gpu | mps.")
    ] = "auto",
    threads: Annotated[
        int | None, typer.Option(help="torch threads (default: torch's own choice).")
    ] = None,
    init_from: Annotated[
        Path | None,
        typer.Option(
            "--init-from",
            metavar="FILE.ckpt",
            help="Start from the model weights of this checkpoint (a `train --out` best.ckpt, "
            "`lstm-hpo best ID --checkpoint`). Weights only: the optimizer and LR schedule "
            "start afresh from the config and epochs count from 0 (fine-tuning; an "
            "interrupted trial is resumed by the service itself). The network must be the "
            "config's (task kind, data sizes, cell, layers and widths, direction, "
            "embedding): else exit 2 naming what differs.",
            show_default=False,
        ),
    ] = None,
    evaluate: Annotated[
        Path | None,
        typer.Option(
            "--evaluate",
            metavar="FILE.ckpt",
            help="Train nothing: score this checkpoint on the validation and test splits "
            "(the --json line's value and test_value). CONFIG defaults to the config the "
            "checkpoint was trained with.",
            show_default=False,
        ),
    ] = None,
    refit: Annotated[
        bool,
        typer.Option(
            "--refit",
            help="Train on the train and validation splits together, for the epochs a "
            "validated fit of the config peaked at (that fit runs first, into "
            "OUT/selection), and score the last epoch's weights on the test split (the "
            "validated fit's test score is reported beside it). Not with lr_schedule "
            "plateau. Measured: no gain on the bundled tasks (README).",
        ),
    ] = False,
    refit_epochs: Annotated[
        int | None,
        typer.Option(
            "--refit-epochs",
            metavar="N",
            min=1,
            help="Refit for N epochs (1..max_epochs) without the validated fit first "
            "(implies --refit; N is a validated fit's best epoch + 1).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Train one resolved config; write the checkpoint, config and metrics to --out.

    A config that is not valid (or data that do not fit it), and a checkpoint that cannot
    be read or does not fit the config, exit 2 with the reasons; a training failure exits 1.
    """
    from service.search_space import check_refit, expand_home, load_config_file

    if evaluate is not None and init_from is not None:
        _usage_error("--evaluate and --init-from exclude each other: --evaluate trains nothing")
    if evaluate is not None and out is not None:
        _usage_error("--evaluate writes nothing: --out is for training")
    if config is None and evaluate is None:
        _usage_error("missing CONFIG (only --evaluate can take it from the checkpoint)")
    refit = refit or refit_epochs is not None
    if refit and (evaluate is not None or init_from is not None):
        which = "--evaluate trains nothing" if evaluate is not None else "--init-from fine-tunes"
        _usage_error(f"--refit trains from scratch on train + validation; {which}")
    checkpoint_path = evaluate or init_from
    if checkpoint_path is not None and not checkpoint_path.is_file():
        # Before torch is imported: a typo costs no seconds.
        why = "not a file" if checkpoint_path.exists() else "no such file"
        _usage_error(f"cannot read checkpoint {checkpoint_path}: {why}")

    resolved: ResolvedConfig | None = None
    if config is not None:
        try:
            resolved = load_config_file(config)
            if refit:  # before torch is imported, as every check of the config
                check_refit(resolved.params, refit_epochs, epochs_name="--refit-epochs")
        except LstmHpoError as err:  # InvalidConfig / InvalidSpec: it never raises anything else
            if isinstance(err, InvalidSpec) and all(e.loc == "--refit-epochs" for e in err.errors):
                _usage_error("; ".join(str(e) for e in err.errors))  # the config is fine
            raise _fail(err, 2) from None
    if out is not None:
        out = expand_home(out)  # also when quoted: Lightning expands it, so must we
        _check_out_dir(out, (SELECTION_DIR,) if refit and refit_epochs is None else ())
    # torch + Lightning take seconds to import: only once the config is known to be good.
    from service.training.fit import (
        configure_torch_threads,
        evaluate_checkpoint,
        fit_config,
        refit_config,
    )

    saved: SavedModel | None = None
    replacing: _Replacing | None = None
    if checkpoint_path is not None:
        saved, resolved = _read_checkpoint(checkpoint_path, resolved, evaluate is not None)
    assert resolved is not None  # a config, or --evaluate's checkpoint's
    data_roots = _train_data_roots(getattr(resolved.task, "path", None))
    configure_torch_threads(threads)
    out_dir: Path | None = None
    if evaluate is None:
        out_dir = out or Path("runs") / f"{resolved.task.kind}-{time.strftime('%Y%m%d-%H%M%S')}"
        inputs = _run_inputs(resolved, (config,), data_roots)
        selection = refit and refit_epochs is None
        # The --init-from checkpoint may be overwritten (fine-tuning in place): it is read
        # whole before training starts. A config or data file would be lost for good.
        clash = overwritten_input(out_dir, inputs, selection=selection, config=config)
        if clash is not None:
            _usage_error(
                f"--out {out_dir}: training would overwrite {clash}, which it reads; "
                "choose another --out"
            )
        inputs += [init_from] if init_from is not None else []
        replacing = _Replacing(out_dir, inputs, selection)
    action = f"Evaluating {evaluate}" if evaluate is not None else f"Training -> {out_dir}"
    if refit:
        action = f"Refitting on train + validation -> {out_dir}"

    def started() -> None:
        """Once the data and checkpoint are read: a run they refuse says only why."""
        if not json_output:
            console.print(f"[bold]{resolved.task.kind}[/bold]: {escape(action)}")
        if replacing is not None:
            replacing.begin()

    try:
        if evaluate is not None:
            assert saved is not None
            result = evaluate_checkpoint(
                resolved, saved, accelerator=accelerator, data_roots=data_roots, on_start=started
            )
        elif refit:
            assert out_dir is not None
            result = refit_config(
                resolved,
                out_dir=out_dir,
                epochs=refit_epochs,
                progress=sys.stderr.isatty(),
                accelerator=accelerator,
                data_roots=data_roots,
                on_phase=None if json_output else lambda say: console.print(escape(say)),
                on_start=started,
            )
        else:
            result = fit_config(
                resolved,
                out_dir=out_dir,
                progress=sys.stderr.isatty(),
                accelerator=accelerator,
                data_roots=data_roots,
                init_from=saved,
                on_start=started,
            )
        if replacing is not None:
            replacing.finish()
    except (InvalidSpec, DataError) as err:  # InvalidConfig, CheckpointMismatch: data read
        raise _fail(err, 2) from None  # the input is wrong: as a config error, exit 2
    except LstmHpoError as err:
        raise _fail(err) from None
    except RuntimeError as err:  # DivergedError and CUDA OOM are RuntimeErrors
        err_console.print(f"[red]training failed:[/red] {err}")
        raise typer.Exit(1) from None
    except OSError as err:  # the disk filled up, --out vanished: what no check can foresee
        err_console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(1) from None
    if json_output:
        print(json.dumps(result.summary()))
        return
    table = Table(title=result.description or "result", show_header=False)
    table.add_row("metric", f"{result.metric} ({result.direction})")
    if result.initial_value is not None:
        table.add_row("validation before training", _fmt(result.initial_value))
    if result.refit is not None:
        _refit_rows(table, result)
        if evaluate is not None:
            table.add_row("validation", _fmt(result.value) + " (trained on: not held out)")
    elif evaluate is not None:
        table.add_row("validation", _fmt(result.value) + f" (weights of epoch {result.best_epoch})")
    else:
        table.add_row("best validation", _fmt(result.value) + f" (epoch {result.best_epoch})")
    table.add_row("test (refit)" if result.refit else "test", _fmt(result.test_value))
    table.add_row(f"baseline ({result.baseline_name}, test)", _fmt(result.baseline))
    table.add_row("beats baseline", "yes" if result.beats_baseline else "[red]no[/red]")
    table.add_row("checkpoint", result.checkpoint or "-")
    console.print(table)


def _refit_rows(table: Table, result: FitResult) -> None:
    """A refit's rows: the validated fit its epochs came from (when it ran), and the refit."""
    assert result.refit is not None
    selection = result.refit["selection"]
    epochs = result.refit["epochs"]
    if selection is not None:
        table.add_row(
            "validated fit",
            f"best validation {_fmt(selection['value'])} at epoch {selection['best_epoch']}, "
            f"test {_fmt(selection['test_value'])}",
        )
    table.add_row("refit", f"{epochs} epoch(s) on train + validation")


def _check_out_dir(out: Path, subdirs: tuple[str, ...] = ()) -> None:
    """Exit 2 naming ``--out`` when training could not write there: it, or a directory it
    needs (``subdirs`` inside it, or an ancestor), is a file, or the nearest directory that
    exists is not writable (permissions, a read-only file system). Creates nothing."""
    for path in (out, *(out / sub for sub in subdirs)):
        if path.exists() and not path.is_dir():
            _usage_error(f"--out {out}: {path} is a file, not a directory")
    for directory in (out, *(out / sub for sub in subdirs)):
        names = (*RUN_FILES, MANIFEST) if directory == out else RUN_FILES
        for name in names:  # a directory where the run writes a file
            if (directory / name).is_dir():
                _usage_error(
                    f"--out {out}: {directory / name} is a directory; the run writes a file there"
                )
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        _usage_error(f"--out {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        _usage_error(f"--out {out}: cannot write in {existing} (permissions or read-only)")


def _run_inputs(
    config: ResolvedConfig, files: tuple[Path | None, ...], data_roots: tuple[Path, ...] | None
) -> list[Path]:
    """The files a `train` run reads: ``files`` (its config, checkpoint) and every place
    its ``task.path`` may be found (``~`` expanded, as the data loader does)."""
    from service.search_space import expand_home

    inputs = [path for path in files if path is not None]
    task_path = getattr(config.task, "path", None)
    if task_path is not None:
        data = expand_home(task_path)
        inputs += [data] if data.is_absolute() else [r / data for r in data_roots or (Path.cwd(),)]
    return inputs


@dataclass
class _Replacing:
    """`train --out DIR`: the earlier run in DIR is replaced once the new run's data and
    checkpoint are read (:meth:`begin`: a run they refuse loses nothing), and the new run
    lists what it wrote once it has finished (:meth:`finish`)."""

    out_dir: Path
    #: What the run reads (its config, checkpoint, data): kept, whatever their names.
    inputs: list[Path]
    #: A refit's validated fit writes DIR/selection.
    selection: bool
    start: RunStart | None = None

    def begin(self) -> None:
        self.start = replace_earlier_run(self.out_dir, keep=self.inputs)
        if self.start.unreadable is not None:
            err_console.print(
                f"note: cannot read {escape(str(self.out_dir / MANIFEST))} "
                f"({escape(self.start.unreadable)}): the earlier run's files there are left "
                "as they are; files of this run replace those of the same name"
            )
        if not (removed := self.start.removed):
            return
        names = [str(path.relative_to(self.out_dir)) for path in removed]
        if SELECTION_DIR in names:  # gone as a whole: name it once
            names = [n for n in names if not n.startswith(f"{SELECTION_DIR}/")]
            names = [f"{SELECTION_DIR}/" if n == SELECTION_DIR else n for n in names]
        where, what = escape(str(self.out_dir)), escape(", ".join(names))
        err_console.print(f"note: {where} held an earlier run; removed {what}")

    def finish(self) -> None:
        if self.start is not None:
            record_run(self.out_dir, self.start, selection=self.selection)


def _client(server: str, token: str | None, timeout: float = 30.0) -> Client:
    """The API client for ``--server``; a URL that cannot work is a usage error (exit 2)."""
    from service.client import Client

    try:
        return Client(server, token=token, timeout=timeout)
    except InvalidServerUrl as err:
        raise _usage_error(f"--server: {err.message}") from None


def _usage_error(message: str) -> typer.Exit:
    """Print ``message`` as a usage error and exit 2."""
    err_console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(2)


#: Task fields that decide what a forecast model's outputs mean (levels or changes, logs
#: or values): a checkpoint scored under other values would report meaningless numbers.
_OUTPUT_MEANING = frozenset({"task.transform", "task.normalize"})


def _read_checkpoint(
    path: Path, config: ResolvedConfig | None, evaluating: bool = False
) -> tuple[SavedModel, ResolvedConfig]:
    """The model in ``path`` and the config to use with it: ``config``, or (None) the one
    the checkpoint was trained with. Exits 2 naming the file when it is not usable, or when
    ``evaluating`` it under a config whose outputs would mean something else
    (:data:`_OUTPUT_MEANING`); fine-tuning (``--init-from``) such a model is only noted."""
    from service.errors import InvalidCheckpoint
    from service.search_space import parse_config
    from service.training.checkpoints import read_model_checkpoint, task_differences

    try:
        saved = read_model_checkpoint(path)
    except InvalidCheckpoint as err:
        raise _fail(err, 2) from None
    if config is not None:
        task = config.task.model_dump(mode="json", exclude_none=True)
        diffs = task_differences(saved, task)
        meaning = [d for d in diffs if d.loc in _OUTPUT_MEANING]
        if evaluating and meaning:
            said = "; ".join(str(d) for d in meaning)
            _usage_error(
                f"{path} cannot be scored under this config ({said}): its outputs mean "
                "something else under the config's values; give the checkpoint's own, or no "
                "config (the checkpoint records its task)"
            )
        for diff in diffs:
            what = "another output scale" if diff in meaning else "other data"
            err_console.print(f"note: {escape(str(path))} was trained on {what}: {diff}")
        return saved, config
    if saved.task is None:
        _usage_error(
            f"{path} does not record the task it was trained on (written by an older "
            f"lstm-hpo): give the config too: lstm-hpo train CONFIG.yaml --evaluate {path}"
        )
    try:
        params = saved.params.model_dump(mode="json", exclude_none=True)
        return saved, parse_config({"task": dict(saved.task or {}), "params": params})
    except InvalidSpec as err:
        reasons = "; ".join(str(e) for e in err.errors)
        _usage_error(f"{path}: the config it records is not valid here ({reasons})")
        raise  # unreachable: _usage_error exits


def _train_data_roots(path: str | None) -> tuple[Path, ...] | None:
    """Where `train` looks for a relative ``task.path``: the working directory, then the
    data directories the server's workers read (so a config from `lstm-hpo best` trains
    from anywhere). Exits 2 naming every place it looked when the file is in none."""
    from service.search_space import expand_home

    if path is None or expand_home(path).is_absolute():
        return None
    roots = (Path.cwd(), *_settings().allowed_data_roots())
    if any((root / path).exists() for root in roots):
        return roots
    looked = ", ".join(str(root) for root in roots)
    err_console.print(
        f"[red]error:[/red] task.path: {escape(path)}: no such file; looked in {escape(looked)}. "
        "Give an absolute path, or set LSTM_HPO_DATA_DIR (its datasets/ folder) or "
        "LSTM_HPO_DATA_ROOTS to the directory that holds it."
    )
    raise typer.Exit(2)


STUDY_ID_HELP = "The study id, or its start (the 12 digits study tables show)."
ServerOption = Annotated[
    str,
    typer.Option("--server", "-s", envvar="LSTM_HPO_SERVER", help="The lstm-hpo server URL."),
]
DEFAULT_SERVER = "http://127.0.0.1:8000"
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="LSTM_HPO_TOKEN",
        help="API token (lstm-hpo token create NAME); not needed for a server in open mode.",
        show_default=False,
    ),
]


def _settings(database_url: str | None = None) -> Settings:
    from pydantic import ValidationError

    try:
        settings = Settings() if database_url is None else Settings(database_url=database_url)
    except ValidationError as err:
        # Each field by the name the user set it under, without the value (a database
        # URL's password): pydantic's own text shows input_value.
        err_console.print("[red]invalid settings:[/red]")
        for error in err.errors(include_url=False, include_input=False):
            field = ".".join(str(part) for part in error["loc"])
            name = (
                "--database-url"
                if field == "database_url" and database_url is not None
                else f"LSTM_HPO_{field.upper()}"
            )
            message = error["msg"].removeprefix("Value error, ")
            err_console.print(f"  - {escape(name + ': ' + message if field else message)}")
        raise typer.Exit(2) from None
    return settings


@contextmanager
def _database_errors() -> Iterator[None]:
    """A database that cannot be reached, opened or migrated: its error line, not
    SQLAlchemy's traceback (a wrong host, a server not up yet); exit 1, or 2 when the
    setting itself cannot work (``DatabaseUnusable``)."""
    from service.db import translate_any

    try:
        yield
    except Exception as err:
        translated = translate_any(err)
        if translated is None:
            raise
        raise _fail(translated, 2 if isinstance(translated, DatabaseUnusable) else 1) from None


def _worker_options(settings: Settings, accelerator: str) -> WorkerOptions:
    from service.worker import WorkerOptions

    return WorkerOptions(
        database_url=settings.resolved_database_url(),
        data_roots=settings.allowed_data_roots(),
        heartbeat_interval_s=settings.heartbeat_interval_s,
        poll_interval_s=settings.poll_interval_s,
        torch_threads=settings.torch_threads,
        accelerator=accelerator,
        worker_memory_gb=settings.worker_memory_gb,
        max_running_per_owner=settings.max_running_trials_per_principal,
        artifacts_url=settings.artifacts_url,
        artifacts_data_dir=settings.data_dir,
        preempt_grace_s=settings.preempt_grace_s,
        trial_kill_grace_s=settings.trial_kill_grace_s,
        log_format=settings.log_format,
    )


def _usable_cores() -> int:
    # The cores this process may run on (a container's cpuset), not the machine's.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _check_processes(
    devices: str | None, processes: int | None, threads: int, accelerator: str
) -> list[ProcessPlan]:
    """The worker processes for this machine (``service.worker.plan_worker_processes``).

    Exits with status 2 on a bad ``--devices``; warns when ``--processes`` was cut to fit
    the cores, and when GPU processes oversubscribe them.
    """
    from service.worker import detect_gpus, plan_worker_processes

    cores = _usable_cores()
    mode = (devices or "auto").strip().lower()
    gpus = detect_gpus() if mode in ("auto", "all") and processes != 0 else []
    try:
        plans = plan_worker_processes(
            devices, processes, cores, threads, accelerator=accelerator, gpus=gpus
        )
    except ValueError as err:
        err_console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(2) from None
    if processes is not None and len(plans) < processes:  # only CPU plans are cut
        err_console.print(
            f"[yellow]warning:[/yellow] {processes} processes x {threads} torch threads > "
            f"{cores} cores; using {len(plans)} processes of {plans[0].torch_threads} "
            "thread(s) (oversubscribed CPUs run slower, not faster)"
        )
    elif plans and plans[0].accelerator == "gpu" and len(plans) * threads > cores:
        err_console.print(
            f"[yellow]warning:[/yellow] {len(plans)} GPU processes x {threads} torch threads > "
            f"{cores} cores: data preparation and optimizer steps will compete for the CPU"
        )
    return plans


def _describe_plans(plans: list[ProcessPlan]) -> str:
    """``gpu 0, gpu 1 (1 torch thread each)`` / ``cpu x 16 (1 torch thread each)``."""
    if not plans:
        return "none"
    counts: dict[str, int] = {}
    for plan in plans:
        counts[plan.device] = counts.get(plan.device, 0) + 1
    devices = ", ".join(f"{d} x {n}" if n > 1 else d for d, n in counts.items())
    threads = plans[0].torch_threads
    return f"{devices} ({threads} torch thread{'s' if threads > 1 else ''} each)"


DevicesOption = Annotated[
    str | None,
    typer.Option(
        help="cpu | all | GPU ids, e.g. 0,1,2,3 (one process per GPU, CUDA_VISIBLE_DEVICES "
        "set per process) | auto (default: every GPU nvidia-smi lists, else the CPU).",
    ),
]
ThreadsOption = Annotated[
    int | None,
    typer.Option(
        min=1, help="torch threads per worker process (default: LSTM_HPO_TORCH_THREADS, 1)."
    ),
]


@app.command()
def serve(
    *,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port (default 8000).")] = None,
    workers: Annotated[
        int, typer.Option("--workers", "-w", min=0, help="Local worker processes (0: none).")
    ] = 1,
    accelerator: Annotated[str, typer.Option(help="Workers' Lightning accelerator.")] = "auto",
    devices: DevicesOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Migrate, then run the API, the dashboard and N local worker processes."""
    import threading

    import uvicorn

    from service.api.app import create_app
    from service.logs import configure_logging
    from service.worker import run_worker_processes, stop_deadline_s

    settings = _settings()
    updates = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = settings.model_copy(update=updates)
    plans = _check_processes(devices, workers, threads or settings.torch_threads, accelerator)
    # The reaper's and the worker supervisor's lines, with times (uvicorn logs its own;
    # with LSTM_HPO_LOG_FORMAT=json its lines go through ours, as JSON too).
    configure_logging(settings.log_format)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # "Context impl ..." per start
    # Name the server's connections in pg_stat_activity (workers name theirs by pid).
    os.environ.setdefault("PGAPPNAME", "lstm-hpo-server")
    with _database_errors():
        api = create_app(settings)
    base = settings.base_url()
    console.print(f"[bold]lstm-hpo[/bold] {base}")
    console.print(f"  REST API   {base}/v1  (OpenAPI: {base}/docs)")
    console.print(f"  dashboard  {base}/dashboard")
    console.print(f"  database   {settings.safe_database_url()}")
    console.print(f"  workers    {len(plans)} local process(es): {_describe_plans(plans)}")
    if api.state.open_mode:
        console.print(
            "  [yellow]auth       open mode:[/yellow] no API token exists, so anyone who can "
            f"reach {settings.host} uses the API and the dashboard as one local user. Turn "
            "authentication on with: lstm-hpo token create NAME --admin"
        )
    else:
        console.print("  auth       on (API tokens; the dashboard signs in at /signin)")
    stop_workers = threading.Event()
    supervisor: threading.Thread | None = None
    if plans:
        options = _worker_options(settings, accelerator)
        supervisor = threading.Thread(
            target=run_worker_processes,
            args=(options, plans),
            kwargs={"install_signals": False, "stop_event": stop_workers},
            daemon=True,
            name="lstm-hpo-workers",
        )
        supervisor.start()

    def stop_on_signal(signum: int, frame: object) -> None:
        stop_workers.set()

    # uvicorn handles SIGTERM / SIGINT while it runs and, once it has shut down, raises the
    # signal again to the handler found before it: the default one would end this process
    # before the workers are stopped.
    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGINT, stop_on_signal)
    try:
        uvicorn.run(
            api,
            host=settings.host,
            port=settings.port,
            log_level="warning",
            log_config=None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG,
        )
    finally:
        # SIGTERM / Ctrl-C stopped uvicorn: stop the local workers too, never orphan them.
        stop_workers.set()
        if supervisor is not None:
            # Each worker checkpoints and requeues its trial (the preemption grace), then
            # the supervisor escalates (see run_worker_processes): never wait past that.
            supervisor.join(timeout=stop_deadline_s(settings.preempt_grace_s) + 5)


@app.command()
def worker(
    *,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes",
            "-p",
            min=0,
            help="Worker processes on this machine (default: one per GPU, else cores // threads).",
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(help="Database URL (default: LSTM_HPO_DATABASE_URL or the local SQLite)."),
    ] = None,
    accelerator: Annotated[str, typer.Option(help="Lightning accelerator.")] = "auto",
    devices: DevicesOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Run worker processes that pull trials from the database until stopped (Ctrl-C)."""
    from service.db import make_engine, make_session_factory
    from service.worker import check_single_host, run_worker_processes

    settings = _settings(database_url)
    plans = _check_processes(devices, processes, threads or settings.torch_threads, accelerator)
    err_console.print(
        f"{len(plans)} worker process(es) on {settings.safe_database_url()}: "
        f"{_describe_plans(plans)}"
    )
    options = _worker_options(settings, accelerator)
    with _database_errors():
        engine = make_engine(options.database_url, pool_size=1)
    try:
        check_single_host(make_session_factory(engine), options)
    except SingleHostOnly as err:
        raise _fail(err, 2) from None
    except LstmHpoError:
        pass  # no schema or no database yet: the worker processes wait for the server
    finally:
        engine.dispose()
    if run_worker_processes(options, plans) == len(plans):
        raise typer.Exit(2)  # every process refused to start; each said why


@app.command()
def migrate(
    database_url: Annotated[str | None, typer.Option(help="Database URL.")] = None,
) -> None:
    """Create or upgrade the database schema (the server also does this at start)."""
    from service.db import make_engine
    from service.migrate import upgrade_schema
    from service.studies import optuna_storage

    settings = _settings(database_url)
    url = settings.resolved_database_url()
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    with _database_errors():
        make_engine(url).dispose()  # a SQLite file's folder is created (or refused)
        optuna_storage(url)  # Optuna creates (or checks) its own tables
        upgrade_schema(url)
    console.print(f"schema is current on {settings.safe_database_url()}")


token_app = typer.Typer(
    name="token",
    help="API tokens: create (printed once), list, revoke. Talks to the database, like migrate.",
    no_args_is_help=True,
)
app.add_typer(token_app)
DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(help="Database URL (default: LSTM_HPO_DATABASE_URL or the local SQLite)."),
]


def _token_sessions(database_url: str | None) -> sessionmaker[Session]:
    """Sessions on a migrated database (token commands may run before the first serve)."""
    from service.db import make_engine, make_session_factory
    from service.migrate import upgrade_schema

    settings = _settings(database_url)
    url = settings.resolved_database_url()
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    with _database_errors():
        upgrade_schema(url)
        return make_session_factory(make_engine(url, pool_size=1))


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="The principal: owner of the studies it submits.")],
    admin: Annotated[
        bool, typer.Option("--admin", help="May see and act on every principal's studies.")
    ] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Create an API token for NAME; the token is printed once, on the last line."""
    from service import auth

    sessions = _token_sessions(database_url)
    try:
        token = auth.create_token(sessions, name, admin=admin)
    except LstmHpoError as err:
        raise _fail(err, 2) from None
    err_console.print(
        f"token for {name}{' (admin)' if admin else ''}; it is shown only now. Use it as "
        "LSTM_HPO_TOKEN=..., --token, Authorization: Bearer, or on the dashboard's sign-in page."
    )
    print(token)


@token_app.command("list")
def token_list(database_url: DatabaseUrlOption = None) -> None:
    """Every token: name, admin, created, last used, revoked (never the token itself)."""
    from service import auth

    table = Table("name", "admin", "created", "last used", "revoked")
    for info in auth.list_tokens(_token_sessions(database_url)):
        table.add_row(
            info.name,
            "yes" if info.admin else "",
            _when(info.created_at),
            _when(info.last_used_at),
            _when(info.revoked_at),
        )
    console.print(table)


@token_app.command("revoke")
def token_revoke(
    name: Annotated[str, typer.Argument(help="The principal whose tokens to revoke.")],
    database_url: DatabaseUrlOption = None,
) -> None:
    """Revoke every token of NAME (its sessions end at once; its studies stay)."""
    from service import auth

    count = auth.revoke_tokens(_token_sessions(database_url), name)
    if count == 0:
        err_console.print(f"[red]error:[/red] {escape(name)} has no live token")
        raise typer.Exit(1)
    console.print(f"revoked {count} token(s) of {name}")


def _when(at: datetime | None) -> str:
    return "-" if at is None else at.strftime("%Y-%m-%d %H:%M:%S UTC")


@app.command()
def submit(
    spec: Annotated[Path, typer.Argument(help="A study spec (YAML or JSON).")],
    server: ServerOption = DEFAULT_SERVER,
    token: TokenOption = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Retry-safe submit: the same key gives the same study.")
    ] = None,
) -> None:
    """Submit a study; prints its id."""
    try:  # the client reads and sends its bytes: the server names one that is not UTF-8
        if not stat.S_ISREG(spec.stat().st_mode):  # a FIFO would block, a device never end
            err_console.print(f"[red]error:[/red] {spec} is not a regular file")
            raise typer.Exit(2)
    except OSError as err:
        err_console.print(f"[red]error:[/red] cannot read {spec}: {err.strerror}")
        raise typer.Exit(2) from None
    with _client(server, token) as client:
        try:
            study = client.submit(spec, idempotency_key=idempotency_key)
        except LstmHpoError as err:
            raise _fail(err, 2 if isinstance(err, InvalidSpec) else 1) from None
    err_console.print(f"queued {study.name} -> {study.dashboard_url}")
    for note in study.notes or ():  # e.g. what a warm start dropped
        err_console.print(f"  note: {escape(note)}")
    print(study.id)


@app.command()
def status(
    study_id: Annotated[
        str | None, typer.Argument(help=f"{STUDY_ID_HELP} None: list the studies.")
    ] = None,
    server: ServerOption = DEFAULT_SERVER,
    token: TokenOption = None,
    watch: Annotated[
        bool, typer.Option("--watch/--no-watch", help="Show a progress bar until it ends.")
    ] = True,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one study (with a live progress bar while it runs) or list the studies.

    While a study runs: its running trials (epoch, last intermediate value), an ETA
    ((time the running trials still need + trials not started x the mean finished trial
    time) / trials running at once) and the ``timeout_s`` left. ``--json`` adds them as
    ``progress``.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from service.client import TERMINAL_STATES

    with _client(server, token) as client:
        try:
            if study_id is None:
                page = client.studies(limit=50)
                if json_output:
                    print(page.model_dump_json())
                    return
                wide = console.width >= WIDE_TABLE_COLUMNS
                table = _study_table(
                    "state",
                    "finished",
                    "best",
                    *(("task",) if wide else ()),
                    title=f"{len(page.items)} of {page.total} studies (newest first)",
                )
                for s in page.items:
                    table.add_row(
                        _short_id(s.id),
                        escape(s.name),
                        s.state,
                        f"{s.n_finished}/{s.n_trials}",
                        _fmt(s.best_value),
                        *((s.task,) if wide else ()),
                    )
                console.print(table)
                return
            study_id = client.resolve(study_id)
            study = client.get(study_id)
            if json_output:
                body = json.loads(study.model_dump_json())
                if (found := _progress_of(client, study_id)) is not None:
                    body["progress"] = json.loads(found.model_dump_json())  # added key
                print(json.dumps(body))
                return
            if watch and study.state not in TERMINAL_STATES and console.is_terminal:
                bar = Progress(
                    "[progress.description]{task.description}",
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    console=console,
                )
                task = bar.add_task(escape(study.name), total=study.n_trials)
                # The bar and, under it, the running trials, the ETA and the timeout left.
                with Live(bar, console=console, refresh_per_second=4) as live:

                    def update(s: StudyPublic) -> None:
                        bar.update(
                            task,
                            total=s.n_trials,
                            completed=s.n_finished,
                            description=escape(f"{s.name} [{s.state}] best={_fmt(s.best_value)}"),
                        )
                        found = None if s.state in TERMINAL_STATES else _progress_of(client, s.id)
                        live.update(Group(bar, _progress_view(found)) if found else bar)

                    study = client.wait(study_id, on_update=update)
            progress = None if study.state in TERMINAL_STATES else _progress_of(client, study_id)
        except LstmHpoError as err:
            raise _fail(err) from None
    _print_study(study)
    if progress is not None:
        console.print(_progress_view(progress))


def _progress_of(client: Client, study_id: str) -> ProgressPublic | None:
    """The study's progress; None from a server without ``/progress`` (or a study deleted
    meanwhile): status shows what it has."""
    from service.client import ApiError

    try:
        return client.progress(study_id)
    except ApiError as err:
        if err.status_code == 404:
            return None
        raise


def _progress_view(progress: ProgressPublic) -> Group:
    """Running trials (epoch, last intermediate value, time), the ETA and its basis, and
    the timeout left."""
    parts: list[RenderableType] = []
    if progress.running:
        table = Table("trial", "epoch", "last value", "running for", title="running trials")
        for r in progress.running:
            of = f"/{r.max_epochs}" if r.max_epochs is not None else ""
            table.add_row(
                str(r.number), f"{r.epoch}{of}", _fmt(r.last_value), fmt_duration(r.elapsed_s)
            )
        parts.append(table)
    eta = "-" if progress.eta_s is None else f"~{fmt_duration(progress.eta_s)}"
    parts.append(Text(f"ETA {eta}: {progress.eta_basis}"))
    if progress.timeout_s is not None and progress.timeout_left_s is not None:
        left = f"timeout: {fmt_duration(progress.timeout_left_s)} left of "
        left += fmt_duration(progress.timeout_s)
        if progress.timeout_first:
            left += " (the timeout should stop the study before its trials are done)"
        parts.append(Text(left))
    return Group(*parts)


@app.command()
def watch(
    server: ServerOption = DEFAULT_SERVER,
    token: TokenOption = None,
    interval: Annotated[
        float, typer.Option("--interval", "-n", min=0.1, help="Seconds between refreshes.")
    ] = 2.0,
    once: Annotated[
        bool, typer.Option("--once", help="Print the table once and exit (for scripts).")
    ] = False,
    limit: Annotated[
        int, typer.Option(min=1, max=500, help="Show at most this many studies, newest first.")
    ] = 50,
) -> None:
    """A live table of every study (yours; an admin's: everyone's): state, trials finished
    and running, best value, ETA and timeout left. Ctrl-C exits (code 0)."""

    with _client(server, token) as client:
        if once:
            try:
                console.print(_studies_table(client, limit))
            except LstmHpoError as err:
                raise _fail(err) from None
            return
        try:
            if console.is_terminal:
                with Live(console=console, auto_refresh=False) as live:
                    while True:
                        live.update(_studies_view(client, limit, interval), refresh=True)
                        time.sleep(interval)
            else:
                while True:  # not a terminal: one table per refresh, one after the other
                    console.print(_studies_view(client, limit, interval))
                    time.sleep(interval)
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a watch ends


def _studies_view(client: Client, limit: int, interval: float) -> RenderableType:
    """:func:`_studies_table`, or what went wrong (watch tries again at the next refresh)."""
    try:
        return _studies_table(client, limit)
    except LstmHpoError as err:
        return Text(f"{time.strftime('%H:%M:%S')} {err.message} (again in {interval:g} s)")


#: Below this many columns, study tables leave out the ETA, timeout and elapsed columns:
#: with them, an id and seven more cells cannot all fit, and cells would be cut.
WIDE_TABLE_COLUMNS = 80


def _studies_table(client: Client, limit: int) -> Table:
    """The newest ``limit`` studies, with the ETA and timeout left of the active ones (in a
    terminal of :data:`WIDE_TABLE_COLUMNS` or more)."""
    from service.client import TERMINAL_STATES

    page = client.studies(limit=limit)
    wide = console.width >= WIDE_TABLE_COLUMNS
    caption = "trials: finished+running/n_trials"
    caption += "; timeout: what is left of study.timeout_s" if wide else " (ETA: a wider terminal)"
    table = _study_table(
        "state",
        "trials",
        "best",
        *(("ETA", "timeout", "elapsed") if wide else ()),
        title=f"{len(page.items)} of {page.total} studies, {time.strftime('%H:%M:%S')}",
        caption=caption,
    )
    for s in page.items:
        running = f"+{s.counts.running}" if s.counts.running else ""
        cells = [
            _short_id(s.id),
            escape(s.name),
            str(s.state),
            f"{s.n_finished}{running}/{s.n_trials}",
            _fmt(s.best_value),
        ]
        if wide:
            found = None if s.state in TERMINAL_STATES else _progress_of(client, s.id)
            eta, left = "-", "-"
            if found is not None:
                eta = "-" if found.eta_s is None else f"~{fmt_duration(found.eta_s, compact=True)}"
                left = fmt_duration(found.timeout_left_s, compact=True)
            cells += [eta, left, fmt_duration(s.elapsed_s, compact=True)]
        table.add_row(*cells)
    return table


@app.command()
def report(
    study_id: Annotated[str, typer.Argument(help=STUDY_ID_HELP)],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Directory to write into (made if missing; default: report-ID)."
        ),
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, max=100, help="Rows of the top trials table.")] = 10,
    server: ServerOption = DEFAULT_SERVER,
    token: TokenOption = None,
) -> None:
    """Write the study's report into a directory: report.html (self-contained, the page
    GET /v1/studies/ID/report serves), each of its figures as NAME.png, and trials.csv.
    Works while the study runs (a snapshot)."""
    from service.report import extract_pngs

    with _client(server, token, timeout=300) as client:
        try:
            study_id = client.resolve(study_id)
            page = client.report(study_id, top_k=top_k)
            table = client.trials_csv(study_id)
        except LstmHpoError as err:
            raise _fail(err) from None
    out = output or Path(f"report-{study_id}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.html").write_text(page, encoding="utf-8")
        figures = extract_pngs(page)
        for name, png in figures.items():
            (out / f"{name}.png").write_bytes(png)
        (out / "trials.csv").write_bytes(table.encode("utf-8"))  # CRLF rows, kept as they are
    except OSError as err:
        err_console.print(f"[red]error:[/red] cannot write into {escape(str(out))}: {err}")
        raise typer.Exit(1) from None
    err_console.print(
        f"wrote {escape(str(out))}: report.html, {len(figures)} figure(s), trials.csv"
    )
    print(out / "report.html")


def _print_study(study: StudyPublic) -> None:
    table = Table(
        Column(no_wrap=True),
        Column(overflow="fold"),  # a URL or a note: folded in a narrow terminal, never cut
        title=f"{study.name} ({study.id})",
        show_header=False,
    )
    table.add_row("state", study.state)
    table.add_row("task / metric", f"{study.task} / {study.metric} ({study.direction})")
    table.add_row("finished", f"{study.n_finished}/{study.n_trials}")
    c = study.counts
    table.add_row(
        "trials",
        f"complete {c.complete}, pruned {c.pruned}, failed {c.failed}, running {c.running}",
    )
    trial = "" if study.best_trial_number is None else f" (trial {study.best_trial_number})"
    table.add_row("best", f"{_fmt(study.best_value)}{trial}")
    table.add_row("elapsed", f"{study.elapsed_s:.1f}s" if study.elapsed_s is not None else "-")
    table.add_row("dashboard", study.dashboard_url)
    if study.error:
        table.add_row("error", study.error)
    for note in study.notes or ():
        table.add_row("note", escape(note))
    console.print(table)


@app.command()
def best(
    study_id: Annotated[str, typer.Argument(help=STUDY_ID_HELP)],
    *,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the config YAML here.")
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", help="Also save the best trial's checkpoint here."),
    ] = None,
    confirmed: Annotated[
        bool,
        typer.Option(
            "--confirmed",
            help="The config the study's confirmation ranks first (the best mean over new "
            "seeds: lstm-hpo confirm, study.confirm), not the search's best run.",
        ),
    ] = False,
    server: ServerOption = DEFAULT_SERVER,
    token: TokenOption = None,
) -> None:
    """The best config as YAML (for `lstm-hpo train`), to stdout or --output; with
    --checkpoint, the best trial's checkpoint too."""

    if confirmed and checkpoint is not None:
        _usage_error(
            "--checkpoint saves the search's best trial's; retrain the confirmed config "
            "with lstm-hpo train"
        )
    # Before asking the server: a path that cannot be written is a usage error, not a
    # traceback after the download.
    output = _file_to_write(output, "--output")
    checkpoint = _file_to_write(checkpoint, "--checkpoint")
    if output is not None and checkpoint is not None and output.resolve() == checkpoint.resolve():
        _usage_error(f"--output and --checkpoint are both {output}: give two files")
    with _client(server, token) as client:
        try:
            study_id = client.resolve(study_id)
            text = client.best_yaml(study_id, confirmed=confirmed)
            if checkpoint is not None:
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                client.best_checkpoint(study_id, checkpoint)
                err_console.print(f"wrote {checkpoint}")
            found = _best_confirmation(client, study_id)
        except LstmHpoError as err:
            raise _fail(err) from None
        except OSError as err:  # the checkpoint's file (its temporary file is removed)
            raise _cannot_write(checkpoint, err) from None
    if found is not None:  # on stderr: stdout is the YAML
        err_console.print(found)
    if output is None:
        print(text, end="")
        return
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_file(output, text.encode("utf-8"))
    except OSError as err:
        raise _cannot_write(output, err) from None
    err_console.print(f"wrote {output}; train it with: lstm-hpo train {output}")


def _file_to_write(path: Path | None, option: str) -> Path | None:
    """``path`` (``~`` expanded), checked before anything is asked of the server; its
    missing directories are made only when it is written (as ``report --output`` makes
    its own). Exits 2 for a directory, or a place no directory can be made or written in."""
    if path is None:
        return None
    path = Path(os.path.expanduser(path))  # no error for an unknown ~user, as Path's
    if path.is_dir():
        _usage_error(f"{option} {path}: is a directory; give a file name")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the nearest directory that exists
    if not existing.is_dir():
        _usage_error(f"{option} {path}: cannot make {path.parent} ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        _usage_error(f"{option} {path}: cannot write in {existing} (permissions or read-only)")
    return path


def _cannot_write(path: Path | None, err: OSError) -> typer.Exit:
    err_console.print(f"[red]error:[/red] cannot write {escape(str(path))}: {err.strerror or err}")
    return typer.Exit(1)


@app.command()
def cancel(
    study_id: Annotated[str, typer.Argument(help=STUDY_ID_HELP)],
    server: ServerOption = DEFAULT_SERVER,
    token: TokenOption = None,
) -> None:
    """Cancel a study: no new trials start; running ones finish."""

    with _client(server, token) as client:
        try:
            study = client.cancel(client.resolve(study_id))
        except LstmHpoError as err:
            raise _fail(err) from None
    console.print(f"{study.id}: {study.state}")


@app.command()
def extend(
    study_id: Annotated[str, typer.Argument(help=STUDY_ID_HELP)],
    n_trials: Annotated[int, typer.Option("--n-trials", "-n", help="Trials to add.", min=1)],
    server: ServerOption = DEFAULT_SERVER,
    token: TokenOption = None,
) -> None:
    """Add trials to a study (running, succeeded, cancelled): its sampler keeps its history."""

    with _client(server, token) as client:
        try:
            study = client.extend(client.resolve(study_id), n_trials)
        except LstmHpoError as err:
            raise _fail(err, 2 if isinstance(err, InvalidSpec) else 1) from None
    console.print(f"{study.id}: {study.state}, {study.n_finished}/{study.n_trials} trials")


@app.command()
def confirm(
    study_id: Annotated[str, typer.Argument(help=STUDY_ID_HELP)],
    *,
    top_k: Annotated[int, typer.Option("--top-k", help="How many of its best configs (1-20).")] = 3,
    seeds: Annotated[int, typer.Option("--seeds", help="New seeds per config (2-20).")] = 5,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until it ends, then show what it found.")
    ] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON (with --wait: the confirmation's).")
    ] = False,
    server: ServerOption = DEFAULT_SERVER,
    token: TokenOption = None,
) -> None:
    """Confirm the winner: re-train the study's top-k configs, each with new seeds, as their
    own study (its id is printed; every study command takes it), each trial scored on the
    validation and the test split. --wait: until it ends, then per config the mean, sd and
    95% interval, and whether the best beats the runner-up beyond noise (a paired t-test
    over seeds). `lstm-hpo best ID` then names the winner."""

    with _client(server, token) as client:
        try:
            study = client.confirm(client.resolve(study_id), top_k=top_k, seeds=seeds)
            err_console.print(
                f"queued {study.name}: {study.n_trials} trials -> {study.dashboard_url}"
            )
            if json_output and not wait:
                print(study.model_dump_json())
                return
            if not json_output:
                print(study.id)
            if not wait:
                return
            client.wait(study.id)
            result = client.confirmation(study.id)
        except LstmHpoError as err:
            raise _fail(err, 2 if isinstance(err, InvalidSpec) else 1) from None
    if json_output:
        print(result.model_dump_json())
    else:
        console.print(_confirmation_view(result))


def _confirmation_view(result: ConfirmationPublic) -> Group:
    """A confirmation's configs (best first) and its verdict."""
    title = (
        f"confirmation {_short_id(result.id)} of study {_short_id(result.confirms)} "
        f"({result.state}, {result.n_finished}/{result.n_trials} trials, seeds "
        f"{', '.join(map(str, result.seeds))})"
    )
    metric = escape(result.metric)
    table = Table(
        # Folded onto more lines in a narrow terminal, never cut short.
        *(
            Column(header, overflow="fold")
            for header in (
                "rank",
                "trial",
                "search",
                f"val {metric}\nmean +- sd\n95% CI",
                "test\nmean +- sd\n95% CI",
                "seeds",
            )
        ),
        title=escape(title),
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        collapse_padding=True,
        pad_edge=False,
    )
    for c in result.configs:
        table.add_row(
            str(c.rank),
            "-" if c.trial_number is None else str(c.trial_number),
            _fmt(c.search_value),
            _mean_sd_ci(c.validation),
            _mean_sd_ci(c.test),
            f"{c.validation.n}/{len(result.seeds)}",
        )
    # The test metrics a task reports beside the ranked one's twin (accuracy for classify).
    from service.search_space import stage_metric

    twin = stage_metric(result.metric, "test")
    names = sorted({n for c in result.configs for n in c.test_metrics} - {twin})
    lines = [
        f"{name}, mean +- sd over seeds: "
        + "; ".join(
            f"#{c.rank} {_mean_sd(m)}"
            for c in result.configs
            if (m := c.test_metrics.get(name)) is not None
        )
        for name in names
    ]
    return Group(table, *(Text(line) for line in lines), Text(result.verdict))


def _mean_sd(summary: MetricSummaryPublic) -> str:
    """``0.01823 +- 0.0042``: the mean to 4 significant digits, the sd to 2 (its own
    precision over a handful of seeds is no better)."""
    if summary.mean is None:
        return "-"
    if summary.sd is None:
        return f"{summary.mean:.4g}"
    return f"{summary.mean:.4g} +- {summary.sd:.2g}"


def _mean_sd_ci(summary: MetricSummaryPublic) -> str:
    """:func:`_mean_sd` and, under it, the 95% interval of the mean to 3 digits."""
    if summary.ci95_low is None or summary.ci95_high is None:
        return _mean_sd(summary)
    return f"{_mean_sd(summary)}\n[{summary.ci95_low:.3g}, {summary.ci95_high:.3g}]"


def _best_confirmation(client: Client, study_id: str) -> RenderableType | None:
    """What ``best`` adds about a confirmation: on a confirmation study its table, on a
    confirmed study its newest confirmation's verdict; None when there is none."""
    top = client.top(study_id, 1)
    found = top[0].confirmation if top else None
    if found is None:
        return None
    if found.study_id == study_id:
        return _confirmation_view(client.confirmation(study_id))
    said = f"confirmation {found.study_id} ({found.state}): {found.verdict}"
    if found.state == "succeeded" and found.rank != 1 and found.winner_trial_number is not None:
        said += (
            f"\nthis YAML is the search's best run (trial {top[0].trial_number}); the "
            f"confirmation ranks trial {found.winner_trial_number}'s config first: "
            f"lstm-hpo best {_short_id(study_id)} --confirmed gives it"
        )
    return Text(said)


@app.command()
def delete(
    study_id: Annotated[str, typer.Argument(help=STUDY_ID_HELP)],
    server: ServerOption = DEFAULT_SERVER,
    token: TokenOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a study and all its trials (a running study is cancelled first)."""

    if not yes and not sys.stdin.isatty():  # a script: never delete without being told to
        err_console.print("[red]error:[/red] add --yes to delete without a terminal to ask")
        raise typer.Exit(2)
    with _client(server, token) as client:
        try:
            study_id = client.resolve(study_id)
            if not yes:
                name = client.get(study_id).name
                typer.confirm(f"Delete study {study_id} ({name}) and all its trials?", abort=True)
            client.delete(study_id)
        except LstmHpoError as err:
            raise _fail(err) from None
    console.print(f"{study_id}: deleted")


#: Digits of a study id that tables show: every study command takes that short id (or
#: any unique start of an id, :meth:`service.client.Client.resolve`), as docker shows 12.
SHORT_ID = 12


def _short_id(study_id: str) -> str:
    return study_id[:SHORT_ID]


def _study_table(*columns: str | Column, **options: Any) -> Table:
    """A table of studies for an 80-column terminal: the short id first and never cut (it is
    what users copy); other cells fold onto more lines rather than being cut when values
    are wide (callers leave columns out below :data:`WIDE_TABLE_COLUMNS`, so that in a
    narrow terminal ordinary values need not fold); rules under the header only."""
    cells = (c if isinstance(c, Column) else Column(c, overflow="fold") for c in columns)
    return Table(
        Column("id", no_wrap=True, min_width=SHORT_ID),
        Column("name", overflow="fold", min_width=8),
        *cells,
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        collapse_padding=True,
        pad_edge=False,
        **options,
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.5g}"


def main() -> None:  # pragma: no cover - console-script entry
    app()


if __name__ == "__main__":  # python -m service.cli
    main()
