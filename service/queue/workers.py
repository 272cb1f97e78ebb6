"""The registry of worker processes: register, heartbeat, list."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.models import Worker
from service.queue._plumbing import resolve_now, transact
from service.queue._records import SessionSource, WorkerRecord, worker_record


def register_worker(
    sm: SessionSource,
    *,
    worker_id: str,
    hostname: str,
    pid: int,
    device: str | None = None,
    now: datetime | None = None,
) -> WorkerRecord:
    """Insert (or refresh) the row of a starting worker process (``device``: what it trains
    on, e.g. ``gpu 0`` or ``cpu``)."""
    at = resolve_now(now)

    def work(session: Session) -> WorkerRecord:
        worker = session.get(Worker, worker_id)
        if worker is None:
            worker = Worker(id=worker_id, hostname=hostname, pid=pid, device=device, started_at=at)
            session.add(worker)
        else:
            worker.hostname, worker.pid, worker.started_at = hostname, pid, at
            worker.device = device
        worker.heartbeat_at = at
        session.flush()
        return worker_record(worker)

    return transact(sm, work)


def worker_heartbeat(sm: SessionSource, worker_id: str, now: datetime | None = None) -> bool:
    """Mark a worker alive; False if it is not registered (it should register again)."""
    at = resolve_now(now)

    def work(session: Session) -> bool:
        alive = session.scalars(
            update(Worker)
            .where(Worker.id == worker_id)
            .values(heartbeat_at=at)
            .returning(Worker.id)
            .execution_options(synchronize_session=False)
        ).all()
        return bool(alive)

    return transact(sm, work)


def list_workers(sm: SessionSource, *, seen_since: datetime | None = None) -> list[WorkerRecord]:
    """Registered workers (only those that heartbeated at or after ``seen_since``)."""

    def work(session: Session) -> list[WorkerRecord]:
        query = select(Worker).order_by(Worker.started_at, Worker.id)
        if seen_since is not None:
            query = query.where(Worker.heartbeat_at >= seen_since)
        return [worker_record(worker) for worker in session.scalars(query).all()]

    return transact(sm, work)
