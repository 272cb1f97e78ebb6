"""Kill tests: real server and worker processes, ``kill -9`` (never a polite shutdown), on
SQLite and PostgreSQL. Each ends by reading the database back: zero lost and zero
duplicated trials, exactly ``n_trials`` finished, nothing RUNNING.

Timings (kill -> FAIL) are printed; run with ``-rP`` to see them.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import optuna
import pytest
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState, create_trial
from sqlalchemy import func, select

from service import queue, reaper, studies
from service.auth import LOCAL
from service.db import session_scope
from service.errors import LeaseLost
from service.models import JobState, LeaseState, SearchJob
from service.search_space import SpecLimits, parse_spec
from service.states import FAILURE_ATTR, RETRY_OF_ATTR
from tests.fault.conftest import (
    HEARTBEAT_GRACE_S,
    REAP_SLACK_S,
    REAPER_INTERVAL_S,
    Cluster,
    Database,
    LeaseRow,
    assert_study_finished_exactly,
    failure_reason,
    is_finite,
    live_group_members,
    synthetic_spec,
    wait_until,
    worker_pid,
)

#: Longest a reaped trial may take to be failed after its worker died.
REAP_DEADLINE_S = HEARTBEAT_GRACE_S + REAPER_INTERVAL_S + REAP_SLACK_S
#: Bound on any wait for a study to finish (they take seconds; this only catches hangs).
STUDY_TIMEOUT_S = 90.0


def _job_ended(db: Database, job_id: str) -> bool:
    return not JobState(db.job(job_id).state).is_active


def _wait_job_ended(cluster: Cluster, db: Database, job_id: str) -> None:
    wait_until(
        lambda: _job_ended(db, job_id),
        timeout_s=STUDY_TIMEOUT_S,
        what=f"study {job_id} to end",
        interval_s=0.2,
        context=cluster.logs,
    )


def _reaped(db: Database, lease: LeaseRow) -> bool:
    """The lease was taken back AND its Optuna trial is FAIL (the reaper's whole round)."""
    [now] = [row for row in db.leases(lease.job_id) if row.id == lease.id]
    if lease.optuna_trial_id is None:  # died between claim and ask: nothing in Optuna
        return now.state == LeaseState.REAPED
    trial = db.trial(lease.optuna_trial_id)
    return now.state == LeaseState.REAPED and trial.state == TrialState.FAIL


def _assert_reaped_in_time(db: Database, victim: LeaseRow) -> LeaseRow:
    """The reaped lease as stored: the reason is right, and it was reaped no sooner than
    grace after its last heartbeat and no later than grace + one reaper interval (+ slack)."""
    [row] = [row for row in db.leases(victim.job_id) if row.id == victim.id]
    assert row.state == LeaseState.REAPED and row.failure_reason == queue.REAPED_REASON
    assert row.finished_at is not None
    silent = (row.finished_at - row.heartbeat_at).total_seconds()
    assert HEARTBEAT_GRACE_S <= silent <= REAP_DEADLINE_S, silent
    if row.optuna_trial_id is None:
        return row
    trial = db.trial(row.optuna_trial_id)
    assert trial.state == TrialState.FAIL
    assert failure_reason(trial) == queue.REAPED_REASON
    return row


def _retries_of(trials: list[FrozenTrial], number: int) -> list[FrozenTrial]:
    return [t for t in trials if t.user_attrs.get(RETRY_OF_ATTR) == number]


# ---------------------------------------------------------------------------------------
# 1. kill -9 one worker mid-trial


def test_kill_one_worker_mid_trial_fails_and_retries_that_trial(
    cluster: Cluster, fault_db: Database
) -> None:
    cluster.start_server(wait=False)
    cluster.start_workers(2)
    cluster.wait_for_server()
    n_trials = 5
    job_id = cluster.submit(synthetic_spec(n_trials, sleep_s=1.6, name="kill-one"))

    first = wait_until(
        lambda: fault_db.running_leases(job_id),
        timeout_s=60,
        what="a running trial",
        context=cluster.logs,
    )[0]
    time.sleep(0.4)  # mid-trial: it has been training a while (it reports at 0.8 s)
    [victim] = [lease for lease in fault_db.running_leases(job_id) if lease.id == first.id]
    assert victim.optuna_trial_id is not None and victim.trial_number is not None
    victim_params = fault_db.trial(victim.optuna_trial_id).params
    killed_at = time.monotonic()
    cluster.kill_worker_process(worker_pid(victim.worker_id))

    wait_until(
        lambda: _reaped(fault_db, victim),
        timeout_s=REAP_DEADLINE_S + 10,
        what="the dead worker's trial to be reaped",
        context=cluster.logs,
    )
    kill_to_fail_s = time.monotonic() - killed_at
    print(f"kill -9 one worker -> trial FAIL in {kill_to_fail_s:.2f}s (bound {REAP_DEADLINE_S}s)")
    assert kill_to_fail_s <= REAP_DEADLINE_S
    _assert_reaped_in_time(fault_db, victim)

    _wait_job_ended(cluster, fault_db, job_id)
    trials = assert_study_finished_exactly(fault_db, job_id)
    # Only the dead worker's trial was lost, and it was run again once with its params.
    assert len(trials) == n_trials + 1
    [retry] = _retries_of(trials, victim.trial_number)
    assert retry.params == victim_params and retry.state == TrialState.COMPLETE
    states = Counter(t.state for t in trials)
    assert states == {TrialState.COMPLETE: n_trials, TrialState.FAIL: 1}, states
    leases = fault_db.leases(job_id)
    [retry_lease] = [lease for lease in leases if lease.retry_of == victim.id]
    assert retry_lease.attempt == 1 and retry_lease.state == LeaseState.COMPLETE
    assert Counter(lease.state for lease in leases) == {
        LeaseState.COMPLETE: n_trials,
        LeaseState.REAPED: 1,
    }


# ---------------------------------------------------------------------------------------
# 2. kill -9 every worker: the server's reaper alone cleans up


def test_kill_all_workers_server_reaper_fails_their_trials_and_new_workers_finish(
    cluster: Cluster, fault_db: Database
) -> None:
    cluster.start_server(wait=False)
    group = cluster.start_workers(2)
    cluster.wait_for_server()
    n_trials = 4
    job_id = cluster.submit(synthetic_spec(n_trials, sleep_s=1.6, name="kill-all"))

    wait_until(
        lambda: len(fault_db.running_leases(job_id)) == 2,
        timeout_s=60,
        what="both workers training",
        context=cluster.logs,
    )
    time.sleep(0.3)  # mid-trial
    killed_at = time.monotonic()
    cluster.kill_workers(group)
    assert not live_group_members(group.pid)
    # What the dead workers held, frozen now that nobody but the reaper can change it.
    leases_at_kill = fault_db.leases(job_id)
    victims = [lease for lease in leases_at_kill if lease.state == LeaseState.RUNNING]
    assert victims
    # Normally both hold a trial; one that died between its claim and Optuna's ask has none.
    with_trial = [v for v in victims if v.optuna_trial_id is not None]
    params = {v.id: fault_db.trial(v.optuna_trial_id or -1).params for v in with_trial}

    wait_until(
        lambda: all(_reaped(fault_db, v) for v in victims),
        timeout_s=REAP_DEADLINE_S + 10,
        what="the server's reaper to fail the dead workers' trials",
        context=cluster.logs,
    )
    kill_to_fail_s = time.monotonic() - killed_at
    print(
        f"kill -9 all workers -> their {len(victims)} trials FAIL in {kill_to_fail_s:.2f}s "
        f"(bound {REAP_DEADLINE_S}s)"
    )
    assert kill_to_fail_s <= REAP_DEADLINE_S
    # No worker was alive: this was the server's reaper, and nobody claimed anything since.
    assert not live_group_members(group.pid)
    for victim in victims:
        row = _assert_reaped_in_time(fault_db, victim)
        assert row.retry_pending  # claimable again, waiting for a worker
    leases = fault_db.leases(job_id)
    assert [lease.id for lease in leases] == [lease.id for lease in leases_at_kill]
    n_done = sum(1 for lease in leases if lease.state != LeaseState.REAPED)
    job = fault_db.job(job_id)
    assert job.state == JobState.RUNNING and job.n_running == 0 and job.n_finished == n_done
    # The retry is enqueued just after the queue takes the slot back: wait for it too.
    wait_until(
        lambda: fault_db.trial_states(job.optuna_study_name)["WAITING"] >= len(with_trial),
        timeout_s=10,
        what="the retries to be enqueued",
        context=cluster.logs,
    )
    trials = fault_db.trials(job.optuna_study_name)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs[RETRY_OF_ATTR] for t in waiting) == sorted(
        v.trial_number or 0 for v in with_trial
    )

    cluster.start_workers(2)
    _wait_job_ended(cluster, fault_db, job_id)
    trials = assert_study_finished_exactly(fault_db, job_id)
    assert len(trials) == n_trials + len(with_trial)
    for victim in with_trial:
        assert victim.trial_number is not None
        [retry] = _retries_of(trials, victim.trial_number)
        assert retry.params == params[victim.id] and retry.state == TrialState.COMPLETE
    retry_leases = [lease for lease in fault_db.leases(job_id) if lease.retry_of is not None]
    assert sorted(lease.retry_of or 0 for lease in retry_leases) == sorted(v.id for v in victims)
    assert all(lease.attempt == 1 for lease in retry_leases)


