-- Queries of the PostgreSQL backend. Each block is one statement, run by name.
-- Table names are unqualified, so they live in the first schema of the
-- connection's search_path. Times are seconds since the epoch, as the Backend
-- interface passes them, so they round-trip exactly.

-- name: lock_schema
SELECT pg_advisory_xact_lock(1163023940, hashtext(coalesce(current_schema(), '')))

-- name: server_identity
-- Which database of which server a connection reaches, however it was addressed
-- (localhost or 127.0.0.1, a socket, a pooler): two servers never start in the same
-- microsecond on the same port.
SELECT current_database() AS dbname, current_setting('port') AS port,
    pg_postmaster_start_time()::text AS started

-- name: current_schema
SELECT current_schema() AS schema

-- name: schema_exists
SELECT to_regclass('errands_schema') IS NOT NULL AS present

-- name: schema_version
SELECT coalesce(max(version), 0) AS version FROM errands_schema

-- name: set_schema_version
INSERT INTO errands_schema (version) VALUES (%s)

-- name: create_schema
CREATE TABLE IF NOT EXISTS errands_schema (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- name: create_jobs
CREATE TABLE IF NOT EXISTS errands_jobs (
    seq bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    task text NOT NULL,
    payload text NOT NULL,
    queue text NOT NULL,
    priority integer NOT NULL,
    status text NOT NULL,
    attempts integer NOT NULL,
    max_attempts integer NOT NULL,
    retry_delay double precision NOT NULL,
    timeout double precision,
    unique_key text,
    eta double precision NOT NULL,
    enqueued_at double precision NOT NULL,
    started_at double precision,
    finished_at double precision,
    result text,
    error text,
    traceback text,
    progress double precision,
    progress_message text,
    cancel_requested boolean NOT NULL DEFAULT false,
    lease_expires_at double precision,
    lease_token text,
    worker_id text
)

-- name: create_waiting_index
CREATE INDEX IF NOT EXISTS errands_jobs_waiting
    ON errands_jobs (priority DESC, eta, seq) WHERE status IN ('queued', 'scheduled')

-- name: create_eta_index
CREATE INDEX IF NOT EXISTS errands_jobs_eta
    ON errands_jobs (eta) WHERE status IN ('queued', 'scheduled')

-- name: create_lease_index
CREATE INDEX IF NOT EXISTS errands_jobs_leases
    ON errands_jobs (lease_expires_at) WHERE status = 'running'

-- name: create_unique_index
CREATE UNIQUE INDEX IF NOT EXISTS errands_jobs_unique
    ON errands_jobs (unique_key)
    WHERE unique_key IS NOT NULL AND status IN ('queued', 'scheduled', 'running')

-- name: create_listing_index
CREATE INDEX IF NOT EXISTS errands_jobs_listing ON errands_jobs (status, queue, seq)

-- name: create_finished_index
CREATE INDEX IF NOT EXISTS errands_jobs_finished
    ON errands_jobs (finished_at) WHERE status IN ('succeeded', 'failed', 'cancelled')

-- name: create_ticks
CREATE TABLE IF NOT EXISTS errands_ticks (
    schedule text NOT NULL,
    fire_time double precision NOT NULL,
    fired_at double precision NOT NULL,
    job_id text,
    PRIMARY KEY (schedule, fire_time)
)

-- name: create_workers
CREATE TABLE IF NOT EXISTS errands_workers (
    id text PRIMARY KEY,
    info jsonb NOT NULL,
    expires_at double precision NOT NULL
)

-- name: migrate_2_lost_leases
ALTER TABLE errands_jobs ADD COLUMN IF NOT EXISTS lost_leases integer NOT NULL DEFAULT 0

-- name: insert_job
-- {jobs} is the table, qualified with the store's schema when written through an app's
-- connection, whose search_path may differ.
WITH inserted AS (
    INSERT INTO {jobs} (
        id, task, payload, queue, priority, status, attempts, max_attempts, retry_delay,
        timeout, unique_key, eta, enqueued_at
    ) VALUES (
        %(id)s, %(task)s, %(payload)s, %(queue)s, %(priority)s, %(status)s, %(attempts)s,
        %(max_attempts)s, %(retry_delay)s, %(timeout)s, %(unique_key)s, %(eta)s, %(enqueued_at)s
    )
    ON CONFLICT (unique_key)
        WHERE unique_key IS NOT NULL AND status IN ('queued', 'scheduled', 'running')
        DO NOTHING
    RETURNING id
)
SELECT id, pg_notify(%(channel)s, '') FROM inserted

-- name: live_unique
SELECT * FROM {jobs}
WHERE unique_key = %s AND status IN ('queued', 'scheduled', 'running')

-- name: reserve
-- An expired job that has now lost max_lost leases in a row is failed instead of claimed
-- (the caller drops it); braces are doubled, as {queue_filter} is filled in by str.format.
WITH expired AS (
    SELECT seq, lost_leases + 1 >= %(max_lost)s AS give_up FROM errands_jobs
    WHERE status = 'running' AND lease_expires_at <= %(now)s {queue_filter}
    ORDER BY lease_expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), due AS (
    SELECT seq FROM errands_jobs
    WHERE status IN ('queued', 'scheduled') AND eta <= %(now)s {queue_filter}
    ORDER BY priority DESC, eta, seq
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), claimed AS (
    (SELECT seq, true AS expired, give_up FROM expired)
    UNION ALL (SELECT seq, false, false FROM due)
    LIMIT %(limit)s
)
UPDATE errands_jobs AS j
SET status = CASE WHEN claimed.give_up THEN 'failed' ELSE 'running' END,
    attempts = j.attempts + CASE WHEN claimed.give_up THEN 0 ELSE 1 END,
    lost_leases = j.lost_leases + CASE WHEN claimed.expired THEN 1 ELSE 0 END,
    started_at = CASE WHEN claimed.give_up THEN j.started_at ELSE %(now)s END,
    finished_at = CASE WHEN claimed.give_up THEN %(now)s ELSE j.finished_at END,
    lease_expires_at = CASE WHEN claimed.give_up THEN NULL ELSE %(expires)s END,
    lease_token = CASE WHEN claimed.give_up THEN NULL
        ELSE replace(gen_random_uuid()::text, '-', '') END,
    worker_id = CASE WHEN claimed.give_up THEN j.worker_id ELSE %(worker)s END,
    error = CASE WHEN claimed.give_up THEN replace(replace(replace(
        %(lost_error)s, '{{worker}}', coalesce(j.worker_id, '?')),
        '{{attempt}}', j.attempts::text), '{{lost}}', (j.lost_leases + 1)::text)
        ELSE j.error END,
    traceback = CASE WHEN claimed.give_up THEN NULL ELSE j.traceback END
FROM claimed
WHERE j.seq = claimed.seq
RETURNING j.*

-- name: extend_leases
UPDATE errands_jobs AS j SET lease_expires_at = %(expires)s
FROM unnest(%(ids)s::text[], %(tokens)s::text[]) AS lease (id, token)
WHERE j.id = lease.id AND j.status = 'running' AND j.lease_token = lease.token
RETURNING j.id, j.cancel_requested

-- name: set_progress
UPDATE errands_jobs SET progress = %(progress)s, progress_message = %(message)s
WHERE id = %(id)s AND status = 'running'

-- name: finish
WITH finished AS (
    UPDATE errands_jobs
    SET status = %(status)s, result = %(result)s, error = %(error)s, traceback = %(traceback)s,
        eta = coalesce(%(eta)s, eta),
        finished_at = CASE WHEN %(status)s = 'scheduled' THEN NULL ELSE %(now)s END,
        lease_expires_at = NULL, lease_token = NULL, lost_leases = 0
    WHERE id = %(id)s AND status = 'running' AND lease_token = %(token)s
    RETURNING status
)
SELECT CASE WHEN status = 'scheduled' THEN pg_notify(%(channel)s, '') END FROM finished

-- name: release
WITH released AS (
    UPDATE errands_jobs
    SET status = 'queued', attempts = attempts - 1, started_at = NULL, lease_expires_at = NULL,
        lease_token = NULL, worker_id = NULL, lost_leases = 0
    WHERE id = %(id)s AND status = 'running' AND lease_token = %(token)s
    RETURNING id
)
SELECT pg_notify(%(channel)s, '') FROM released

-- name: cancel
UPDATE errands_jobs
SET status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END,
    finished_at = CASE WHEN status = 'running' THEN finished_at ELSE %(now)s END,
    cancel_requested = cancel_requested OR status = 'running'
WHERE id = %(id)s AND status IN ('queued', 'scheduled', 'running')
RETURNING *

-- name: requeue
WITH requeued AS (
    UPDATE errands_jobs
    SET status = 'queued', attempts = 0, eta = %(now)s, result = NULL, error = NULL,
        traceback = NULL, progress = NULL, progress_message = NULL, started_at = NULL,
        finished_at = NULL, worker_id = NULL, cancel_requested = false, lost_leases = 0
    WHERE id = %(id)s AND status IN ('succeeded', 'failed', 'cancelled')
    RETURNING id
)
SELECT pg_notify(%(channel)s, '') FROM requeued

-- name: get
SELECT * FROM errands_jobs WHERE id = %s

-- name: get_many
SELECT * FROM errands_jobs WHERE id = ANY(%s)

-- name: list_jobs
SELECT * FROM errands_jobs
WHERE (%(status)s::text IS NULL OR status = %(status)s)
    AND (%(queue)s::text IS NULL OR queue = %(queue)s)
ORDER BY seq DESC LIMIT %(limit)s OFFSET %(offset)s

-- name: counts
SELECT queue, status, count(*) AS n FROM errands_jobs GROUP BY queue, status

-- name: next_eta
SELECT min(eta) AS eta FROM errands_jobs WHERE status IN ('queued', 'scheduled') {queue_filter}

-- name: fire_tick
INSERT INTO errands_ticks (schedule, fire_time, fired_at) VALUES (%s, %s, %s)
ON CONFLICT (schedule, fire_time) DO NOTHING

-- name: set_tick_job
UPDATE errands_ticks SET job_id = %s WHERE schedule = %s AND fire_time = %s

-- name: last_ticks
SELECT DISTINCT ON (schedule) schedule, fire_time, job_id FROM errands_ticks
ORDER BY schedule, fire_time DESC

-- name: prune_jobs
DELETE FROM errands_jobs
WHERE status IN ('succeeded', 'failed', 'cancelled') AND finished_at < %s

-- name: prune_ticks
DELETE FROM errands_ticks AS t
WHERE fired_at < %s AND fire_time < (
    SELECT max(latest.fire_time) FROM errands_ticks AS latest WHERE latest.schedule = t.schedule
)

-- name: purge
DELETE FROM errands_jobs
WHERE status != 'running'
    AND (%(status)s::text IS NULL OR status = %(status)s)
    AND (%(queue)s::text IS NULL OR queue = %(queue)s)
    AND (%(before)s::double precision IS NULL OR coalesce(finished_at, enqueued_at) < %(before)s)

-- name: register_worker
INSERT INTO errands_workers (id, info, expires_at) VALUES (%s, %s, %s)
ON CONFLICT (id) DO UPDATE SET info = excluded.info, expires_at = excluded.expires_at

-- name: unregister_worker
DELETE FROM errands_workers WHERE id = %s

-- name: list_workers
SELECT id, info FROM errands_workers WHERE expires_at > %s ORDER BY id

-- name: prune_workers
DELETE FROM errands_workers WHERE expires_at <= %s
