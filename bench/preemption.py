"""Work lost per interruption: preemption (SIGTERM) and a hard kill (kill -9) of real LSTM
workers, resuming from per-epoch checkpoints, against restarting from scratch.

    python -m bench.preemption [--interval 10] [--trials 6] [--epochs 12] [--grace 20]

A real ``lstm-hpo serve`` (no local workers) on a scratch SQLite database and two
``lstm-hpo worker --processes 1`` groups train a study of small adding-problem LSTMs.
Once one trial has run uninterrupted (it times an epoch), every ``--interval`` seconds one
worker group that is running a trial is interrupted,
alternately with SIGTERM (a preemption notice: the trial stops at its epoch's end, or
``--grace`` seconds later at the next batch, and is requeued at once) and with SIGKILL (the
reaper retries it after the heartbeat grace), and a new worker group takes its place.

Per interruption, from the database and the checkpoint files once the study is done:

- *resumed*: epochs of training thrown away = the completed epochs the interrupted attempt
  had beyond what its retry resumed from, plus the part of an epoch trained after its last
  checkpoint (checkpoint file time -> the stop), in units of the study's mean epoch time;
- *from scratch*: what a retry that starts at epoch 0 throws away: every epoch of the
  trial's chain up to the stop (the same interruptions, so the ratio is side by side);
- *requeued after*: seconds from the stop until the slot was claimable again (SIGTERM:
  the worker requeues it at once; kill -9: the reaper, after the heartbeat grace);
- *retry started after*: seconds from the stop until a worker claimed the retry (here
  both workers are usually busy, so this includes a new worker process starting).

Targets (issue 11): <= 1 epoch lost per SIGTERM, <= 1 epoch + the heartbeat grace per kill.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from bench.harness import (
    CLI,
    REPO,
    Machine,
    Server,
    exit_on_sigterm,
    git_commit,
    positive_float,
    positive_int,
    running_server,
)
from service.artifacts import open_artifact_store
from service.db import make_engine, make_session_factory
from service.queue import list_leases
from service.states import RESUMED_FROM_ATTR, RETRY_OF_ATTR

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_GRACE_S = 6.0


def spec(trials: int, epochs: int) -> dict[str, Any]:
    """Small adding-problem LSTMs (~1 s per epoch on one core), all with checkpoints."""
    return {
        "name": "bench-preemption",
        "task": {"kind": "adding", "seq_len": 10, "n_train": 3000, "n_val": 200, "n_test": 50},
        "space": {
            "num_layers": {"type": "int", "low": 1, "high": 2},
            "hidden_size": {"type": "int", "low": 12, "high": 24},
            "batch_size": 16,
            "lr": {"type": "float", "low": 3e-3, "high": 3e-2, "log": True},
            "max_epochs": epochs,
            "seed": 7,
        },
        "study": {
            "n_trials": trials,
            "sampler": "random",
            "pruner": "none",
            "seed": 0,
            "max_retries": 10,  # LSTM_HPO_MAX_RETRIES; preemptions use none
            "keep_checkpoints": "all",
        },
    }


@dataclass
class Interruption:
    """One interruption as the bench made it, then as the database shows it."""

    kind: str  # "SIGTERM" | "SIGKILL"
    at: float  # time.time() of the signal
    trial_number: int
    last_checkpoint_at: float | None = None  # mtime of the chain's `last` when it stopped
    stopped_at: float | None = None
    lost_epochs_resumed: float | None = None
    lost_epochs_scratch: float | None = None
    requeued_after_s: float | None = None
    retry_started_after_s: float | None = None


def _worker_group(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [*CLI, "worker", "--processes", "1", "--threads", "1", "--accelerator", "cpu"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,  # its own group: the signal reaches exactly this worker
        )


def _mean_epoch_s(trials: list[FrozenTrial]) -> float:
    """Median seconds per epoch of the trials that ran start to end uninterrupted (the
    bench interrupts nothing until one has)."""
    rates = [
        (t.datetime_complete - t.datetime_start).total_seconds() / len(t.intermediate_values)
        for t in trials
        if t.state == TrialState.COMPLETE
        and RETRY_OF_ATTR not in t.user_attrs
        and t.datetime_start
        and t.datetime_complete
        and t.intermediate_values
    ]
    if not rates:
        raise RuntimeError("no uninterrupted trial to time an epoch by")
    return statistics.median(rates)


def analyse(
    cuts: list[Interruption],
    trials: list[FrozenTrial],
    claimed: dict[int, float],
    given_back: dict[int, float],
) -> float:
    """Fill each interruption's figures in; returns the mean epoch time used (s)."""
    epoch_s = _mean_epoch_s(trials)
    by_number = {t.number: t for t in trials}
    retry_of: dict[int, FrozenTrial] = {}
    for t in sorted(trials, key=lambda t: t.number):  # a lost trial's first retry
        if RETRY_OF_ATTR in t.user_attrs:
            retry_of.setdefault(int(t.user_attrs[RETRY_OF_ATTR]), t)
    for cut in cuts:
        attempt = by_number[cut.trial_number]
        retry = retry_of.get(cut.trial_number)
        # A retry itself interrupted while it started (before it resumed or trained an
        # epoch) passes the same checkpoint on: the chain's next attempt shows what it kept.
        while (
            retry is not None
            and RESUMED_FROM_ATTR not in retry.user_attrs
            and not retry.intermediate_values
            and retry.number in retry_of
        ):
            retry = retry_of[retry.number]
        if retry is None:
            continue  # interrupted as the study ended: nothing retried it
        completed = len(attempt.intermediate_values)  # the chain's epochs, inherited included
        resumed_at = int(retry.user_attrs.get(RESUMED_FROM_ATTR, 0))
        assert attempt.datetime_start is not None and attempt.datetime_complete is not None
        stop = cut.at if cut.kind == "SIGKILL" else attempt.datetime_complete.timestamp()
        cut.stopped_at = stop
        # Trained after the last checkpoint: since that checkpoint, or since this attempt
        # started when it wrote none itself (its start-up is not training).
        since = attempt.datetime_start.timestamp()
        if cut.last_checkpoint_at is not None:
            since = max(since, cut.last_checkpoint_at)
        partial = min(max(0.0, stop - since) / epoch_s, 1.0)  # at most the epoch it was in
        cut.lost_epochs_resumed = max(0, completed - resumed_at) + partial
        cut.lost_epochs_scratch = completed + partial
        if retry.number in claimed:
            cut.retry_started_after_s = max(0.0, claimed[retry.number] - stop)
        if cut.trial_number in given_back:
            cut.requeued_after_s = max(0.0, given_back[cut.trial_number] - stop)
    return epoch_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--interval", type=positive_float, default=10.0, help="seconds between interruptions"
    )
    parser.add_argument("--trials", type=positive_int, default=6)
    parser.add_argument("--epochs", type=positive_int, default=12)
    parser.add_argument("--grace", type=float, default=20.0, help="LSTM_HPO_PREEMPT_GRACE_S")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "preemption")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.update(
        LSTM_HPO_HEARTBEAT_INTERVAL_S=str(HEARTBEAT_INTERVAL_S),
        LSTM_HPO_HEARTBEAT_GRACE_S=str(HEARTBEAT_GRACE_S),
        LSTM_HPO_REAPER_INTERVAL_S="1",
        LSTM_HPO_POLL_INTERVAL_S="0.2",
        LSTM_HPO_PREEMPT_GRACE_S=str(args.grace),
        LSTM_HPO_TORCH_THREADS="1",
    )
    with tempfile.TemporaryDirectory(prefix="lstm-hpo-bench-") as tmp:
        data_dir = Path(tmp)
        log = args.out / "serve.log"
        log.unlink(missing_ok=True)
        with running_server(data_dir, 0, log=log) as server:
            env = {
                **os.environ,
                "LSTM_HPO_DATA_DIR": str(data_dir),
                "LSTM_HPO_DATABASE_URL": server.storage_url,
            }
            groups = [_worker_group(env, log) for _ in range(2)]
            study = server.client.submit(spec(args.trials, args.epochs))
            engine = make_engine(server.storage_url)
            sessions = make_session_factory(engine)
            store = open_artifact_store(None, data_dir)
            cuts: list[Interruption] = []
            # Nothing is interrupted until one trial has run uninterrupted: it times an epoch.
            next_cut = float("inf")
            try:
                while server.client.get(study.id).state in ("queued", "running"):
                    time.sleep(0.2)
                    if next_cut == float("inf") and _one_complete(server, study.optuna_study_name):
                        next_cut = time.monotonic()
                    if time.monotonic() < next_cut:
                        continue
                    running = [
                        lease
                        for lease in list_leases(sessions, study.id, state="running")
                        if lease.trial_number is not None
                    ]
                    if not running:
                        continue
                    lease = running[0]
                    assert lease.trial_number is not None
                    pid = int(lease.worker_id.rsplit(":", 2)[1])
                    [group] = [g for g in groups if g.poll() is None and os.getpgid(pid) == g.pid]
                    kind = "SIGTERM" if len(cuts) % 2 == 0 else "SIGKILL"
                    cut = Interruption(kind, time.time(), lease.trial_number)
                    if kind == "SIGTERM":
                        os.kill(group.pid, signal.SIGTERM)  # the supervisor forwards it
                        group.wait(timeout=args.grace + 60)
                    else:
                        os.killpg(group.pid, signal.SIGKILL)
                        group.wait(timeout=30)
                    original = _original(
                        server.storage_url, study.optuna_study_name, lease.trial_number
                    )
                    path = data_dir / "artifacts" / store.artifact_id(study.id, original, "last")
                    cut.last_checkpoint_at = path.stat().st_mtime if path.exists() else None
                    cuts.append(cut)
                    print(
                        f"{kind} trial {lease.trial_number} at {datetime.now():%H:%M:%S}",
                        flush=True,
                    )
                    groups.remove(group)
                    groups.append(_worker_group(env, log))
                    next_cut = time.monotonic() + args.interval
            finally:
                for group in groups:
                    if group.poll() is None:
                        os.killpg(group.pid, signal.SIGTERM)
                for group in groups:
                    group.wait(timeout=120)
            storage = optuna.storages.RDBStorage(server.storage_url)
            trials = optuna.load_study(
                study_name=study.optuna_study_name, storage=storage
            ).get_trials(deepcopy=False)
            claimed: dict[int, float] = {}
            given_back: dict[int, float] = {}
            for x in list_leases(sessions, study.id):
                if x.trial_number is not None:
                    claimed[x.trial_number] = x.claimed_at.timestamp()
                    if x.finished_at is not None:
                        given_back[x.trial_number] = x.finished_at.timestamp()
            engine.dispose()
            epoch_s = analyse(cuts, trials, claimed, given_back)
    _report(cuts, epoch_s, args)
    return 0