# ---------------------------------------------------------------------------------------
# 2b. kill -9 a worker and the server; idle workers are woken by the retry's NOTIFY


def _published_params(fault_db: Database, trial_id: int, cluster: Cluster) -> dict[str, Any]:
    """The running trial's parameters, once its worker has published its set-up (the
    lease is attached a few ms before: the worker samples in between)."""
    params: dict[str, Any] = wait_until(
        lambda: fault_db.trial(trial_id).params or None,
        timeout_s=30,
        what=f"trial {trial_id}'s parameters",
        context=cluster.logs,
    )
    return params


def test_idle_workers_woken_by_a_retry_run_the_lost_trial_and_nothing_else(
    cluster: Cluster, fault_db: Database
) -> None:
    """The retry race (shared/cases): every slot is taken, so the other workers idle in
    LISTEN when the restarted server's reaper queues the retry and NOTIFYs them. The woken
    worker must run the lost trial's parameters (popping exactly its WAITING copy), never
    ask a fresh trial, and nothing may stay WAITING. Idle workers must keep beating."""
    cluster.start_server(wait=False)
    cluster.start_workers(2)
    cluster.wait_for_server()
    n_trials = 2  # both slots taken: a third worker has nothing to claim, it LISTENs
    job_id = cluster.submit(synthetic_spec(n_trials, sleep_s=3.0, name="retry-race"))
    wait_until(
        lambda: len(fault_db.running_leases(job_id)) == 2,
        timeout_s=60,
        what="both workers training",
        context=cluster.logs,
    )
    victim = fault_db.running_leases(job_id)[0]
    assert victim.optuna_trial_id is not None and victim.trial_number is not None
    victim_params = _published_params(fault_db, victim.optuna_trial_id, cluster)
    cluster.kill_worker_process(worker_pid(victim.worker_id))
    cluster.kill_server()
    cluster.start_workers(1)  # idle: nothing claimable until the retry is queued
    time.sleep(1.0)
    cluster.start_server()

    _wait_job_ended(cluster, fault_db, job_id)
    trials = assert_study_finished_exactly(fault_db, job_id)
    [retry] = _retries_of(trials, victim.trial_number)
    assert retry.params == victim_params and retry.state == TrialState.COMPLETE
    assert len(trials) == n_trials + 1, [(t.number, t.state.name) for t in trials]
    [retry_lease] = [lease for lease in fault_db.leases(job_id) if lease.retry_of == victim.id]
    assert retry_lease.trial_number == retry.number and retry_lease.attempt == 1
    logs = cluster.logs(tail=200_000)
    assert "heartbeat failed" not in logs and "QueuePool limit" not in logs, logs[-3000:]


