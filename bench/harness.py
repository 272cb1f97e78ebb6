"""The evaluation suite's plumbing: a real ``lstm-hpo serve`` on a scratch database, studies
submitted and watched over REST, finalists retrained with ``lstm-hpo train``.

Nothing here shortcuts the service: trials are claimed and trained by the server's own
worker processes, results are read back through ``/v1``, and each finalist's test score
comes from the CLI users run (``lstm-hpo train best.yaml --json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna

from service.client import Client
from service.schemas import StudyPublic, TrialPublic

REPO = Path(__file__).resolve().parent.parent
#: The CLI, run by this interpreter (the console script may not be on PATH).
CLI = [sys.executable, "-m", "service.cli"]


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class Machine:
    """Where a benchmark ran: recorded beside every figure."""

    cores: int
    cpu: str
    gpu: str | None
    python: str
    torch: str
    date: str
    commit: str

    @classmethod
    def describe(cls) -> Machine:
        import torch

        cpu = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        return cls(
            cores=len(os.sched_getaffinity(0)),
            cpu=cpu,
            gpu=gpu,
            python=platform.python_version(),
            torch=torch.__version__,
            date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            commit=git_commit(),
        )


def git_commit() -> str:
    """HEAD's short hash, with ``+dirty`` when tracked files differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", "service", "search_spaces", "bench"],
            cwd=REPO,
            check=False,
        ).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


