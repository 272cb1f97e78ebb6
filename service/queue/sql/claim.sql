-- The PostgreSQL claim (service.queue._postgres): the rule of claim_trial_slot as ONE
-- statement, so the job row is locked only while the server runs it.
--
-- {wait} is SKIP LOCKED (concurrent claims spread over jobs) or empty (wait for the row).
-- Lock order as everywhere: the job row (job), then the lease row of a pending retry
-- (retried), which is taken over: its flag cleared, the new lease retry_of it.
WITH job AS (
    SELECT id FROM search_jobs
    WHERE state IN (:queued, :running)
      AND n_running + n_finished < n_trials
      AND (deadline_at IS NULL OR deadline_at > :now)
    ORDER BY n_running, last_claimed_at NULLS FIRST, created_at, id
    LIMIT 1
    FOR UPDATE {wait}
), retried AS (
    SELECT lease.id, lease.attempt, lease.trial_number, lease.retry_trial_id
    FROM trial_leases AS lease JOIN job ON lease.job_id = job.id
    WHERE lease.retry_pending
    ORDER BY lease.id
    LIMIT 1
    FOR UPDATE OF lease
), taken_over AS (
    UPDATE trial_leases SET retry_pending = false
    FROM retried WHERE trial_leases.id = retried.id
), claimed AS (
    UPDATE search_jobs SET
        n_running = search_jobs.n_running + 1,
        last_claimed_at = :now,
        started_at = COALESCE(search_jobs.started_at, :now),
        deadline_at = CASE
            WHEN search_jobs.started_at IS NULL AND search_jobs.timeout_s IS NOT NULL
            THEN :now + make_interval(secs => LEAST(search_jobs.timeout_s, :max_deadline_s))
            ELSE search_jobs.deadline_at
        END,
        state = :running
    FROM job WHERE search_jobs.id = job.id
    RETURNING search_jobs.id, search_jobs.optuna_study_name, search_jobs.spec
), lease AS (
    INSERT INTO trial_leases
        (job_id, worker_id, state, attempt, retry_of, retry_pending, claimed_at, heartbeat_at)
    SELECT claimed.id, :worker_id, :lease_running, COALESCE(retried.attempt + 1, 0),
           retried.id, false, :now, :now
    FROM claimed LEFT JOIN retried ON true
    RETURNING id, attempt, retry_of
)
SELECT lease.id, claimed.id AS job_id, claimed.optuna_study_name, claimed.spec,
       lease.attempt, lease.retry_of, retried.trial_number AS retry_of_trial_number,
       retried.retry_trial_id
FROM lease CROSS JOIN claimed LEFT JOIN retried ON true