# ---------------------------------------------------------------------------------------
# 3. kill -9 the server during a burst of submits and while trials run


def test_kill_server_during_submit_burst_creates_nothing_twice(
    cluster: Cluster, fault_db: Database
) -> None:
    cluster.start_server(wait=False)
    cluster.start_workers(2)
    cluster.wait_for_server()
    long_id = cluster.submit(synthetic_spec(4, sleep_s=1.5, name="long"))
    wait_until(
        lambda: len(fault_db.running_leases(long_id)) == 2,
        timeout_s=60,
        what="both workers training",
        context=cluster.logs,
    )

    keys = [f"burst-{thread}-{i}" for thread in range(3) for i in range(4)]
    spec = synthetic_spec(2, sleep_s=0.1, name="burst")
    acked: dict[str, tuple[int, str, float]] = {}  # key -> (status, study id, when)
    transport_errors = Counter[str]()
    problems: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 60

    def submit_until_acknowledged(key: str, http: httpx.Client) -> None:
        # Retries are bounded by the deadline; a 5xx or a dropped connection is retried
        # with the same key, which is exactly what the header is for.
        while time.monotonic() < deadline:
            try:
                response = http.post("/v1/studies", json=spec, headers={"Idempotency-Key": key})
            except httpx.TransportError as err:
                with lock:
                    transport_errors[type(err).__name__] += 1
                time.sleep(0.05)
                continue
            if response.status_code in (200, 201):
                with lock:
                    acked[key] = (response.status_code, response.json()["id"], time.monotonic())
                return
            if response.status_code < 500:
                with lock:
                    problems.append(f"{key}: {response.status_code} {response.text}")
                return
            time.sleep(0.05)
        with lock:
            problems.append(f"{key}: never acknowledged")

    def client(thread_keys: list[str]) -> None:
        with httpx.Client(base_url=cluster.url, timeout=5) as http:
            for key in thread_keys:
                submit_until_acknowledged(key, http)
                # Paced, so the burst (~1 s) surely spans the kill even on a quiet machine.
                time.sleep(0.2)

    threads = [
        threading.Thread(target=client, args=(keys[i * 4 : i * 4 + 4],), daemon=True)
        for i in range(3)
    ]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(acked) >= 2, timeout_s=30, what="the first submits")
    running_at_kill = fault_db.running_leases()
    killed_at = time.monotonic()
    killed_wall = datetime.now(UTC)
    cluster.kill_server()
    acked_before_kill = len(acked)
    time.sleep(0.5)  # clients meet a dead port for a while
    cluster.start_server()
    restarted_wall = datetime.now(UTC)
    print(
        f"server down {time.monotonic() - killed_at:.2f}s; {acked_before_kill}/{len(keys)} "
        f"submits acknowledged before the kill; transport errors {dict(transport_errors)}"
    )
    for thread in threads:
        thread.join(timeout=70)
        assert not thread.is_alive()

    assert not problems, problems
    assert sorted(acked) == sorted(keys)
    assert acked_before_kill < len(keys)  # the burst spanned the kill ...
    assert sum(transport_errors.values()) >= 1  # ... and clients had to retry through it
    assert running_at_kill, "no trial was running when the server was killed"

    # Every key maps to exactly one job row and one Optuna study: nothing created twice.
    with session_scope(fault_db.sessions) as session:
        per_key = dict(
            session.execute(
                select(SearchJob.idempotency_key, func.count())
                .where(SearchJob.idempotency_key.is_not(None))
                .group_by(SearchJob.idempotency_key)
            ).all()
        )
        n_rows = session.scalar(select(func.count()).select_from(SearchJob))
    assert per_key == {key: 1 for key in keys}
    assert n_rows == len(keys) + 1
    jobs = fault_db.jobs()
    by_key = {job.idempotency_key: job for job in jobs}
    assert all(acked[key][1] == by_key[key].id for key in keys)
    names = fault_db.optuna_study_names()
    assert sorted(names) == sorted(job.optuna_study_name for job in jobs)
    # A retry after everything settled still answers 200 with the same study.
    with cluster.http() as http:
        for key in keys[:3]:
            again = http.post("/v1/studies", json=spec, headers={"Idempotency-Key": key})
            assert again.status_code == 200 and again.json()["id"] == by_key[key].id
    with session_scope(fault_db.sessions) as session:
        assert session.scalar(select(func.count()).select_from(SearchJob)) == len(keys) + 1

    # Queued and running studies survived the kill and finish exactly.
    for job in jobs:
        _wait_job_ended(cluster, fault_db, job.id)
        assert_study_finished_exactly(fault_db, job.id)
    # The workers never depended on the server: trials finished while it was down.
    during_outage = [
        lease
        for lease in fault_db.leases()
        if lease.finished_at is not None and killed_wall <= lease.finished_at <= restarted_wall
    ]
    print(f"{len(during_outage)} trials finished while the server was down")
    assert during_outage
    assert not [lease for lease in fault_db.leases() if lease.state == LeaseState.REAPED]


