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

-- name: migrate_3_paused_queues
-- Version 3: paused queues, schedules changed at run time, per-minute figures for the
-- dashboard's charts (and metrics), and indexes for paging through jobs by keyset.
CREATE TABLE IF NOT EXISTS errands_paused_queues (
    queue text PRIMARY KEY,
    paused_at double precision NOT NULL
)

-- name: migrate_3_schedule_states
CREATE TABLE IF NOT EXISTS errands_schedule_states (
    schedule text PRIMARY KEY,
    paused boolean NOT NULL DEFAULT false,
    every double precision,
    cron text,
    since double precision NOT NULL DEFAULT 0
)

-- name: migrate_3_finished_counts
-- One row per minute, queue, task and outcome, split in a few shards (by server process) so
-- workers finishing jobs of one task at once do not queue for one row's lock.
CREATE TABLE IF NOT EXISTS errands_finished_counts (
    minute bigint NOT NULL,
    queue text NOT NULL,
    task text NOT NULL,
    outcome text NOT NULL,
    shard smallint NOT NULL,
    n bigint NOT NULL,
    PRIMARY KEY (minute, queue, task, outcome, shard)
)

-- name: migrate_3_depth_samples
CREATE TABLE IF NOT EXISTS errands_depth_samples (
    minute bigint PRIMARY KEY,
    sample jsonb NOT NULL
)

-- name: migrate_3_finished_totals
-- How many finished jobs each queue holds per status, kept by the triggers below (in a few
-- shards, by server process, so concurrent finishes do not queue for one row), so counts never
-- scan the finished jobs; waiting and running ones are counted through their index.
CREATE TABLE IF NOT EXISTS errands_finished_totals (
    queue text NOT NULL,
    status text NOT NULL,
    shard smallint NOT NULL,
    n bigint NOT NULL,
    PRIMARY KEY (queue, status, shard)
)

-- name: migrate_3_finished_totals_fill
INSERT INTO errands_finished_totals (queue, status, shard, n)
SELECT queue, status, 0, count(*) FROM errands_jobs
WHERE status IN ('succeeded', 'failed', 'cancelled') GROUP BY queue, status

-- name: migrate_3_total_function
-- A job becomes finished, or stops being so, one row at a time (finish, cancel, re-run);
-- jobs are never inserted finished.
CREATE OR REPLACE FUNCTION errands_count_finished() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status IN ('succeeded', 'failed', 'cancelled') THEN
        INSERT INTO errands_finished_totals AS t (queue, status, shard, n)
        VALUES (OLD.queue, OLD.status, pg_backend_pid() % 8, -1)
        ON CONFLICT (queue, status, shard) DO UPDATE SET n = t.n - 1;
    END IF;
    IF NEW.status IN ('succeeded', 'failed', 'cancelled') THEN
        INSERT INTO errands_finished_totals AS t (queue, status, shard, n)
        VALUES (NEW.queue, NEW.status, pg_backend_pid() % 8, 1)
        ON CONFLICT (queue, status, shard) DO UPDATE SET n = t.n + 1;
    END IF;
    RETURN NULL;
END
$$

-- name: migrate_3_total_on_update
CREATE TRIGGER errands_total_on_update AFTER UPDATE OF status ON errands_jobs
FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status
    AND (OLD.status IN ('succeeded', 'failed', 'cancelled')
        OR NEW.status IN ('succeeded', 'failed', 'cancelled')))
EXECUTE FUNCTION errands_count_finished()

-- name: migrate_3_uncount_function
-- Prune and purge delete many jobs at once: their totals change once per statement.
CREATE OR REPLACE FUNCTION errands_uncount_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO errands_finished_totals AS t (queue, status, shard, n)
    SELECT queue, status, pg_backend_pid() % 8, -count(*) FROM errands_deleted
    WHERE status IN ('succeeded', 'failed', 'cancelled') GROUP BY queue, status
    ON CONFLICT (queue, status, shard) DO UPDATE SET n = t.n + excluded.n;
    RETURN NULL;
END
$$

-- name: migrate_3_total_on_delete
CREATE TRIGGER errands_total_on_delete AFTER DELETE ON errands_jobs
REFERENCING OLD TABLE AS errands_deleted
FOR EACH STATEMENT EXECUTE FUNCTION errands_uncount_deleted()

-- name: migrate_3_status_index
CREATE INDEX IF NOT EXISTS errands_jobs_by_status ON errands_jobs (status, seq)

-- name: migrate_3_queue_index
CREATE INDEX IF NOT EXISTS errands_jobs_by_queue ON errands_jobs (queue, seq)

-- name: migrate_3_task_index
CREATE INDEX IF NOT EXISTS errands_jobs_by_task ON errands_jobs (task, seq)

