-- The PostgreSQL claim's fallback (service.queue._postgres), when claim.sql found every
-- candidate row locked by a concurrent claim or finish (each holds it for well under a
-- millisecond): wait for and lock every claimable job row, in id order (two fallbacks
-- never wait for each other in a cycle), then run claim.sql in the same transaction. Its
-- snapshot is taken after the other claims committed and nobody else can claim these
-- rows meanwhile, so it sees exact counts: no principal passes its quota here.
SELECT id FROM search_jobs
WHERE state IN (:queued, :running)
  AND n_running + n_finished < n_trials
  AND (deadline_at IS NULL OR deadline_at > :now)
ORDER BY id
FOR UPDATE