# ---------------------------------------------------------------------------------------
# 4. GET /best while trials run


def _decoys(db: Database, study_name: str, spec: dict[str, Any]) -> frozenset[int]:
    """Trials no worker would write, added through Optuna's storage, that must never win:
    a COMPLETE one with value -inf, PRUNED and FAIL ones with a better value than any real
    trial, and a RUNNING one with a better intermediate value. Returns their numbers."""
    space = spec["space"]
    distributions: dict[str, BaseDistribution] = {
        "num_layers": CategoricalDistribution(space["num_layers"]["choices"]),
        "hidden_size": IntDistribution(8, 256, log=True),
        "lr": FloatDistribution(1e-4, 1e-1, log=True),
    }
    params = {"num_layers": 2, "hidden_size": 128, "lr": 3e-3}
    storage = db.storage
    study = optuna.load_study(study_name=study_name, storage=storage)
    study.add_trial(
        create_trial(
            state=TrialState.COMPLETE,
            value=float("-inf"),
            params=params,
            distributions=distributions,
            user_attrs={"decoy": "complete -inf"},
        )
    )
    # By its mark, not as the last trial: a worker may have created one since (a race
    # that once counted a real FAIL as the decoy and the decoy as a real COMPLETE).
    numbers = {t.number for t in study.get_trials() if t.user_attrs.get("decoy") == "complete -inf"}
    assert len(numbers) == 1, numbers
    for state in (TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING):
        template = create_trial(
            state=TrialState.RUNNING,
            params=params,
            distributions=distributions,
            user_attrs={"decoy": state.name},
            intermediate_values={0: -1e9},
        )
        trial_id = storage.create_new_trial(study._study_id, template_trial=template)
        if state != TrialState.RUNNING:
            assert storage.set_trial_state_values(trial_id, state, [-1e9])
        numbers.add(storage.get_trial(trial_id).number)
    return frozenset(numbers)


