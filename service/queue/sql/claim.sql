-- The PostgreSQL claim (service.queue._postgres): the rule of claim_trial_slot as ONE
-- statement, so the job row is locked only while the server runs it.
--
-- Fair share (service.queue._sqlite.pick_job is the same rule): the principals (owners)
-- with a claimable job, fewest running leases first, then the one whose last claim over
-- all its jobs is oldest (never first), then the one whose oldest claimable job waited
-- longest; within a principal, its jobs in the order of one queue (fewest running, least
-- recently claimed, oldest). Rows are ranked "place" within their principal and sorted
-- by place first: the first row is the best principal's best job, and concurrent claims,
-- which skip each other's locked rows, spread over principals before studies.
--
-- Quota (max_running_per_owner, NULL for none): a principal with that many running leases
-- has no candidate, and a principal with k left offers only its first k jobs, so claims
-- racing on distinct rows cannot pass it; a job row claimed since this statement's
-- snapshot (n_running changed, seen when its lock is granted) is skipped, so a stale
-- count cannot either. The fallback (lock_claimable.sql, then this) sees fresh counts.
--
-- Lock order as everywhere: the job row (job), then the lease row of a pending retry
-- (retried), which is taken over: its flag cleared, the new lease retry_of it.
WITH candidate AS (
    SELECT id, owner, created_at, n_running,
           row_number() OVER (
               PARTITION BY owner
               ORDER BY n_running, last_claimed_at NULLS FIRST, created_at, id
           ) AS place
    FROM search_jobs
    WHERE state IN (:queued, :running)
      AND n_running + n_finished < n_trials
      AND (deadline_at IS NULL OR deadline_at > :now)
), running AS (
    -- Every running lease counts, a cancelled job's included (it still holds a device).
    SELECT theirs.owner, count(*) AS n_running
    FROM trial_leases AS lease JOIN search_jobs AS theirs ON theirs.id = lease.job_id
    WHERE lease.state = :lease_running
    GROUP BY theirs.owner
), principal AS MATERIALIZED (
    -- One row per principal with a candidate, computed once (inlined, the planner ran it
    -- again for every candidate row).
    SELECT candidate.owner,
           COALESCE(max(running.n_running), 0) AS n_running,
           -- One probe of ix_search_jobs_owner_last_claimed_at per principal.
           (SELECT max(theirs.last_claimed_at) FROM search_jobs AS theirs
            WHERE theirs.owner = candidate.owner) AS last_claimed_at,
           min(candidate.created_at) AS waiting_since
    FROM candidate LEFT JOIN running ON running.owner = candidate.owner
    GROUP BY candidate.owner
), job AS (
    SELECT search_jobs.id
    FROM search_jobs
    JOIN candidate ON candidate.id = search_jobs.id
    JOIN principal ON principal.owner = candidate.owner
    WHERE search_jobs.state IN (:queued, :running)
      AND search_jobs.n_running + search_jobs.n_finished < search_jobs.n_trials
      AND (search_jobs.deadline_at IS NULL OR search_jobs.deadline_at > :now)
      AND (CAST(:max_running_per_owner AS INTEGER) IS NULL
           OR (candidate.place <= CAST(:max_running_per_owner AS INTEGER) - principal.n_running
               AND search_jobs.n_running = candidate.n_running))
    ORDER BY candidate.place, principal.n_running, principal.last_claimed_at NULLS FIRST,
             principal.waiting_since, principal.owner COLLATE "C"
    LIMIT 1
    FOR UPDATE OF search_jobs SKIP LOCKED
), retried AS (
    SELECT lease.id, lease.attempt, lease.state, lease.trial_number, lease.retry_trial_id
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
    -- A preempted lease's retry keeps its attempt: preemption uses up no retry.
    SELECT claimed.id, :worker_id, :lease_running,
           COALESCE(retried.attempt + CASE WHEN retried.state = :lease_preempted THEN 0 ELSE 1 END, 0),
           retried.id, false, :now, :now
    FROM claimed LEFT JOIN retried ON true
    RETURNING id, attempt, retry_of
)
SELECT lease.id, claimed.id AS job_id, claimed.optuna_study_name, claimed.spec,
       lease.attempt, lease.retry_of, retried.trial_number AS retry_of_trial_number,
       retried.retry_trial_id
FROM lease CROSS JOIN claimed LEFT JOIN retried ON true
