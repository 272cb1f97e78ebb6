"""A real worker loop run in the test's own process (a thread of it, or the main one)."""

from __future__ import annotations

from service.worker import Worker, WorkerOptions


def run_worker_until_idle(database_url: str, idle_exit_s: float = 0.0) -> None:
    """Claim and run trials until none was left to claim for ``idle_exit_s``, then close
    the worker's connections (its database and its Optuna storage)."""
    options = WorkerOptions(
        database_url=database_url, poll_interval_s=0.05, idle_exit_s=idle_exit_s
    )
    worker = Worker(options)
    try:
        worker.run()
    finally:
        worker.engine.dispose()
        if worker.storage is not None:
            worker.storage.engine.dispose()