def test_best_while_trials_run_is_only_ever_a_finite_complete_trial(
    cluster: Cluster, fault_db: Database
) -> None:
    started = time.monotonic()
    cluster.start_server(wait=False)
    cluster.start_workers(2)
    cluster.wait_for_server()
    spec = synthetic_spec(
        12, sleep_s=0.6, name="best-live", max_epochs=3, nan_when={"num_layers": 3}
    )
    spec["space"]["num_layers"] = {"type": "categorical", "choices": [1, 2, 3]}
    spec["study"]["pruner"] = "median"
    job_id = cluster.submit(spec)
    study_name = fault_db.job(job_id).optuna_study_name
    decoys = _decoys(fault_db, study_name, spec)
    print(f"server up and study submitted {time.monotonic() - started:.1f}s after start")

    def finite_complete() -> dict[int, float]:
        return {
            t.number: t.value
            for t in fault_db.trials(study_name)
            if t.state == TrialState.COMPLETE
            and t.number not in decoys
            and t.value is not None
            and is_finite(t.value)
        }

    polls = answered_while_running = 0
    with cluster.http() as http:
        while not _job_ended(fault_db, job_id):
            polls += 1
            assert polls <= 2000, "study never ended"
            before = finite_complete()
            response = http.get(f"/v1/studies/{job_id}/best")
            after = finite_complete()
            if response.status_code == 409:
                assert not before, before  # 409 only while no real trial has completed
                continue
            assert response.status_code == 200, response.text
            best = response.json()
            # The winner is a COMPLETE real trial with a finite value (read back), never a
            # decoy, RUNNING, PRUNED or FAIL one, and the best of those completed so far.
            assert best["trial_number"] in after, (best, after)
            assert best["value"] == after[best["trial_number"]]
            assert min(after.values()) <= best["value"]
            if before:
                assert best["value"] <= min(before.values())
            if fault_db.running_leases(job_id):
                answered_while_running += 1
            if polls % 5 == 0:
                top = http.get(f"/v1/studies/{job_id}/best", params={"k": 50}).json()
                assert all(b["trial_number"] in finite_complete() for b in top), top
                values = [b["value"] for b in top]
                assert values == sorted(values)
            time.sleep(0.05)  # leave the two cores to the workers
    print(
        f"/best polled {polls} times, {answered_while_running} answers while trials ran; "
        f"study ended {time.monotonic() - started:.1f}s after the processes started"
    )
    assert answered_while_running >= 3

    trials = assert_study_finished_exactly(fault_db, job_id, ignore_numbers=decoys)
    states = Counter(t.state for t in trials)
    nan_trials = [t for t in trials if t.params["num_layers"] == 3]
    assert nan_trials, "no trial hit nan_when; change the seed"
    for t in nan_trials:
        # A NaN metric never becomes a value, and is never PRUNED (the median pruner
        # prunes NaN intermediate values): the trial FAILs with the reason.
        assert t.state == TrialState.FAIL and t.value is None, t
        assert "metric is nan" in (failure_reason(t) or ""), t.user_attrs
    print(f"real trials: {dict((s.name, n) for s, n in states.items())}; decoys {sorted(decoys)}")
    with cluster.http() as http:
        final = http.get(f"/v1/studies/{job_id}/best").json()
    done = finite_complete()
    assert final["value"] == min(done.values())
    assert final["trial_number"] in done and final["trial_number"] not in decoys