def _one_complete(server: Server, study_name: str) -> bool:
    study = optuna.load_study(study_name=study_name, storage=server.storage_url)
    return any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


def _original(storage_url: str, study_name: str, number: int) -> int:
    """The number of the first trial of ``number``'s retry chain (its checkpoints' key)."""
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    return int(trial.user_attrs.get("original_trial", number))


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.mean(present), 3) if present else None


def _report(cuts: list[Interruption], epoch_s: float, args: argparse.Namespace) -> None:
    rows = []
    for kind in ("SIGTERM", "SIGKILL"):
        done = [c for c in cuts if c.kind == kind and c.lost_epochs_resumed is not None]
        if not done:
            continue
        resumed = _mean([c.lost_epochs_resumed for c in done]) or 0.0
        scratch = _mean([c.lost_epochs_scratch for c in done]) or 0.0
        rows.append(
            {
                "kind": kind,
                "n": len(done),
                "lost_epochs_resumed_mean": resumed,
                "lost_epochs_resumed_max": round(
                    max(c.lost_epochs_resumed or 0.0 for c in done), 3
                ),
                "lost_epochs_scratch_mean": scratch,
                "scratch_over_resumed": round(scratch / resumed, 1) if resumed > 0 else None,
                "requeued_after_s_mean": _mean([c.requeued_after_s for c in done]),
                "retry_started_after_s_mean": _mean([c.retry_started_after_s for c in done]),
            }
        )
    result = {
        "command": "python -m bench.preemption " + " ".join(sys.argv[1:]),
        "machine": asdict(Machine.describe()),
        "commit": git_commit(),
        "date": datetime.now().isoformat(timespec="seconds"),
        "epoch_s": round(epoch_s, 3),
        "heartbeat_grace_s": HEARTBEAT_GRACE_S,
        "preempt_grace_s": args.grace,
        "summary": rows,
        "interruptions": [asdict(c) for c in cuts],
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(
        f"\nmean epoch {epoch_s:.2f} s; heartbeat grace {HEARTBEAT_GRACE_S:g} s; "
        f"preempt grace {args.grace:g} s"
    )
    header = ("", "n", "lost/resume", "max", "lost/scratch", "ratio", "requeued", "retry")
    print("{:<9}{:>3}{:>13}{:>7}{:>14}{:>7}{:>10}{:>8}".format(*header))
    for r in rows:
        ratio = "-" if r["scratch_over_resumed"] is None else f"{r['scratch_over_resumed']}x"
        print(
            f"{r['kind']:<9}{r['n']:>3}{r['lost_epochs_resumed_mean']:>10.2f} ep"
            f"{r['lost_epochs_resumed_max']:>7.2f}{r['lost_epochs_scratch_mean']:>11.2f} ep"
            f"{ratio:>7}{r['requeued_after_s_mean'] or 0:>8.1f} s"
            f"{r['retry_started_after_s_mean'] or 0:>6.1f} s"
        )


if __name__ == "__main__":
    sys.exit(main())