-- name: migrate_4_flow
-- Version 4: workflows (a step's place in its workflow, its missing inputs, its inputs).
ALTER TABLE errands_jobs ADD COLUMN IF NOT EXISTS flow text

-- name: migrate_4_blocked_by
ALTER TABLE errands_jobs ADD COLUMN IF NOT EXISTS blocked_by integer NOT NULL DEFAULT 0

-- name: migrate_4_inputs
-- A workflow step's inputs: the results of its upstream steps, by position.
CREATE TABLE IF NOT EXISTS errands_inputs (
    job_id text NOT NULL REFERENCES errands_jobs (id) ON DELETE CASCADE,
    position integer NOT NULL,
    result text NOT NULL,
    PRIMARY KEY (job_id, position)
)

-- name: migrate_hot_drop_total_on_insert
-- Version 5: the job hot path back to its cost before version 3. Finished jobs are counted
-- from the per-minute counts finish keeps anyway, and errands_finished_totals now holds only
-- what those do not say (jobs cancelled while waiting, re-run, pruned, purged), written by
-- those rare operations in their own statements: no trigger runs on any write to the jobs.
-- One page index, (status, queue, task, seq), replaces the listing index and the three
-- keyset indexes (each updated on every claim and finish, as those are not HOT updates):
-- job_page walks it (base.page_positions).
DROP TRIGGER IF EXISTS errands_total_on_insert ON errands_jobs

-- name: migrate_hot_drop_total_on_update
DROP TRIGGER IF EXISTS errands_total_on_update ON errands_jobs

-- name: migrate_hot_drop_total_on_delete
DROP TRIGGER IF EXISTS errands_total_on_delete ON errands_jobs

-- name: migrate_hot_drop_total_function
DROP FUNCTION IF EXISTS errands_count_finished()

-- name: migrate_hot_drop_uncount_function
DROP FUNCTION IF EXISTS errands_uncount_deleted()

-- name: migrate_hot_totals_as_adjustments
-- The totals less what the per-minute counts already say.
INSERT INTO errands_finished_totals AS t (queue, status, shard, n)
SELECT queue, outcome, 0, -sum(n) FROM errands_finished_counts
WHERE outcome IN ('succeeded', 'failed', 'cancelled') GROUP BY queue, outcome
ON CONFLICT (queue, status, shard) DO UPDATE SET n = t.n + excluded.n

-- name: migrate_hot_drop_status_index
DROP INDEX IF EXISTS errands_jobs_by_status

-- name: migrate_hot_drop_queue_index
DROP INDEX IF EXISTS errands_jobs_by_queue

-- name: migrate_hot_drop_task_index
DROP INDEX IF EXISTS errands_jobs_by_task

-- name: migrate_hot_drop_listing_index
DROP INDEX IF EXISTS errands_jobs_listing

-- name: migrate_hot_page_index
CREATE INDEX IF NOT EXISTS errands_jobs_pages ON errands_jobs (status, queue, task, seq)

-- name: migrate_6_limits
-- Version 6: rate and concurrency limits. A job carries its limits (limits.encode JSON);
-- the starts of each limited task or queue are logged by number, for the sliding window.
ALTER TABLE errands_jobs ADD COLUMN IF NOT EXISTS limits text

-- name: migrate_6_limit_starts
CREATE TABLE IF NOT EXISTS errands_limit_starts (
    key text NOT NULL,
    n bigint NOT NULL,
    at float8 NOT NULL,
    PRIMARY KEY (key, n)
)

-- name: migrate_timings_trace
-- Version 7: figures for metrics: histograms of attempts' durations and jobs' waits (due to
-- start) in the buckets of base.TIMING_BOUNDS, kept in the statements that claim and end jobs
-- (as the per-minute counts are), and the jobs deleted, for the count of jobs enqueued; never
-- decreased. And the traceparent of the span that enqueued a job. Names without a number:
-- the step can be renumbered as it is.
ALTER TABLE errands_jobs ADD COLUMN IF NOT EXISTS trace text

-- name: migrate_timings_deleted
-- Jobs deleted (pruned, purged, deleted) per queue and task: with the jobs stored, how many
-- were ever enqueued, counted at no cost to an enqueue. Rows only ever inserted, no key: prune
-- folds them into one per queue and task.
CREATE TABLE IF NOT EXISTS errands_deleted_counts (
    queue text NOT NULL,
    task text NOT NULL,
    n bigint NOT NULL
)

-- name: migrate_timings_table
-- One row per timing, queue, task, bucket (an index into base.TIMING_BOUNDS, its length for
-- +Inf) and shard (by server process, as errands_finished_counts): values in it, their sum.
CREATE TABLE IF NOT EXISTS errands_timings (
    timing text NOT NULL,
    queue text NOT NULL,
    task text NOT NULL,
    bucket smallint NOT NULL,
    shard smallint NOT NULL,
    n bigint NOT NULL,
    total double precision NOT NULL,
    PRIMARY KEY (timing, queue, task, bucket, shard)
)

-- name: migrate_timings_bucket
-- The bucket of a time in seconds, as base.bucket_of.
CREATE OR REPLACE FUNCTION errands_bucket(seconds double precision) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT (CASE WHEN seconds <= 0.005 THEN 0 WHEN seconds <= 0.01 THEN 1
    WHEN seconds <= 0.025 THEN 2 WHEN seconds <= 0.05 THEN 3 WHEN seconds <= 0.1 THEN 4
    WHEN seconds <= 0.25 THEN 5 WHEN seconds <= 0.5 THEN 6 WHEN seconds <= 1 THEN 7
    WHEN seconds <= 2.5 THEN 8 WHEN seconds <= 5 THEN 9 WHEN seconds <= 10 THEN 10
    WHEN seconds <= 30 THEN 11 WHEN seconds <= 60 THEN 12 WHEN seconds <= 120 THEN 13
    WHEN seconds <= 300 THEN 14 ELSE 15 END)::smallint
$$

-- name: migrate_limit_counts
-- Version 8: a running count and a start count per limit key, kept by the trigger below as
-- limited jobs start and end, so a limited claim with clear headroom is the one reserve
-- statement (with_headroom) under row locks on its keys' counts, instead of a transaction
-- under the global limits lock. The starts' sliding log is written by the same trigger.
-- Names without a number: the step can be renumbered as it is.
CREATE TABLE IF NOT EXISTS errands_limit_counts (
    key text PRIMARY KEY,
    -- Jobs carrying the key in status 'running', live lease or not: an upper bound on those
    -- the concurrency limit counts (a lapsed lease's slot comes back through the exact path).
    running bigint NOT NULL,
    -- Starts so far: the number the next start of the key is logged under.
    starts bigint NOT NULL
)

-- name: migrate_limit_counts_fill
INSERT INTO errands_limit_counts (key, running, starts)
SELECT key, sum(running), coalesce((SELECT max(n) + 1 FROM errands_limit_starts AS s
    WHERE s.key = keys.key), 0)
FROM (
    SELECT l.value ->> 0 AS key, (j.status = 'running')::int AS running
    FROM errands_jobs AS j, jsonb_array_elements(j.limits::jsonb) AS l
    WHERE j.limits IS NOT NULL
    UNION ALL
    SELECT key, 0 FROM errands_limit_starts
) AS keys
GROUP BY key
ON CONFLICT (key) DO UPDATE SET running = excluded.running, starts = excluded.starts

-- name: migrate_limit_counts_function
-- As a job with limits starts (claimed, or its lapsed lease claimed again) or stops running:
-- the counts of each of its keys follow, in key order (as a claim locks them: no deadlock),
-- and each start is numbered and logged for a rate limit (the start a whole rate before it
-- is no longer needed).
CREATE OR REPLACE FUNCTION errands_limit_bookkeeping() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    lim jsonb;
    started boolean := NEW.status = 'running';
    total bigint;
BEGIN
    FOR lim IN SELECT value FROM jsonb_array_elements(NEW.limits::jsonb) ORDER BY value ->> 0
    LOOP
        INSERT INTO errands_limit_counts AS c (key, running, starts)
        VALUES (lim ->> 0, started::int - (OLD.status = 'running')::int, started::int)
        ON CONFLICT (key) DO UPDATE
        SET running = c.running + excluded.running, starts = c.starts + excluded.starts
        RETURNING c.starts INTO total;
        IF started AND lim ->> 1 IS NOT NULL THEN
            INSERT INTO errands_limit_starts AS s (key, n, at)
            VALUES (lim ->> 0, total - 1, NEW.started_at)
            ON CONFLICT (key, n) DO UPDATE SET at = excluded.at;
            DELETE FROM errands_limit_starts AS s
            WHERE s.key = lim ->> 0 AND s.n = total - 1 - (lim ->> 1)::bigint;
        END IF;
    END LOOP;
    RETURN NULL;
END
$$

-- name: migrate_limit_counts_trigger
CREATE TRIGGER errands_limit_bookkeeping AFTER UPDATE OF status ON errands_jobs
FOR EACH ROW
WHEN (NEW.limits IS NOT NULL AND (NEW.status = 'running' OR OLD.status = 'running'))
EXECUTE FUNCTION errands_limit_bookkeeping()

-- name: migrate_free_waiting_index
-- Version 9: the waiting jobs without limits, in claim order, for a claim that leaves limited
-- jobs alone (AND limits IS NULL). Without it the planner, which guesses IS NULL rare until
-- the table is analyzed, sorted every due job on each claim: half the drain's speed.
CREATE INDEX IF NOT EXISTS errands_jobs_waiting_free ON errands_jobs (priority DESC, eta, seq)
    WHERE status IN ('queued', 'scheduled') AND limits IS NULL

-- name: insert_job
-- {jobs} is the table, qualified with the store's schema when written through an app's
-- connection, whose search_path may differ.
WITH inserted AS (
    INSERT INTO {jobs} (
        id, task, payload, queue, priority, status, attempts, max_attempts, retry_delay,
        timeout, unique_key, eta, enqueued_at, flow, blocked_by, limits, trace
    ) VALUES (
        %(id)s, %(task)s, %(payload)s, %(queue)s, %(priority)s, %(status)s, %(attempts)s,
        %(max_attempts)s, %(retry_delay)s, %(timeout)s, %(unique_key)s, %(eta)s, %(enqueued_at)s,
        %(flow)s, %(blocked_by)s, %(limits)s, %(trace)s
    )
    ON CONFLICT (unique_key)
        WHERE unique_key IS NOT NULL AND status IN ('queued', 'scheduled', 'running')
        DO NOTHING
    RETURNING id
)
SELECT id, pg_notify(%(channel)s, '') FROM inserted

-- name: insert_jobs
-- A batch without unique keys as one statement: one plan, one index pass per row, one NOTIFY.
-- {jobs} as in insert_job.
WITH inserted AS (
    INSERT INTO {jobs} (
        id, task, payload, queue, priority, status, attempts, max_attempts, retry_delay,
        timeout, unique_key, eta, enqueued_at, flow, blocked_by, limits, trace
    )
    SELECT id, task, payload, queue, priority, status, attempts, max_attempts, retry_delay,
        timeout, NULL, eta, enqueued_at, flow, blocked_by, limits, trace
    FROM unnest(
        %(id)s::text[], %(task)s::text[], %(payload)s::text[], %(queue)s::text[],
        %(priority)s::integer[], %(status)s::text[], %(attempts)s::integer[],
        %(max_attempts)s::integer[], %(retry_delay)s::float8[], %(timeout)s::float8[],
        %(eta)s::float8[], %(enqueued_at)s::float8[], %(flow)s::text[], %(blocked_by)s::integer[],
        %(limits)s::text[], %(trace)s::text[]
    ) WITH ORDINALITY AS batch (
        id, task, payload, queue, priority, status, attempts, max_attempts, retry_delay,
        timeout, eta, enqueued_at, flow, blocked_by, limits, trace, position
    )
    ORDER BY position
    RETURNING 1
)
SELECT pg_notify(%(channel)s, '') WHERE EXISTS (SELECT FROM inserted)

-- name: live_unique
SELECT * FROM {jobs}
WHERE unique_key = %s AND status IN ('queued', 'scheduled', 'running')

-- name: reserve
-- An expired job that has now lost max_lost leases in a row is failed instead of claimed
-- (the caller drops it); braces are doubled, as {queue_filter} is filled in by str.format.
-- A workflow step in that case is left as it is and returned (held): the caller fails it
-- and cancels its downstream steps in one transaction (lapsed_step, finish_step).
WITH expired AS (
    SELECT seq, limits, lost_leases + 1 >= %(max_lost)s AS give_up,
        flow IS NOT NULL AND lost_leases + 1 >= %(max_lost)s AS held
    FROM errands_jobs
    WHERE status = 'running' AND lease_expires_at <= %(now)s {queue_filter} {limit_filter}
        AND queue NOT IN (SELECT queue FROM errands_paused_queues)
    ORDER BY lease_expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), due AS (
    SELECT seq, limits FROM errands_jobs
    WHERE status IN ('queued', 'scheduled') AND eta <= %(now)s {queue_filter} {limit_filter}
        AND queue NOT IN (SELECT queue FROM errands_paused_queues)
    ORDER BY priority DESC, eta, seq
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), candidates AS (
    (SELECT seq, true AS expired, give_up, limits FROM expired WHERE NOT held)
    UNION ALL (SELECT seq, false, false, limits FROM due)
    LIMIT %(limit)s
){headroom}, claimed AS (
    SELECT seq, expired, give_up FROM candidates {headroom_filter}
), updated AS (
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
), counted AS (
    INSERT INTO errands_finished_counts AS c (minute, queue, task, outcome, shard, n)
    SELECT floor(%(now)s / 60)::bigint, queue, task, 'failed', pg_backend_pid() %% 8, count(*)
    FROM updated WHERE status = 'failed' GROUP BY queue, task
    ON CONFLICT (minute, queue, task, outcome, shard) DO UPDATE SET n = c.n + excluded.n
), timed AS (
    -- The last attempt of each job given up: its duration, and its wait (due to start).
    INSERT INTO errands_timings AS t (timing, queue, task, bucket, shard, n, total)
    SELECT timing, queue, task, errands_bucket(s), pg_backend_pid() %% 8, count(*), sum(s)
    FROM updated, LATERAL (VALUES
        ('duration', greatest(%(now)s - started_at, 0)), ('wait', greatest(started_at - eta, 0))
    ) AS measured (timing, s)
    WHERE status = 'failed'
    GROUP BY timing, queue, task, errands_bucket(s)
    ON CONFLICT (timing, queue, task, bucket, shard) DO UPDATE
    SET n = t.n + excluded.n, total = t.total + excluded.total
)
SELECT * FROM updated
UNION ALL
SELECT j.* FROM errands_jobs AS j JOIN expired ON j.seq = expired.seq WHERE expired.held

-- name: limit_lock
-- Exact limited claims take turns, deployment-wide, for the length of their transaction;
-- claims with headroom (with_headroom) hold this lock shared, and wait meanwhile.
SELECT pg_advisory_xact_lock(hashtext('errands_limits'))

-- name: with_headroom
-- Put into reserve for a limited claim's first try: the counts of the candidates' keys,
-- locked in key order (under the limits lock, shared: an exact claim holds it alone), as
-- they are once locked; the candidates whose every limit clearly has room for %(limit)s
-- more starts by them: running jobs (lapsed leases counted too) plus %(limit)s within the
-- concurrency; %(limit)s within the rate, the key's last start seen (so every start before
-- it is), and no logged start in the range the next %(limit)s starts look back to inside
-- its window. The claim goes to the exact path only when one was left out, or fewer were
-- due. A key without counts yet is not clear. Braces doubled for str.format.
, wanted AS (
    SELECT DISTINCT l.value ->> 0 AS key
    FROM candidates, jsonb_array_elements(candidates.limits::jsonb) AS l
), counts AS MATERIALIZED (
    SELECT c.key, c.running, c.starts FROM errands_limit_counts AS c
    WHERE c.key IN (SELECT key FROM wanted)
        AND (SELECT true FROM (SELECT pg_advisory_xact_lock_shared(hashtext('errands_limits')))
            AS shared)
    ORDER BY c.key
    FOR UPDATE
)

-- name: counts_locked
-- An exact claim's filter with with_headroom: its keys' counts locked in key order before the
-- trigger writes them, as a claim with headroom does (no deadlock with either).
WHERE (SELECT count(*) FROM counts) >= 0

-- name: headroom_filter
WHERE give_up OR limits IS NULL OR NOT EXISTS (
    SELECT 1 FROM jsonb_array_elements(candidates.limits::jsonb) AS l
    LEFT JOIN counts AS c ON c.key = l.value ->> 0
    WHERE c.key IS NULL
        OR (l.value ->> 3 IS NOT NULL AND c.running + %(limit)s > (l.value ->> 3)::bigint)
        OR (l.value ->> 1 IS NOT NULL AND (
            %(limit)s > (l.value ->> 1)::bigint
            -- A scalar subquery, one index probe: as NOT EXISTS the planner may hash the
            -- whole start log instead.
            OR (c.starts > 0 AND (
                SELECT s.at FROM errands_limit_starts AS s WHERE s.key = c.key AND s.n = c.starts - 1
            ) IS NULL)
            OR EXISTS (
                SELECT 1 FROM errands_limit_starts AS s
                WHERE s.key = c.key AND s.n >= c.starts - (l.value ->> 1)::bigint
                    AND s.n < c.starts + %(limit)s - (l.value ->> 1)::bigint
                    AND s.at > %(now)s - (l.value ->> 2)::float8
            )
        ))
)

-- name: limit_candidates
-- The jobs a limited claim weighs, in claim order: lapsed leases, then due jobs; without
-- those of the tasks and queues already held back, and those already taken.
(SELECT seq, limits, lost_leases + 1 >= %(max_lost)s AS give_up FROM errands_jobs
    WHERE status = 'running' AND lease_expires_at <= %(now)s {queue_filter}
        AND queue NOT IN (SELECT queue FROM errands_paused_queues)
        AND seq <> ALL(%(taken)s)
        AND (limits IS NULL OR (task <> ALL(%(held_tasks)s) AND queue <> ALL(%(held_queues)s)))
    ORDER BY lease_expires_at LIMIT %(limit)s)
UNION ALL
(SELECT seq, limits, false FROM errands_jobs
    WHERE status IN ('queued', 'scheduled') AND eta <= %(now)s {queue_filter}
        AND queue NOT IN (SELECT queue FROM errands_paused_queues)
        AND seq <> ALL(%(taken)s)
        AND (limits IS NULL OR (task <> ALL(%(held_tasks)s) AND queue <> ALL(%(held_queues)s)))
    ORDER BY priority DESC, eta, seq LIMIT %(limit)s)

-- name: limit_running_task
SELECT count(*) FROM errands_jobs
WHERE status = 'running' AND lease_expires_at > %(now)s AND task = %(name)s

-- name: limit_running_queue
SELECT count(*) FROM errands_jobs
WHERE status = 'running' AND lease_expires_at > %(now)s AND queue = %(name)s

-- name: limit_starts
-- How many starts key has had, with the times of those numbered from that less rate,
-- window of them (one row with n NULL when the log holds none of them). The claim's trigger
-- (errands_limit_bookkeeping) logs each start.
SELECT d.done, s.n, s.at
FROM (SELECT coalesce((SELECT starts FROM errands_limit_counts WHERE key = %(key)s), 0) AS done)
    AS d
LEFT JOIN errands_limit_starts AS s ON s.key = %(key)s
    AND s.n >= d.done - %(rate)s AND s.n < d.done - %(rate)s + %(window)s

-- name: recent_starts
SELECT count(*) FROM errands_limit_starts WHERE key = %s AND at > %s

-- name: extend_leases
UPDATE errands_jobs AS j SET lease_expires_at = %(expires)s
FROM unnest(%(ids)s::text[], %(tokens)s::text[]) AS lease (id, token)
WHERE j.id = lease.id AND j.status = 'running' AND j.lease_token = lease.token
RETURNING j.id, j.cancel_requested

-- name: set_progress
UPDATE errands_jobs SET progress = %(progress)s, progress_message = %(message)s
WHERE id = %(id)s AND status = 'running'

-- name: finish
-- claimed: the eta the attempt was due at, read before the update changes it.
WITH claimed AS (SELECT eta FROM errands_jobs WHERE id = %(id)s), finished AS (
    UPDATE errands_jobs
    SET status = %(status)s, result = %(result)s, error = %(error)s, traceback = %(traceback)s,
        eta = coalesce(%(eta)s, eta),
        finished_at = CASE WHEN %(status)s = 'scheduled' THEN NULL ELSE %(now)s END,
        lease_expires_at = NULL, lease_token = NULL, lost_leases = 0
    WHERE id = %(id)s AND status = 'running' AND lease_token = %(token)s AND flow IS NULL
    RETURNING status, queue, task, started_at
), {attempt_figures}
SELECT CASE WHEN status = 'scheduled' THEN pg_notify(%(channel)s, '') END FROM finished

-- name: finish_step
-- A workflow step's outcome; the caller moves its workflow on in the same transaction.
-- claimed: the eta the attempt was due at, read before the update changes it.
WITH claimed AS (SELECT eta FROM errands_jobs WHERE id = %(id)s), finished AS (
    UPDATE errands_jobs
    SET status = %(status)s, result = %(result)s, error = %(error)s, traceback = %(traceback)s,
        eta = coalesce(%(eta)s, eta),
        finished_at = CASE WHEN %(status)s = 'scheduled' THEN NULL ELSE %(now)s END,
        lease_expires_at = NULL, lease_token = NULL, lost_leases = 0
    WHERE id = %(id)s AND status = 'running' AND lease_token = %(token)s
    RETURNING status, queue, task, flow, started_at
), {attempt_figures}
SELECT task, flow FROM finished

-- name: attempt_figures
-- The CTEs finish and finish_step share (postgres.py puts them in for {attempt_figures}),
-- after their claimed and finished ones: the attempt's end, counted in its minute, and its
-- duration (start to now) and wait (due to start), in the same statement.
counted AS (
    INSERT INTO errands_finished_counts AS c (minute, queue, task, outcome, shard, n)
    SELECT floor(%(now)s / 60)::bigint, queue, task,
        CASE WHEN status = 'scheduled' THEN 'retried' ELSE status END, pg_backend_pid() %% 8, 1
    FROM finished
    ON CONFLICT (minute, queue, task, outcome, shard) DO UPDATE SET n = c.n + 1
), timed AS (
    INSERT INTO errands_timings AS t (timing, queue, task, bucket, shard, n, total)
    SELECT timing, queue, task, errands_bucket(s), pg_backend_pid() %% 8, 1, s
    FROM finished, LATERAL (VALUES
        ('duration', greatest(%(now)s - started_at, 0)),
        ('wait', greatest(started_at - (SELECT eta FROM claimed), 0))
    ) AS measured (timing, s)
    ON CONFLICT (timing, queue, task, bucket, shard) DO UPDATE
    SET n = t.n + 1, total = t.total + excluded.total
)

-- name: add_input
-- Not for a step that was purged meanwhile.
INSERT INTO errands_inputs (job_id, position, result)
SELECT %(id)s, %(position)s, %(result)s
WHERE EXISTS (SELECT 1 FROM errands_jobs WHERE id = %(id)s)
ON CONFLICT DO NOTHING
RETURNING job_id

-- name: unblock
WITH unblocked AS (
    UPDATE errands_jobs
    SET blocked_by = blocked_by - 1,
        status = CASE WHEN status <> 'blocked' OR blocked_by > 1 THEN status
            WHEN eta > %(now)s THEN 'scheduled' ELSE 'queued' END
    WHERE id = %(id)s
    RETURNING status
)
SELECT status,
    CASE WHEN status IN ('queued', 'scheduled') THEN pg_notify(%(channel)s, '') END AS notified
FROM unblocked

-- name: lapsed_step
-- A held step of reserve, locked until its transaction ends, if its lease is still lapsed.
SELECT 1 FROM errands_jobs
WHERE id = %(id)s AND status = 'running' AND lease_token = %(token)s
    AND lease_expires_at <= %(now)s
FOR UPDATE

-- name: cancel_blocked
-- Counted here: the per-minute counts only see attempts that end (see migrate_hot_*).
WITH cancelled AS (
    UPDATE errands_jobs SET status = 'cancelled', finished_at = %(now)s, error = %(error)s
    WHERE id = %(id)s AND status = 'blocked'
    RETURNING flow, queue
), counted AS (
    INSERT INTO errands_finished_totals AS t (queue, status, shard, n)
    SELECT queue, 'cancelled', 0, 1 FROM cancelled
    ON CONFLICT (queue, status, shard) DO UPDATE SET n = t.n + 1
)
SELECT flow FROM cancelled

-- name: revive_cancelled
WITH revived AS (
    UPDATE errands_jobs SET status = 'blocked', finished_at = NULL, error = NULL
    WHERE id = %(id)s AND status = 'cancelled' AND error LIKE %(pattern)s
    RETURNING flow, queue
), counted AS (
    INSERT INTO errands_finished_totals AS t (queue, status, shard, n)
    SELECT queue, 'cancelled', 0, -1 FROM revived
    ON CONFLICT (queue, status, shard) DO UPDATE SET n = t.n - 1
)
SELECT flow FROM revived

-- name: step_inputs
SELECT position, result FROM errands_inputs WHERE job_id = %s

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
WITH cancelled AS (
    UPDATE errands_jobs
    SET status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END,
        finished_at = CASE WHEN status = 'running' THEN finished_at ELSE %(now)s END,
        cancel_requested = cancel_requested OR status = 'running'
    WHERE id = %(id)s AND status IN ('queued', 'scheduled', 'blocked', 'running')
    RETURNING *
), counted AS (
    -- A waiting job cancelled; a running one is counted when its attempt ends.
    INSERT INTO errands_finished_totals AS t (queue, status, shard, n)
    SELECT queue, 'cancelled', 0, 1 FROM cancelled WHERE status = 'cancelled'
    ON CONFLICT (queue, status, shard) DO UPDATE SET n = t.n + 1
)
SELECT * FROM cancelled

-- name: requeue
WITH was AS (
    SELECT seq, status FROM errands_jobs WHERE id = %(id)s FOR UPDATE
), requeued AS (
    UPDATE errands_jobs AS j
    SET status = CASE WHEN blocked_by > 0 THEN 'blocked' ELSE 'queued' END, attempts = 0,
        eta = %(now)s, result = NULL, error = NULL,
        traceback = NULL, progress = NULL, progress_message = NULL, started_at = NULL,
        finished_at = NULL, worker_id = NULL, cancel_requested = false, lost_leases = 0
    FROM was
    WHERE j.seq = was.seq AND was.status IN ('succeeded', 'failed', 'cancelled')
    RETURNING j.id, j.flow, j.queue, was.status
), counted AS (
    INSERT INTO errands_finished_totals AS t (queue, status, shard, n)
    SELECT queue, status, 0, -1 FROM requeued
    ON CONFLICT (queue, status, shard) DO UPDATE SET n = t.n - 1
)
SELECT flow, pg_notify(%(channel)s, '') AS notified FROM requeued

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
SELECT queue, status, count(*) AS n FROM errands_jobs
WHERE status IN ('blocked', 'queued', 'scheduled', 'running') GROUP BY queue, status
UNION ALL
SELECT queue, status, sum(n)::bigint AS n FROM (
    SELECT queue, outcome AS status, n FROM errands_finished_counts
    WHERE outcome IN ('succeeded', 'failed', 'cancelled')
    UNION ALL
    SELECT queue, status, n FROM errands_finished_totals
) AS finished
GROUP BY queue, status HAVING sum(n) > 0

-- name: next_eta
-- A limited job counts as due no earlier than free_at; the second column says whether one
-- waits (Backend.limited).
SELECT min(CASE WHEN limits IS NULL THEN eta ELSE greatest(eta, %(free_at)s) END) AS eta,
    bool_or(limits IS NOT NULL) AS limited
FROM errands_jobs WHERE status IN ('queued', 'scheduled') {queue_filter}
    AND queue NOT IN (SELECT queue FROM errands_paused_queues)

-- name: job_page
SELECT * FROM errands_jobs WHERE seq < %(before)s ORDER BY seq DESC LIMIT %(limit)s

-- name: filtered_job_page
-- The page index, (status, queue, task, seq), orders jobs by seq only within one status,
-- queue and task: each of these keys (of the {fixed} leading filters) is found by a skip
-- scan, a seek each however many jobs share it, and the newest jobs of those that match
-- {others} are merged. As fast deep as on the first page, and no index more to keep on the
-- hot path. The seek for the next key is bounded by the row comparison alone (with the
-- leading filters beside it, the scan would start at the first job they match, not after
-- the last key); the walk stops at the first key past them ({still}).
WITH RECURSIVE keys (status, queue, task) AS (
    (SELECT status, queue, task FROM errands_jobs AS j WHERE {fixed}
    ORDER BY status, queue, task LIMIT 1)
    UNION ALL
    SELECT later.* FROM keys CROSS JOIN LATERAL (
        SELECT j.status, j.queue, j.task FROM errands_jobs AS j
        WHERE (j.status, j.queue, j.task) > (keys.status, keys.queue, keys.task)
        ORDER BY j.status, j.queue, j.task LIMIT 1
    ) AS later
    WHERE {still}
)
SELECT * FROM errands_jobs WHERE seq IN (
    SELECT newest.seq FROM (SELECT * FROM keys WHERE {others}) AS k CROSS JOIN LATERAL (
        SELECT j.seq FROM errands_jobs AS j
        WHERE j.status = k.status AND j.queue = k.queue AND j.task = k.task
            AND j.seq < %(before)s
        ORDER BY j.seq DESC LIMIT %(limit)s
    ) AS newest
    ORDER BY newest.seq DESC LIMIT %(limit)s
)
ORDER BY seq DESC

-- name: pause_queue
INSERT INTO errands_paused_queues (queue, paused_at) VALUES (%s, %s)
ON CONFLICT (queue) DO NOTHING

-- name: resume_queue
WITH resumed AS (DELETE FROM errands_paused_queues WHERE queue = %(queue)s RETURNING queue)
SELECT pg_notify(%(channel)s, '') FROM resumed

-- name: paused_queues
SELECT queue FROM errands_paused_queues

-- name: set_schedule_paused
INSERT INTO errands_schedule_states AS s (schedule, paused) VALUES (%(schedule)s, %(paused)s)
ON CONFLICT (schedule) DO UPDATE SET
    since = CASE WHEN s.paused AND NOT excluded.paused THEN %(now)s ELSE s.since END,
    paused = excluded.paused

-- name: set_schedule_timing
INSERT INTO errands_schedule_states (schedule, every, cron, since)
VALUES (%(schedule)s, %(every)s, %(cron)s, %(now)s)
ON CONFLICT (schedule) DO UPDATE SET
    every = excluded.every, cron = excluded.cron, since = excluded.since

-- name: schedule_states
SELECT schedule, paused, every, cron, since FROM errands_schedule_states

-- name: finished_counts
SELECT minute, queue, task, outcome, sum(n)::bigint AS n FROM errands_finished_counts
WHERE minute >= %s GROUP BY minute, queue, task, outcome ORDER BY minute, queue, task, outcome

-- name: enqueued_counts
SELECT queue, task, sum(n)::bigint AS n FROM (
    SELECT queue, task, count(*) AS n FROM errands_jobs GROUP BY queue, task
    UNION ALL
    SELECT queue, task, n FROM errands_deleted_counts
) AS ever
GROUP BY queue, task

-- name: timings
SELECT timing, queue, task, bucket, sum(n)::bigint AS n, sum(total) AS total
FROM errands_timings GROUP BY timing, queue, task, bucket

-- name: roll_up_deleted
-- One row per queue and task again; rows of deletes not committed yet are left for later.
WITH taken AS (DELETE FROM errands_deleted_counts RETURNING queue, task, n)
INSERT INTO errands_deleted_counts (queue, task, n)
SELECT queue, task, sum(n) FROM taken GROUP BY queue, task

-- name: sample_depth
INSERT INTO errands_depth_samples (minute, sample)
SELECT %(minute)s, coalesce(jsonb_agg(jsonb_build_array(queue, status, n)), '[]') FROM (
    SELECT queue, status, count(*) AS n FROM errands_jobs
    WHERE status IN ('queued', 'scheduled', 'running') GROUP BY queue, status
) AS live
WHERE NOT EXISTS (SELECT 1 FROM errands_depth_samples WHERE minute = %(minute)s)
ON CONFLICT (minute) DO NOTHING

-- name: depth_samples
SELECT minute, sample FROM errands_depth_samples WHERE minute >= %s

-- name: roll_up_figures
-- Minute 0 keeps the counts of every minute pruned, so totals since the start stay known:
-- moved in one statement, so a count added meanwhile is neither lost nor counted twice.
WITH pruned AS (
    DELETE FROM errands_finished_counts WHERE minute > 0 AND minute < %s
    RETURNING queue, task, outcome, n
)
INSERT INTO errands_finished_counts AS c (minute, queue, task, outcome, shard, n)
SELECT 0, queue, task, outcome, 0, sum(n) FROM pruned GROUP BY queue, task, outcome
ON CONFLICT (minute, queue, task, outcome, shard) DO UPDATE SET n = c.n + excluded.n

-- name: prune_samples
DELETE FROM errands_depth_samples WHERE minute < %s

-- name: fire_tick
INSERT INTO errands_ticks (schedule, fire_time, fired_at) VALUES (%s, %s, %s)
ON CONFLICT (schedule, fire_time) DO NOTHING

-- name: set_tick_job
UPDATE errands_ticks SET job_id = %s WHERE schedule = %s AND fire_time = %s

-- name: last_ticks
SELECT DISTINCT ON (schedule) schedule, fire_time, job_id FROM errands_ticks
ORDER BY schedule, fire_time DESC

-- name: prune_jobs
WITH pruned AS (
    DELETE FROM errands_jobs
    WHERE status IN ('succeeded', 'failed', 'cancelled') AND finished_at < %s
    RETURNING queue, status, task
), gone AS (
    INSERT INTO errands_deleted_counts (queue, task, n)
    SELECT queue, task, count(*) FROM pruned GROUP BY queue, task
), counted AS (
    INSERT INTO errands_finished_totals AS t (queue, status, shard, n)
    SELECT queue, status, 0, -count(*) FROM pruned GROUP BY queue, status
    ON CONFLICT (queue, status, shard) DO UPDATE SET n = t.n + excluded.n
)
SELECT count(*) AS n FROM pruned

-- name: prune_ticks
DELETE FROM errands_ticks AS t
WHERE fired_at < %s AND fire_time < (
    SELECT max(latest.fire_time) FROM errands_ticks AS latest WHERE latest.schedule = t.schedule
)

-- name: purge
WITH purged AS (
    DELETE FROM errands_jobs
    WHERE status != 'running'
        AND (%(status)s::text IS NULL OR status = %(status)s)
        AND (%(queue)s::text IS NULL OR queue = %(queue)s)
        AND (%(before)s::double precision IS NULL
            OR coalesce(finished_at, enqueued_at) < %(before)s)
    RETURNING queue, status, task
), gone AS (
    INSERT INTO errands_deleted_counts (queue, task, n)
    SELECT queue, task, count(*) FROM purged GROUP BY queue, task
), counted AS (
    INSERT INTO errands_finished_totals AS t (queue, status, shard, n)
    SELECT queue, status, 0, -count(*) FROM purged
    WHERE status IN ('succeeded', 'failed', 'cancelled') GROUP BY queue, status
    ON CONFLICT (queue, status, shard) DO UPDATE SET n = t.n + excluded.n
)
SELECT count(*) AS n FROM purged

-- name: delete_job
WITH deleted AS (
    DELETE FROM errands_jobs
    WHERE id = %s AND status IN ('succeeded', 'failed', 'cancelled')
    RETURNING queue, status, task
), gone AS (
    INSERT INTO errands_deleted_counts (queue, task, n)
    SELECT queue, task, count(*) FROM deleted GROUP BY queue, task
), counted AS (
    INSERT INTO errands_finished_totals AS t (queue, status, shard, n)
    SELECT queue, status, 0, -1 FROM deleted
    ON CONFLICT (queue, status, shard) DO UPDATE SET n = t.n + excluded.n
)
SELECT count(*) AS n FROM deleted

-- name: register_worker
INSERT INTO errands_workers (id, info, expires_at) VALUES (%s, %s, %s)
ON CONFLICT (id) DO UPDATE SET info = excluded.info, expires_at = excluded.expires_at

-- name: unregister_worker
DELETE FROM errands_workers WHERE id = %s

-- name: list_workers
SELECT id, info FROM errands_workers WHERE expires_at > %s ORDER BY id

-- name: prune_workers
DELETE FROM errands_workers WHERE expires_at <= %s