# ---------------------------------------------------------------------------------------
# 5. the reaper's race: a worker told Optuna its result, then died before finishing its slot


def _open_backend(db_url: str) -> studies.Backend:
    # As the server does: Optuna's tables (its storage creates them), then ours.
    from service.migrate import upgrade_schema

    storage = studies.optuna_storage(db_url)
    upgrade_schema(db_url)
    return studies.open_backend(
        db_url, limits=SpecLimits(), base_url="http://test", storage=storage
    )


def _start_trial(
    backend: studies.Backend, worker_id: str
) -> tuple[queue.Lease, optuna.Study, optuna.Trial]:
    """What a worker does before training: claim a slot, ask Optuna, attach the trial."""
    lease = queue.claim_trial_slot(backend.sessions, worker_id)
    assert lease is not None
    study = optuna.load_study(study_name=lease.optuna_study_name, storage=backend.storage)
    trial = study.ask()
    queue.attach_trial(
        backend.sessions, lease.id, optuna_trial_id=trial._trial_id, trial_number=trial.number
    )
    return lease, study, trial


def test_reaper_counts_a_told_result_whose_worker_died_before_finishing_its_slot(
    db_url: str,
) -> None:
    backend = _open_backend(db_url)
    db = Database(db_url)
    try:
        spec = parse_spec(synthetic_spec(4, sleep_s=0.0, name="race"))
        study_public, _ = studies.submit_study(backend, spec, principal=LOCAL)
        job_id = study_public.id
        complete_lease, study, complete = _start_trial(backend, "host:1:a")
        pruned_lease, _, pruned = _start_trial(backend, "host:2:b")
        failed_lease, _, failed = _start_trial(backend, "host:3:c")
        dead_lease, _, dead = _start_trial(backend, "host:4:d")
        # Each worker tells Optuna and dies before queue.finish_trial_slot; the fourth dies
        # mid-training. Nobody heartbeats again.
        study.tell(complete, 0.25)
        pruned.report(1.0, step=0)
        study.tell(pruned, state=TrialState.PRUNED)
        failed.set_user_attr(FAILURE_ATTR, "RuntimeError: boom")
        study.tell(failed, state=TrialState.FAIL)

        later = datetime.now(UTC) + timedelta(hours=1)
        reaped = reaper.reap_once(backend, grace_s=60, now=later)

        # Only the trial that was really lost is reaped and retried.
        assert [(s.id, s.retry) for s in reaped] == [(dead_lease.id, True)]
        leases = {lease.id: lease for lease in db.leases(job_id)}
        assert leases[complete_lease.id].state == LeaseState.COMPLETE
        assert leases[pruned_lease.id].state == LeaseState.PRUNED
        assert leases[failed_lease.id].state == LeaseState.FAILED
        assert leases[failed_lease.id].failure_reason == "RuntimeError: boom"
        assert leases[dead_lease.id].state == LeaseState.REAPED
        assert leases[dead_lease.id].retry_pending
        assert not any(leases[i].retry_pending for i in leases if i != dead_lease.id)
        job = db.job(job_id)
        assert (job.state, job.n_running, job.n_finished, job.n_complete) == (
            JobState.RUNNING,
            0,
            3,
            1,
        )
        by_number = {t.number: t for t in db.trials(job.optuna_study_name)}
        assert by_number[complete.number].state == TrialState.COMPLETE
        assert by_number[complete.number].value == 0.25
        assert FAILURE_ATTR not in by_number[complete.number].user_attrs
        assert by_number[pruned.number].state == TrialState.PRUNED
        assert failure_reason(by_number[failed.number]) == "RuntimeError: boom"
        assert by_number[dead.number].state == TrialState.FAIL
        assert failure_reason(by_number[dead.number]) == queue.REAPED_REASON
        [waiting] = [t for t in by_number.values() if t.state == TrialState.WAITING]
        assert waiting.user_attrs[RETRY_OF_ATTR] == dead.number
        assert waiting.params == by_number[dead.number].params

        # Results arriving late change nothing: the slot was counted, or reaped. The same
        # outcome again is an idempotent no-op (a worker retrying its finish after a lost
        # reply); a different one is rejected.
        queue.finish_trial_slot(backend.sessions, complete_lease.id, "complete")
        assert db.job(job_id).n_finished == 3
        with pytest.raises(LeaseLost):
            queue.finish_trial_slot(backend.sessions, complete_lease.id, "failed")
        with pytest.raises(ValueError, match="Cannot tell a FAIL trial"):
            study.tell(dead, 0.1)
        with pytest.raises(LeaseLost):
            queue.finish_trial_slot(backend.sessions, dead_lease.id, "complete")
        # Another round finds nothing more to do (no second retry, no recount).
        assert reaper.reap_once(backend, grace_s=60, now=later) == []
        assert db.job(job_id).n_finished == 3
        assert db.trial_states(job.optuna_study_name)["WAITING"] == 1

        # The retry runs the lost trial's params and the study ends exactly.
        retry_lease, retry_study, retry = _start_trial(backend, "host:5:e")
        assert retry_lease.retry_of == dead_lease.id and retry_lease.attempt == 1
        assert retry.number == waiting.number
        retry_study.tell(retry, 0.5)
        state = queue.finish_trial_slot(backend.sessions, retry_lease.id, "complete")
        assert state == JobState.SUCCEEDED
        assert_study_finished_exactly(db, job_id)
    finally:
        db.close()
        backend.sessions.kw["bind"].dispose()
        storage = backend.storage
        if isinstance(storage, optuna.storages.RDBStorage):
            storage.engine.dispose()