@dataclass
class Server:
    """A running ``lstm-hpo serve`` and a client for it."""

    base_url: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    client: Client
    database_url: str | None = None

    @property
    def storage_url(self) -> str:
        """The scratch database (Optuna's tables too), for analyses the API does not offer."""
        return self.database_url or f"sqlite:///{self.data_dir / 'lstm-hpo.db'}"


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that ``running_server`` stops the server and its
    workers (Python's default SIGTERM ends the process without running ``finally``)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@contextmanager
def running_server(
    data_dir: Path, workers: int, *, log: Path, database_url: str | None = None
) -> Iterator[Server]:
    """``lstm-hpo serve`` on a free loopback port, SQLite under ``data_dir`` (or
    ``database_url``), ``workers`` local worker processes of one torch thread each; stopped
    with SIGTERM on exit."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "LSTM_HPO_DATA_DIR": str(data_dir),
        "LSTM_HPO_DATABASE_URL": database_url or f"sqlite:///{data_dir / 'lstm-hpo.db'}",
        "LSTM_HPO_TOKEN": "",
    }
    env.pop("LSTM_HPO_ADMIN_TOKEN", None)
    command = [*CLI, "serve", "--port", str(port), "--workers", str(workers), "--threads", "1"]
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    base_url = f"http://127.0.0.1:{port}"
    client = Client(base_url, token="", timeout=60)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"lstm-hpo serve exited {process.returncode}: see {log}")
            try:
                client.health()
                break
            except Exception as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"lstm-hpo serve did not answer in 120 s: see {log}"
                    ) from err
                time.sleep(0.3)
        yield Server(base_url, data_dir, process, client, database_url)
    finally:
        client.close()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass
class StudyRun:
    """One finished study, as read back over REST."""

    study: dict[str, Any]
    trials: list[dict[str, Any]]
    #: (seconds since the study started, best value so far) at each completed trial.
    best_so_far: list[tuple[float, float]]
    best_value: float | None
    best_config: dict[str, Any] | None
    wall_s: float
    trials_per_hour: float
    counts: dict[str, int]
    #: Filled in by :func:`retrain`: the finalist's test-split metric.
    test_value: float | None = None
    #: Which of the retrain's test metrics ``test_value`` keeps (``test_acc`` for a study
    #: ranked by cross-entropy); None: the one matching the ranked metric.
    test_metric: str | None = None
    retrain: dict[str, Any] = field(default_factory=dict)


def run_study(
    server: Server, spec: Mapping[str, Any], *, budget_s: float, progress: bool = True
) -> StudyRun:
    """Submit ``spec`` with ``study.timeout_s = budget_s``, wait until it ends, read it back.

    The queue starts no trial after the deadline; trials running then finish. Raises
    RuntimeError when the study fails or has no completed trial.
    """
    spec = json.loads(json.dumps(spec))  # a deep copy we may change
    spec["study"]["timeout_s"] = budget_s
    study = server.client.submit(spec)
    started = time.monotonic()

    tty = sys.stdout.isatty()
    last: list[tuple[str, int]] = []

    def report(s: StudyPublic) -> None:
        if not progress or (not tty and last and last[-1] == (s.state, s.n_finished)):
            return  # a log file gets a line per change, a terminal one updating line
        last.append((s.state, s.n_finished))
        best = f"{s.best_value:.4g}" if s.best_value is not None else "-"
        elapsed = time.monotonic() - started
        line = (
            f"  {s.name}: {s.state:<9} {elapsed:5.0f}/{budget_s:.0f} s  "
            f"trials {s.n_finished:3d}  best {best}"
        )
        print(f"\r{line}   " if tty else line, end="" if tty else "\n", flush=True)

    final = server.client.wait(study.id, timeout_s=budget_s * 3 + 600, poll_s=2, on_update=report)
    if progress and tty:
        print()
    if final.state != "succeeded":
        raise RuntimeError(f"study {final.name} ended {final.state}: {final.error}")
    trials = list_trials(server.client, study.id)
    return summarise(final, trials, server.client)


def warm_up(server: Server, workers: int) -> None:
    """Run ``workers`` one-epoch trials of a tiny adding problem, so that every worker
    process has imported torch and Lightning before a timed study starts (seconds each)."""
    spec = {
        "name": "warm-up",
        "task": {"kind": "adding", "seq_len": 10, "n_train": 64, "n_val": 32, "n_test": 32},
        "space": {"num_layers": 1, "hidden_size": 4, "max_epochs": 1},
        "study": {"n_trials": max(1, workers) * 2, "sampler": "random", "pruner": "none"},
    }
    study = server.client.submit(spec)
    server.client.wait(study.id, timeout_s=300, poll_s=0.5)


def list_trials(client: Client, study_id: str) -> list[TrialPublic]:
    """Every trial of a study, in number order."""
    out: list[TrialPublic] = []
    while True:
        page = client.trials(study_id, limit=500, offset=len(out))
        out += page.items
        if len(out) >= page.total or not page.items:
            return out


def summarise(study: StudyPublic, trials: list[TrialPublic], client: Client) -> StudyRun:
    """Best-so-far against wall time, trials per hour and the best config of a study."""
    maximize = study.direction == "maximize"
    t0 = study.started_at or study.created_at
    done = sorted(
        (t for t in trials if t.state == "complete" and t.value is not None and t.finished_at),
        key=lambda t: t.finished_at or t0,
    )
    curve: list[tuple[float, float]] = []
    best: float | None = None
    for t in done:
        assert t.value is not None and t.finished_at is not None
        if best is None or (t.value > best if maximize else t.value < best):
            best = t.value
        curve.append(((t.finished_at - t0).total_seconds(), best))
    wall = study.elapsed_s or 0.0
    finished = [t for t in trials if t.state in ("complete", "pruned", "failed")]
    counts = {state: sum(t.state == state for t in trials) for state in ("complete", "pruned")}
    counts["failed"] = sum(t.state == "failed" for t in trials)
    best_config = client.best(study.id).config if done else None
    return StudyRun(
        study=study.model_dump(mode="json", exclude={"spec"}),
        trials=[t.model_dump(mode="json", exclude={"config"}) for t in trials],
        best_so_far=curve,
        best_value=best,
        best_config=best_config,
        wall_s=wall,
        trials_per_hour=len(finished) / wall * 3600 if wall > 0 else 0.0,
        counts=counts,
    )


def retrain(run: StudyRun, out_dir: Path, *, refit: bool = False) -> None:
    """Retrain ``run``'s best config with ``lstm-hpo train --json`` (one torch thread) and
    record its test-split metric in ``run.test_value`` (None, with the reason, on failure).

    ``refit``: ``train --refit`` (a validated fit, then a refit on train + validation for
    its best epochs); ``test_value`` is the refit's, ``retrain["validated_test_value"]``
    the validated fit's (trained on train only), for comparison."""
    if run.best_config is None:
        run.retrain = {"error": "no completed trial"}
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    config = out_dir / "best.json"
    config.write_text(json.dumps(run.best_config, indent=2))
    started = time.monotonic()
    done = subprocess.run(
        [
            *CLI,
            "train",
            str(config),
            "--out",
            str(out_dir),
            "--json",
            "--threads",
            "1",
            "--accelerator",
            "cpu",
            *(["--refit"] if refit else []),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    _record(run, done, time.monotonic() - started, "refit" if refit else "retrain")


def score_checkpoint(server: Server, run: StudyRun, out_dir: Path) -> None:
    """Score ``run``'s best trial as it was trained, on the test split, without retraining:
    its checkpoint (``GET /v1/studies/{id}/best/checkpoint``, the weights of its best
    epoch) through ``lstm-hpo train --evaluate``. Same numbers as :func:`retrain` on a CPU
    (a seeded retrain is the same run) at a fraction of the time."""
    if run.best_config is None:
        run.retrain = {"error": "no completed trial"}
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / "best.ckpt"
    started = time.monotonic()
    server.client.best_checkpoint(run.study["id"], checkpoint)
    config = out_dir / "best.json"
    config.write_text(json.dumps(run.best_config, indent=2))
    command = [
        *CLI,
        "train",
        str(config),
        "--evaluate",
        str(checkpoint),
        "--json",
        "--threads",
        "1",
        "--accelerator",
        "cpu",
    ]
    _record(
        run,
        subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False),
        time.monotonic() - started,
        "checkpoint",
    )


def _record(
    run: StudyRun, done: subprocess.CompletedProcess[str], seconds: float, how: str
) -> None:
    if done.returncode != 0:
        run.retrain = {"error": done.stderr[-2000:], "seconds": seconds, "how": how}
        return
    result = json.loads(done.stdout.strip().splitlines()[-1])
    test_metrics = result.get("test_metrics") or {}
    run.test_value = (
        test_metrics.get(run.test_metric) if run.test_metric else result.get("test_value")
    )
    run.retrain = {
        "how": how,
        "seconds": seconds,
        "val_value": result.get("value"),
        "test_value": run.test_value,
        "test_metrics": test_metrics,
        "best_epoch": result.get("best_epoch"),
        "description": result.get("description"),
    }
    refit = result.get("refit") or {}
    selection = refit.get("selection")
    if selection is not None:
        chosen = selection.get("test_metrics") or {}
        run.retrain["refit_epochs"] = refit.get("epochs")
        run.retrain["validated_test_value"] = (
            chosen.get(run.test_metric) if run.test_metric else selection.get("test_value")
        )


def retrain_all(runs: list[tuple[StudyRun, Path]], parallel: int, *, refit: bool = False) -> None:
    """:func:`retrain` each run, ``parallel`` at a time (each trains on one thread)."""
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        list(pool.map(lambda pair: retrain(*pair, refit=refit), runs))


def importances(storage_url: str, study_names: Sequence[str]) -> tuple[dict[str, float], int]:
    """Mean fANOVA importance (Hutter et al. 2014, Optuna's default evaluator) of each
    parameter over the given studies' completed trials (each study's importances sum to 1),
    most important first, and how many studies the mean is over (a study with fewer than
    4 completed trials, or all on one plateau, has none: they would be noise)."""
    storage = optuna.storages.RDBStorage(storage_url)
    totals: dict[str, list[float]] = {}
    for name in study_names:
        study = optuna.load_study(study_name=name, storage=storage)
        complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        values = [t.value for t in complete if t.value is not None]
        if len(values) < 4 or max(values) - min(values) <= 0.01 * abs(statistics.median(values)):
            continue  # too few trials, or all on one plateau: importances would be noise
        try:
            found = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
            )
        except (ValueError, RuntimeError):
            continue  # e.g. no parameter common to every completed trial
        for param, value in found.items():
            totals.setdefault(param, []).append(value)
    n = max((len(v) for v in totals.values()), default=0)
    means = {p: sum(v) / n for p, v in totals.items()}
    return dict(sorted(means.items(), key=lambda kv: -kv[1])), n


def plot_importances(found: Mapping[str, float], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.35 * max(3, len(found)) + 1))
    names = list(found)[::-1]
    ax.barh(names, [found[n] for n in names], color="C0")
    ax.set_xlabel("fANOVA importance (mean over studies)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def seed_int(text: str) -> int:
    """argparse type: a sampler seed, an integer in [0, 2**32 - 1] (``study.seed``'s range)."""
    value = int(text)
    if not 0 <= value <= 2**32 - 1:
        raise argparse.ArgumentTypeError(f"must be 0 to 4294967295 (got {value})")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number above 0 (got {text})")
    return value


def add_workers_option(parser: argparse.ArgumentParser) -> None:
    """``--workers``: local worker processes of the scratch server, one per core by default
    (one torch thread each: more processes than cores would only slow every trial)."""
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=len(os.sched_getaffinity(0)),
        help="worker processes (default: one per core)",
    )


def machine_line(m: Mapping[str, Any]) -> str:
    """A :class:`Machine` (as JSON) in the words every summary.md uses."""
    return (
        f"Machine: {m['cores']} cores ({m['cpu']}), GPU: {m['gpu'] or 'none'}; Python "
        f"{m['python']}, torch {m['torch']}; {m['date']}; commit {m['commit']}."
    )


def to_jsonable(obj: Any) -> Any:
    """Dataclasses (nested) as dicts, for ``json.dumps``."""
    if hasattr(obj, "__dataclass_fields__"):
        return {k: to_jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    return obj
