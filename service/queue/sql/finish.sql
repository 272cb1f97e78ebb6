-- The PostgreSQL finish (service.queue._postgres): the common path of finish_trial_slot
-- as ONE statement. Lock order: the job row (job), then the lease row, which is only
-- updated while it still runs. The job ends here too when this was its last slot, so no
-- crash can leave it open: ends_job is service.queue._rules.end_job_if_done on the job
-- row as it was before this finish (read under its lock). The EXISTS sees the leases as
-- they were before this statement, hence pruned_now.
WITH job AS (
    SELECT search_jobs.id,
           search_jobs.state IN (:queued, :running)
           AND (search_jobs.n_finished + 1 >= search_jobs.n_trials
                OR (search_jobs.deadline_at <= :now AND search_jobs.n_running = 1))
           AS ends_job
    FROM search_jobs JOIN trial_leases ON trial_leases.job_id = search_jobs.id
    WHERE trial_leases.id = :lease_id
      AND search_jobs.id = COALESCE(CAST(:job_id AS VARCHAR), search_jobs.id)
    FOR UPDATE OF search_jobs
), lease AS (
    UPDATE trial_leases SET state = :state, finished_at = :now, failure_reason = :reason
    FROM job
    WHERE trial_leases.id = :lease_id
      AND trial_leases.job_id = job.id
      AND trial_leases.state = :lease_running
    RETURNING trial_leases.job_id
)
UPDATE search_jobs AS j SET
    n_running = j.n_running - 1,
    n_finished = j.n_finished + 1,
    n_complete = j.n_complete + :completed,
    state = CASE WHEN job.ends_job
        THEN CASE WHEN j.n_complete + :completed > 0 THEN :succeeded ELSE :failed END
        ELSE j.state END,
    finished_at = CASE WHEN job.ends_job THEN :now ELSE j.finished_at END,
    error = CASE WHEN job.ends_job THEN CASE
            WHEN j.n_complete + :completed > 0 THEN NULL
            WHEN j.n_finished + 1 < j.n_trials THEN :timed_out_error
            WHEN :pruned_now OR EXISTS (
                SELECT 1 FROM trial_leases AS other
                WHERE other.job_id = j.id AND other.state = :pruned
            ) THEN :none_completed_error
            ELSE :all_failed_error
        END
        ELSE j.error END
FROM lease JOIN job ON job.id = lease.job_id
WHERE j.id = lease.job_id
RETURNING j.state