def test_reaper_fails_the_trial_before_the_slot_so_a_late_beat_cannot_split_them(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A silent worker's heartbeat lands between the reaper's Optuna step and its queue step:
    the trial is already FAIL (its tell will be rejected), the slot is not reaped this
    round; the next round reaps it and retries it once. Never a told result plus a retry."""
    backend = _open_backend(db_url)
    db = Database(db_url)
    try:
        spec = parse_spec(synthetic_spec(1, sleep_s=0.0, name="late-beat"))
        job_id = studies.submit_study(backend, spec, principal=LOCAL)[0].id
        lease, study, trial = _start_trial(backend, "host:1:a")
        later = datetime.now(UTC) + timedelta(hours=1)

        real_reap_stale_lease = queue.reap_stale_lease

        def beat_then_reap(
            sm: queue.SessionSource, lease_id: int, **kwargs: Any
        ) -> queue.StaleLease | None:
            queue.heartbeat(sm, [lease.id], now=later)  # the worker woke up just now
            return real_reap_stale_lease(sm, lease_id, **kwargs)

        monkeypatch.setattr(queue, "reap_stale_lease", beat_then_reap)
        assert reaper.reap_once(backend, grace_s=60, now=later) == []
        monkeypatch.setattr(queue, "reap_stale_lease", real_reap_stale_lease)

        assert db.trial(trial._trial_id).state == TrialState.FAIL
        [row] = db.leases(job_id)
        assert row.state == LeaseState.RUNNING  # it beat: not reaped this round
        with pytest.raises(ValueError, match="Cannot tell a FAIL trial"):  # rejected
            study.tell(trial, 0.1)
        # The worker gives up on the trial and stops beating; the next round reaps it.
        [stale] = reaper.reap_once(backend, grace_s=60, now=later + timedelta(minutes=5))
        assert stale.id == lease.id and stale.retry
        trials = db.trials(db.job(job_id).optuna_study_name)
        assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
        assert trials[1].user_attrs[RETRY_OF_ATTR] == trial.number
        retry_lease, retry_study, retry = _start_trial(backend, "host:2:b")
        retry_study.tell(retry, 0.5)
        queue.finish_trial_slot(backend.sessions, retry_lease.id, "complete")
        assert_study_finished_exactly(db, job_id)
    finally:
        db.close()
        backend.sessions.kw["bind"].dispose()
        storage = backend.storage
        if isinstance(storage, optuna.storages.RDBStorage):
            storage.engine.dispose()
