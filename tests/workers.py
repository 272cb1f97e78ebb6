"""A real worker loop run in the test's own process (a thread of it, or the main one)."""

from __future__ import annotations

from pathlib import Path

from service.worker import Worker, WorkerOptions


def run_worker_until_idle(
    database_url: str, idle_exit_s: float = 0.0, data_roots: tuple[Path, ...] | None = None
) -> None:
    """Claim and run trials until none was left to claim for ``idle_exit_s``, then close
    the worker's connections (its database and its Optuna storage). ``data_roots``: where
    it looks up relative data paths (``LSTM_HPO_DATA_ROOTS``; the server's datasets/)."""
    options = WorkerOptions(
        database_url=database_url,
        poll_interval_s=0.05,
        idle_exit_s=idle_exit_s,
        data_roots=data_roots,
    )
    worker = Worker(options)
    try:
        worker.run()
    finally:
        worker.engine.dispose()
        if worker.storage is not None:
            worker.storage.engine.dispose()
