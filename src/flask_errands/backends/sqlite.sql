-- Queries of the SQLite backend. Each block is one statement, run by name.
--
-- A set of three statuses or more is spelled with OR, never IN (...): SQLite builds a
-- temporary b-tree for each such IN list each time a statement runs, and the partial indexes'
-- WHERE clauses run on every write: that was a quarter of the instructions of an insert, and of
-- a claim and finish.
-- A statement that must match a partial index's WHERE (ON CONFLICT, or to use the index)
-- spells it the very same way.

-- name: create_jobs
CREATE TABLE IF NOT EXISTS errands_jobs (
    -- The rowid. No AUTOINCREMENT, which costs a write to sqlite_sequence per insert: a seq
    -- is reused only after the newest job is deleted, so order among live jobs holds.
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    task TEXT NOT NULL,
    payload TEXT NOT NULL,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    retry_delay REAL NOT NULL,
    timeout REAL,
    unique_key TEXT,
    eta REAL NOT NULL,
    enqueued_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    result TEXT,
    error TEXT,
    traceback TEXT,
    progress REAL,
    progress_message TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    lease_expires_at REAL,
    lease_token TEXT,
    worker_id TEXT
)

-- name: create_waiting_index
CREATE INDEX IF NOT EXISTS errands_jobs_waiting
    ON errands_jobs (priority DESC, eta, seq) WHERE status IN ('queued', 'scheduled')

-- name: create_lease_index
CREATE INDEX IF NOT EXISTS errands_jobs_leases
    ON errands_jobs (lease_expires_at) WHERE status = 'running'

-- name: create_unique_index
CREATE UNIQUE INDEX IF NOT EXISTS errands_jobs_unique
    ON errands_jobs (unique_key)
    WHERE unique_key IS NOT NULL
        AND (status = 'queued' OR status = 'scheduled' OR status = 'running')

-- name: create_finished_index
CREATE INDEX IF NOT EXISTS errands_jobs_finished
    ON errands_jobs (finished_at)
    WHERE (status = 'succeeded' OR status = 'failed' OR status = 'cancelled')

-- name: create_ticks
CREATE TABLE IF NOT EXISTS errands_ticks (
    schedule TEXT NOT NULL,
    fire_time REAL NOT NULL,
    fired_at REAL NOT NULL,
    job_id TEXT,
    PRIMARY KEY (schedule, fire_time)
)

-- name: create_workers
CREATE TABLE IF NOT EXISTS errands_workers (
    id TEXT PRIMARY KEY,
    info TEXT NOT NULL,
    expires_at REAL NOT NULL
)

-- name: migrate_2_lost_leases
ALTER TABLE errands_jobs ADD COLUMN lost_leases INTEGER NOT NULL DEFAULT 0

-- name: migrate_3_paused_queues
-- Version 3: paused queues, schedules changed at run time, per-minute figures for the
-- dashboard's charts (and metrics), and indexes for paging through jobs by keyset.
CREATE TABLE IF NOT EXISTS errands_paused_queues (
    queue TEXT PRIMARY KEY,
    paused_at REAL NOT NULL
)

-- name: migrate_3_schedule_states
CREATE TABLE IF NOT EXISTS errands_schedule_states (
    schedule TEXT PRIMARY KEY,
    paused INTEGER NOT NULL DEFAULT 0,
    every REAL,
    cron TEXT,
    since REAL NOT NULL DEFAULT 0
)

-- name: migrate_3_finished_counts
CREATE TABLE IF NOT EXISTS errands_finished_counts (
    minute INTEGER NOT NULL,
    queue TEXT NOT NULL,
    task TEXT NOT NULL,
    outcome TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (minute, queue, task, outcome)
) WITHOUT ROWID

-- name: migrate_3_depth_samples
CREATE TABLE IF NOT EXISTS errands_depth_samples (
    minute INTEGER PRIMARY KEY,
    sample TEXT NOT NULL
)

-- name: migrate_3_ended_at
ALTER TABLE errands_jobs ADD COLUMN ended_at REAL

-- name: migrate_3_count_trigger
-- Counts each attempt that ends (not a release) in its minute, inside the statement that
-- ends it: the finish keeps costing one statement. OR, not IN: an IN list of three or more
-- is built into a temporary b-tree each time the trigger runs (version 6 made it so).
CREATE TRIGGER IF NOT EXISTS errands_count_finished
AFTER UPDATE OF status ON errands_jobs
WHEN old.status = 'running' AND (new.status = 'succeeded' OR new.status = 'failed'
    OR new.status = 'cancelled' OR new.status = 'scheduled')
BEGIN
    INSERT INTO errands_finished_counts (minute, queue, task, outcome, n)
    VALUES (
        CAST(coalesce(new.finished_at, new.ended_at) / 60 AS INTEGER), new.queue, new.task,
        CASE new.status WHEN 'scheduled' THEN 'retried' ELSE new.status END, 1
    )
    ON CONFLICT (minute, queue, task, outcome) DO UPDATE SET n = n + 1;
END

-- name: migrate_3_finished_totals
-- How many finished jobs each queue holds per status, kept by the triggers below, so counts
-- never scan the finished jobs; waiting and running ones are counted through their index.
CREATE TABLE IF NOT EXISTS errands_finished_totals (
    queue TEXT NOT NULL,
    status TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (queue, status)
) WITHOUT ROWID

-- name: migrate_3_finished_totals_fill
INSERT INTO errands_finished_totals (queue, status, n)
SELECT queue, status, count(*) FROM errands_jobs
WHERE status IN ('succeeded', 'failed', 'cancelled') GROUP BY queue, status

-- name: migrate_3_total_on_insert
CREATE TRIGGER IF NOT EXISTS errands_total_on_insert
AFTER INSERT ON errands_jobs WHEN new.status IN ('succeeded', 'failed', 'cancelled')
BEGIN
    INSERT INTO errands_finished_totals (queue, status, n) VALUES (new.queue, new.status, 1)
    ON CONFLICT (queue, status) DO UPDATE SET n = n + 1;
END

-- name: migrate_3_total_on_update
CREATE TRIGGER IF NOT EXISTS errands_total_on_update
AFTER UPDATE OF status ON errands_jobs
WHEN old.status IS NOT new.status AND (old.status IN ('succeeded', 'failed', 'cancelled')
    OR new.status IN ('succeeded', 'failed', 'cancelled'))
BEGIN
    UPDATE errands_finished_totals SET n = n - 1
    WHERE queue = old.queue AND status = old.status;
    INSERT INTO errands_finished_totals (queue, status, n)
    SELECT new.queue, new.status, 1 WHERE new.status IN ('succeeded', 'failed', 'cancelled')
    ON CONFLICT (queue, status) DO UPDATE SET n = n + 1;
END

-- name: migrate_3_total_on_delete
CREATE TRIGGER IF NOT EXISTS errands_total_on_delete
AFTER DELETE ON errands_jobs WHEN old.status IN ('succeeded', 'failed', 'cancelled')
BEGIN
    UPDATE errands_finished_totals SET n = n - 1
    WHERE queue = old.queue AND status = old.status;
END

-- name: migrate_3_status_index
CREATE INDEX IF NOT EXISTS errands_jobs_by_status ON errands_jobs (status, seq)

-- name: migrate_3_queue_index
CREATE INDEX IF NOT EXISTS errands_jobs_by_queue ON errands_jobs (queue, seq)

-- name: migrate_3_task_index
CREATE INDEX IF NOT EXISTS errands_jobs_by_task ON errands_jobs (task, seq)

-- name: migrate_4_flow
-- Version 4: workflows (a step's place in its workflow, its missing inputs, its inputs).
ALTER TABLE errands_jobs ADD COLUMN flow TEXT

-- name: migrate_4_blocked_by
ALTER TABLE errands_jobs ADD COLUMN blocked_by INTEGER NOT NULL DEFAULT 0

-- name: migrate_4_inputs
-- A workflow step's inputs: the results of its upstream steps, by position. Deleted with
-- the step (PRAGMA foreign_keys is on for every connection).
CREATE TABLE IF NOT EXISTS errands_inputs (
    job_id TEXT NOT NULL REFERENCES errands_jobs (id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    result TEXT NOT NULL,
    PRIMARY KEY (job_id, position)
) WITHOUT ROWID

-- name: migrate_or_drop_unique_index
DROP INDEX IF EXISTS errands_jobs_unique

-- name: migrate_or_drop_finished_index
DROP INDEX IF EXISTS errands_jobs_finished

-- name: migrate_hot_drop_total_on_insert
-- Version 6: the job hot path back to its cost before version 3. Finished jobs are counted
-- from the per-minute counts finish keeps anyway, and errands_finished_totals now holds only
-- what those do not say (jobs cancelled while waiting, re-run, pruned, purged), written by
-- those rare operations: no trigger runs on enqueue, claim or finish but the per-minute one.
-- One page index, (status, queue, task, seq), replaces the listing index and the three
-- keyset indexes: job_page walks it (base.page_positions), at no cost to the hot path.
DROP TRIGGER IF EXISTS errands_total_on_insert

-- name: migrate_hot_drop_total_on_update
DROP TRIGGER IF EXISTS errands_total_on_update

-- name: migrate_hot_drop_total_on_delete
DROP TRIGGER IF EXISTS errands_total_on_delete

-- name: migrate_hot_totals_as_adjustments
-- The totals less what the per-minute counts already say.
INSERT INTO errands_finished_totals (queue, status, n)
SELECT queue, outcome, -sum(n) FROM errands_finished_counts
WHERE outcome = 'succeeded' OR outcome = 'failed' OR outcome = 'cancelled'
GROUP BY queue, outcome
ON CONFLICT (queue, status) DO UPDATE SET n = n + excluded.n

-- name: migrate_hot_drop_count_trigger
-- Made again as migrate_3_count_trigger is now (see sqlite.py).
DROP TRIGGER IF EXISTS errands_count_finished

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

-- name: migrate_7_limits
-- Version 7: rate and concurrency limits. A job carries its limits (limits.encode JSON);
-- the starts of each limited task or queue are logged by number, for the sliding window.
ALTER TABLE errands_jobs ADD COLUMN limits TEXT

-- name: migrate_7_limit_starts
CREATE TABLE IF NOT EXISTS errands_limit_starts (
    key TEXT NOT NULL,
    n INTEGER NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (key, n)
) WITHOUT ROWID

-- name: migrate_timings_trace
-- Version 8: figures for metrics: histograms of attempts' durations and of jobs' waits (due to
-- start), in the buckets of base.TIMING_BOUNDS, kept by triggers as jobs are claimed and end
-- (as the per-minute counts are), and the jobs deleted, for the count of jobs enqueued;
-- never decreased. And the traceparent of the span that enqueued a job.
-- Names without a number: the step can be renumbered as it is.
ALTER TABLE errands_jobs ADD COLUMN trace TEXT

-- name: migrate_timings_deleted
-- Jobs deleted (pruned, purged, deleted) per queue and task: with the jobs stored, how many
-- were ever enqueued, counted at no cost to .delay() (a trigger's row cost it a third).
CREATE TABLE IF NOT EXISTS errands_deleted_counts (
    queue TEXT NOT NULL,
    task TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (queue, task)
) WITHOUT ROWID

-- name: migrate_timings_seconds
-- The histograms live in errands_finished_counts, as rows whose outcome is 'duration:<bucket>'
-- or 'wait:<bucket>' (an index into base.TIMING_BOUNDS, its length for +Inf), with the sum of
-- their values: next to the attempt's own count in the same b-tree, so the finish's commit
-- writes no page more (a table of their own cost SQLite's claim and finish a third).
ALTER TABLE errands_finished_counts ADD COLUMN seconds REAL NOT NULL DEFAULT 0

-- name: migrate_timings_buckets
-- The buckets' upper bounds: base.TIMING_BOUNDS, one row each; bucket 15 (+Inf) holds the rest.
CREATE TABLE IF NOT EXISTS errands_buckets (le REAL PRIMARY KEY, bucket INTEGER NOT NULL)
    WITHOUT ROWID

-- name: migrate_timings_bounds
INSERT OR IGNORE INTO errands_buckets (le, bucket) VALUES
    (0.005, 0), (0.01, 1), (0.025, 2), (0.05, 3), (0.1, 4), (0.25, 5), (0.5, 6), (1, 7),
    (2.5, 8), (5, 9), (10, 10), (30, 11), (60, 12), (120, 13), (300, 14)

-- name: migrate_timings_drop_count_trigger
DROP TRIGGER IF EXISTS errands_count_finished

-- name: migrate_timings_count_trigger
-- migrate_3_count_trigger, which also files the attempt's duration (start to end) and wait
-- (due to start) in their buckets, in the same minute.
CREATE TRIGGER IF NOT EXISTS errands_count_finished
AFTER UPDATE OF status ON errands_jobs
WHEN old.status = 'running' AND (new.status = 'succeeded' OR new.status = 'failed'
    OR new.status = 'cancelled' OR new.status = 'scheduled')
BEGIN
    INSERT INTO errands_finished_counts (minute, queue, task, outcome, n, seconds)
    SELECT CAST(coalesce(new.finished_at, new.ended_at) / 60 AS INTEGER), new.queue, new.task,
        CASE WHEN timing = '' THEN outcome ELSE timing || coalesce(
            (SELECT bucket FROM errands_buckets WHERE le >= s ORDER BY le LIMIT 1), 15) END,
        1, s
    FROM (
        SELECT CASE new.status WHEN 'scheduled' THEN 'retried' ELSE new.status END AS outcome,
            '' AS timing, 0.0 AS s
        UNION ALL
        SELECT '', 'duration:',
            max(coalesce(new.finished_at, new.ended_at) - coalesce(old.started_at, 0), 0.0)
        UNION ALL
        SELECT '', 'wait:', max(coalesce(old.started_at, 0) - old.eta, 0.0)
    ) AS ended
    WHERE true
    ON CONFLICT (minute, queue, task, outcome) DO UPDATE
    SET n = n + 1, seconds = seconds + excluded.seconds;
END

-- name: migrate_limit_starts_trigger
-- Version 9: the claim's own statement logs each start of a job with a rate limit, numbered
-- after its key's last, and deletes the start a whole rate before it, no longer needed (for
-- the first two limits: a job carries its task's and its queue's at most). With the running
-- jobs counted in the claim too (with_headroom), a limited claim with headroom is one
-- statement, as a plain one is. It fires only for a limited claim, which sets limits to
-- itself: SQLite pays a frame for a trigger on every row it could fire on, WHEN or not, and
-- plain claims and finishes must not pay that. Names without a number: renumberable.
CREATE TRIGGER IF NOT EXISTS errands_limit_starts_log
AFTER UPDATE OF limits ON errands_jobs
WHEN new.status = 'running' AND new.limits IS NOT NULL
BEGIN
    INSERT OR REPLACE INTO errands_limit_starts (key, n, at)
    SELECT l.value ->> 0, coalesce(
        (SELECT max(s.n) + 1 FROM errands_limit_starts AS s WHERE s.key = l.value ->> 0), 0),
        new.started_at
    FROM json_each(new.limits) AS l
    WHERE l.value ->> 1 IS NOT NULL;
    DELETE FROM errands_limit_starts
    WHERE key = new.limits ->> '$[0][0]' AND n = (SELECT max(s.n) FROM errands_limit_starts AS s
        WHERE s.key = new.limits ->> '$[0][0]') - (new.limits ->> '$[0][1]');
    DELETE FROM errands_limit_starts
    WHERE key = new.limits ->> '$[1][0]' AND n = (SELECT max(s.n) FROM errands_limit_starts AS s
        WHERE s.key = new.limits ->> '$[1][0]') - (new.limits ->> '$[1][1]');
END

-- name: insert_job
-- Positional parameters, in the order of INSERT_FIELDS in sqlite.py: binding them costs
-- less than looking each name up in a dict.
INSERT INTO errands_jobs (
    id, task, payload, queue, priority, attempts, max_attempts, retry_delay, timeout,
    unique_key, eta, enqueued_at, flow, blocked_by, limits, trace, status
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (unique_key)
    WHERE unique_key IS NOT NULL
        AND (status = 'queued' OR status = 'scheduled' OR status = 'running')
    DO NOTHING

-- name: live_unique
SELECT * FROM errands_jobs
WHERE unique_key = ? AND (status = 'queued' OR status = 'scheduled' OR status = 'running')

-- name: claim
-- Jobs whose lease expired (their worker died) first, then due jobs by priority, eta and
-- enqueue order; one statement, so it is its own transaction. An expired job that has now
-- lost :max_lost leases in a row is failed instead of claimed (the caller drops it); braces
-- are doubled, as the due_jobs query is put in by str.format. INDEXED BY there keeps the
-- planner off the listing index, which would sort every waiting job on each claim. A lapsed
-- lease whose worker process is alive on this host (errands_live_holder, in sqlite.py) waits.
-- A limited claim sets limits to itself ({touch_limits}), which fires the trigger that logs
-- its starts; a plain claim, which does not, fires none.
UPDATE errands_jobs
SET status = CASE WHEN claimed.give_up THEN 'failed' ELSE 'running' END,
    attempts = attempts + CASE WHEN claimed.give_up THEN 0 ELSE 1 END,
    lost_leases = lost_leases + claimed.expired,
    started_at = CASE WHEN claimed.give_up THEN started_at ELSE :now END,
    finished_at = CASE WHEN claimed.give_up THEN :now ELSE finished_at END,
    lease_expires_at = CASE WHEN claimed.give_up THEN NULL ELSE :expires END,
    lease_token = CASE WHEN claimed.give_up THEN NULL ELSE lower(hex(randomblob(16))) END,
    worker_id = CASE WHEN claimed.give_up THEN worker_id ELSE :worker END,
    error = CASE WHEN claimed.give_up THEN replace(replace(replace(
        :lost_error, '{{worker}}', coalesce(worker_id, '?')), '{{attempt}}', attempts),
        '{{lost}}', lost_leases + 1) ELSE error END,
    traceback = CASE WHEN claimed.give_up THEN NULL ELSE traceback END{touch_limits}
FROM ({due} LIMIT :limit) AS claimed
WHERE errands_jobs.seq = claimed.seq
RETURNING *

-- name: due_jobs
-- The jobs a claim weighs, in claim order: lapsed leases, then due jobs by priority, eta
-- and enqueue order. The filter is the claim's: without limited jobs, or only those chosen;
-- or a limited claim's (_limited_claim), without the tasks and queues held back and the
-- jobs already taken (JSON arrays).
SELECT * FROM (
    SELECT seq, limits, 1 AS expired, lost_leases + 1 >= :max_lost AS give_up
    FROM errands_jobs INDEXED BY errands_jobs_leases
    WHERE status = 'running' AND lease_expires_at <= :now {queue_filter} {filter}
        AND queue NOT IN (SELECT queue FROM errands_paused_queues)
        AND NOT errands_live_holder(worker_id, started_at, lease_expires_at, :live_until)
    ORDER BY lease_expires_at LIMIT :limit
)
UNION ALL
SELECT * FROM (
    SELECT seq, limits, 0 AS expired, 0 AS give_up
    FROM errands_jobs INDEXED BY errands_jobs_waiting
    WHERE status IN ('queued', 'scheduled') AND eta <= :now {queue_filter} {filter}
        AND queue NOT IN (SELECT queue FROM errands_paused_queues)
    ORDER BY priority DESC, eta, seq LIMIT :limit
)

-- name: with_headroom
-- A limited claim's first try: of the first :limit due jobs, those whose every limit has room
-- for :limit more starts: its task's (or queue's) jobs running under a live lease, plus
-- :limit, within the concurrency; :limit within the rate, and no logged start inside its
-- window in the range the next :limit starts look back to. Exact, as the Gate is, for a
-- claim of one job; the claim goes to the Gate (_gated_claim) only when one was left out,
-- or fewer were due. The running jobs are walked through the lease index, as the Gate does.
SELECT * FROM ({due} LIMIT :limit) AS candidate
WHERE give_up OR limits IS NULL OR NOT EXISTS (
    SELECT 1 FROM json_each(candidate.limits) AS l
    WHERE (l.value ->> 3 IS NOT NULL AND :limit + (
            SELECT count(*) FROM errands_jobs AS r INDEXED BY errands_jobs_leases
            WHERE r.status = 'running' AND r.lease_expires_at > :now
                AND CASE WHEN l.value ->> 0 LIKE 'task:%' THEN r.task ELSE r.queue END
                    = substr(l.value ->> 0, instr(l.value ->> 0, ':') + 1)
        ) > l.value ->> 3)
        OR :limit > l.value ->> 1
        OR (l.value ->> 1 IS NOT NULL AND EXISTS (
            SELECT 1 FROM (
                SELECT max(m.n) + 1 - (l.value ->> 1) AS back FROM errands_limit_starts AS m
                WHERE m.key = l.value ->> 0
            ) AS d
            JOIN errands_limit_starts AS s
                ON s.key = l.value ->> 0 AND s.n >= d.back AND s.n < d.back + :limit
            WHERE s.at > :now - (l.value ->> 2)
        ))
)

-- name: limit_running_task
SELECT count(*) FROM errands_jobs INDEXED BY errands_jobs_leases
WHERE status = 'running' AND lease_expires_at > :now AND task = :name

-- name: limit_running_queue
SELECT count(*) FROM errands_jobs INDEXED BY errands_jobs_leases
WHERE status = 'running' AND lease_expires_at > :now AND queue = :name

-- name: limit_starts
-- How many starts :key has had, with the times of those numbered from that less :rate,
-- :window of them (one row with n NULL when the log holds none of them). The claim's trigger
-- (errands_limit_starts_log) logs each start.
SELECT done, n, at FROM (SELECT coalesce(max(n) + 1, 0) AS done FROM errands_limit_starts
    WHERE key = :key)
LEFT JOIN errands_limit_starts ON key = :key AND n >= done - :rate AND n < done - :rate + :window

-- name: recent_starts
SELECT count(*) FROM errands_limit_starts WHERE key = ? AND at > ?

-- name: extend_lease
UPDATE errands_jobs SET lease_expires_at = :expires
WHERE id = :id AND status = 'running' AND lease_token = :token
RETURNING id, cancel_requested

-- name: set_progress
UPDATE errands_jobs SET progress = :progress, progress_message = :message
WHERE id = :id AND status = 'running'

-- name: finish
-- Not a workflow step's: finish_step records those, and moves their workflow on.
UPDATE errands_jobs
SET status = :status, result = :result, error = :error, traceback = :traceback,
    eta = coalesce(:eta, eta), finished_at = CASE WHEN :status = 'scheduled' THEN NULL ELSE :now END,
    ended_at = :now, lease_expires_at = NULL, lease_token = NULL, lost_leases = 0
WHERE id = :id AND status = 'running' AND lease_token = :token AND flow IS NULL

-- name: finish_step
UPDATE errands_jobs
SET status = :status, result = :result, error = :error, traceback = :traceback,
    eta = coalesce(:eta, eta), finished_at = CASE WHEN :status = 'scheduled' THEN NULL ELSE :now END,
    ended_at = :now, lease_expires_at = NULL, lease_token = NULL, lost_leases = 0
WHERE id = :id AND status = 'running' AND lease_token = :token
RETURNING task, flow

-- name: add_input
-- Not for a step that was purged meanwhile.
INSERT INTO errands_inputs (job_id, position, result)
SELECT :id, :position, :result WHERE EXISTS (SELECT 1 FROM errands_jobs WHERE id = :id)
ON CONFLICT DO NOTHING
RETURNING job_id

-- name: unblock
-- One input fewer is missing, whatever the step's status: a cancelled step may be revived.
UPDATE errands_jobs
SET blocked_by = blocked_by - 1,
    status = CASE WHEN status != 'blocked' OR blocked_by > 1 THEN status
        WHEN eta > :now THEN 'scheduled' ELSE 'queued' END
WHERE id = :id
RETURNING status

-- name: cancel_blocked
UPDATE errands_jobs SET status = 'cancelled', finished_at = :now, error = :error
WHERE id = :id AND status = 'blocked'
RETURNING flow, queue

-- name: revive_cancelled
UPDATE errands_jobs SET status = 'blocked', finished_at = NULL, error = NULL
WHERE id = :id AND status = 'cancelled' AND error LIKE :pattern
RETURNING flow, queue

-- name: step_inputs
SELECT position, result FROM errands_inputs WHERE job_id = ?

-- name: release
UPDATE errands_jobs
SET status = 'queued', attempts = attempts - 1, started_at = NULL, lease_expires_at = NULL,
    lease_token = NULL, worker_id = NULL, lost_leases = 0
WHERE id = :id AND status = 'running' AND lease_token = :token

-- name: cancel_waiting
UPDATE errands_jobs SET status = 'cancelled', finished_at = :now
WHERE id = :id AND status IN ('queued', 'scheduled', 'blocked')
RETURNING task, flow, queue

-- name: cancel_running
UPDATE errands_jobs SET cancel_requested = 1 WHERE id = :id AND status = 'running'

-- name: requeue
UPDATE errands_jobs
SET status = CASE WHEN blocked_by > 0 THEN 'blocked' ELSE 'queued' END, attempts = 0, eta = :now,
    result = NULL, error = NULL, traceback = NULL,
    progress = NULL, progress_message = NULL, started_at = NULL, finished_at = NULL,
    worker_id = NULL, cancel_requested = 0, lost_leases = 0
WHERE id = :id AND (status = 'succeeded' OR status = 'failed' OR status = 'cancelled')
RETURNING flow

-- name: get
SELECT * FROM errands_jobs WHERE id = ?

-- name: list_jobs
SELECT * FROM errands_jobs
WHERE (:status IS NULL OR status = :status) AND (:queue IS NULL OR queue = :queue)
ORDER BY seq DESC LIMIT :limit OFFSET :offset

-- name: counts
SELECT queue, status, count(*) FROM errands_jobs
WHERE status IN ('blocked', 'queued', 'scheduled', 'running') GROUP BY queue, status
UNION ALL
SELECT queue, status, sum(n) FROM (
    SELECT queue, outcome AS status, n FROM errands_finished_counts
    WHERE outcome = 'succeeded' OR outcome = 'failed' OR outcome = 'cancelled'
    UNION ALL
    SELECT queue, status, n FROM errands_finished_totals
)
GROUP BY queue, status HAVING sum(n) > 0

-- name: next_eta
-- A limited job counts as due no earlier than :free_at; the second column says whether one
-- waits (Backend.limited).
SELECT min(CASE WHEN limits IS NULL THEN eta ELSE max(eta, :free_at) END),
    max(limits IS NOT NULL)
FROM errands_jobs WHERE status IN ('queued', 'scheduled') {queue_filter}
    AND queue NOT IN (SELECT queue FROM errands_paused_queues)

-- name: job_page
SELECT * FROM errands_jobs WHERE seq < :before ORDER BY seq DESC LIMIT :limit

-- name: jobs_at
-- The jobs at the positions of a filtered page (base.page_positions), a JSON array.
SELECT * FROM errands_jobs WHERE seq IN (SELECT value FROM json_each(?)) ORDER BY seq DESC

-- name: adjust_total
-- What the per-minute counts do not say: a job that became or stopped being finished
-- other than by an attempt's end (see migrate_hot_*).
INSERT INTO errands_finished_totals (queue, status, n) VALUES (:queue, :status, :n)
ON CONFLICT (queue, status) DO UPDATE SET n = n + excluded.n

-- name: adjust_totals_for_prune
INSERT INTO errands_finished_totals (queue, status, n)
SELECT queue, status, -count(*) FROM errands_jobs
WHERE (status = 'succeeded' OR status = 'failed' OR status = 'cancelled') AND finished_at < ?
GROUP BY queue, status
ON CONFLICT (queue, status) DO UPDATE SET n = n + excluded.n

-- name: adjust_totals_for_purge
INSERT INTO errands_finished_totals (queue, status, n)
SELECT queue, status, -count(*) FROM errands_jobs
WHERE (status = 'succeeded' OR status = 'failed' OR status = 'cancelled')
    AND (:status IS NULL OR status = :status)
    AND (:queue IS NULL OR queue = :queue)
    AND (:before IS NULL OR coalesce(finished_at, enqueued_at) < :before)
GROUP BY queue, status
ON CONFLICT (queue, status) DO UPDATE SET n = n + excluded.n

-- name: pause_queue
INSERT OR IGNORE INTO errands_paused_queues (queue, paused_at) VALUES (?, ?)

-- name: resume_queue
DELETE FROM errands_paused_queues WHERE queue = ?

-- name: paused_queues
SELECT queue FROM errands_paused_queues

-- name: set_schedule_paused
INSERT INTO errands_schedule_states (schedule, paused) VALUES (:schedule, :paused)
ON CONFLICT (schedule) DO UPDATE SET
    since = CASE WHEN paused AND NOT excluded.paused THEN :now ELSE since END,
    paused = excluded.paused

-- name: set_schedule_timing
INSERT INTO errands_schedule_states (schedule, every, cron, since)
VALUES (:schedule, :every, :cron, :now)
ON CONFLICT (schedule) DO UPDATE SET
    every = excluded.every, cron = excluded.cron, since = excluded.since

-- name: schedule_states
SELECT schedule, paused, every, cron, since FROM errands_schedule_states

-- name: finished_counts
SELECT minute, queue, task, outcome, n FROM errands_finished_counts
WHERE minute >= ? AND outcome NOT LIKE '%:%'
ORDER BY minute, queue, task, outcome

-- name: enqueued_counts
-- Through the page index, grouped in its order: no temporary b-tree, no table row read.
SELECT queue, task, sum(n) FROM (
    SELECT queue, task, count(*) AS n FROM errands_jobs INDEXED BY errands_jobs_pages
    GROUP BY status, queue, task
    UNION ALL
    SELECT queue, task, n FROM errands_deleted_counts
)
GROUP BY queue, task

-- name: count_deleted_for_prune
INSERT INTO errands_deleted_counts (queue, task, n)
SELECT queue, task, count(*) FROM errands_jobs
WHERE (status = 'succeeded' OR status = 'failed' OR status = 'cancelled') AND finished_at < ?
GROUP BY queue, task
ON CONFLICT (queue, task) DO UPDATE SET n = n + excluded.n

-- name: count_deleted_for_purge
INSERT INTO errands_deleted_counts (queue, task, n)
SELECT queue, task, count(*) FROM errands_jobs
WHERE status != 'running'
    AND (:status IS NULL OR status = :status)
    AND (:queue IS NULL OR queue = :queue)
    AND (:before IS NULL OR coalesce(finished_at, enqueued_at) < :before)
GROUP BY queue, task
ON CONFLICT (queue, task) DO UPDATE SET n = n + excluded.n

-- name: count_deleted_for_delete
INSERT INTO errands_deleted_counts (queue, task, n)
SELECT queue, task, 1 FROM errands_jobs
WHERE id = ? AND (status = 'succeeded' OR status = 'failed' OR status = 'cancelled')
ON CONFLICT (queue, task) DO UPDATE SET n = n + excluded.n

-- name: timings
SELECT substr(outcome, 1, instr(outcome, ':') - 1) AS timing, queue, task,
    CAST(substr(outcome, instr(outcome, ':') + 1) AS INTEGER) AS bucket, sum(n), sum(seconds)
FROM errands_finished_counts WHERE outcome LIKE '%:%'
GROUP BY outcome, queue, task

-- name: sample_depth
INSERT OR IGNORE INTO errands_depth_samples (minute, sample)
SELECT :minute, json_group_array(json_array(queue, status, n)) FROM (
    SELECT queue, status, count(*) AS n FROM errands_jobs
    WHERE status IN ('queued', 'scheduled', 'running') GROUP BY queue, status
)
WHERE NOT EXISTS (SELECT 1 FROM errands_depth_samples WHERE minute = :minute)

-- name: depth_samples
SELECT minute, sample FROM errands_depth_samples WHERE minute >= ?

-- name: roll_up_figures
-- Minute 0 keeps the counts of every minute pruned, so totals since the start stay known.
INSERT INTO errands_finished_counts (minute, queue, task, outcome, n, seconds)
SELECT 0, queue, task, outcome, sum(n), sum(seconds) FROM errands_finished_counts
WHERE minute > 0 AND minute < ? GROUP BY queue, task, outcome
ON CONFLICT (minute, queue, task, outcome) DO UPDATE
SET n = n + excluded.n, seconds = seconds + excluded.seconds

-- name: prune_figures
DELETE FROM errands_finished_counts WHERE minute > 0 AND minute < ?

-- name: prune_samples
DELETE FROM errands_depth_samples WHERE minute < ?

-- name: fire_tick
INSERT OR IGNORE INTO errands_ticks (schedule, fire_time, fired_at) VALUES (?, ?, ?)

-- name: set_tick_job
UPDATE errands_ticks SET job_id = ? WHERE schedule = ? AND fire_time = ?

-- name: last_ticks
SELECT schedule, max(fire_time) AS fire_time, job_id FROM errands_ticks GROUP BY schedule

-- name: prune_jobs
DELETE FROM errands_jobs
WHERE (status = 'succeeded' OR status = 'failed' OR status = 'cancelled') AND finished_at < ?

-- name: prune_ticks
DELETE FROM errands_ticks
WHERE fired_at < ? AND fire_time < (
    SELECT max(t.fire_time) FROM errands_ticks AS t WHERE t.schedule = errands_ticks.schedule
)

-- name: purge
DELETE FROM errands_jobs
WHERE status != 'running'
    AND (:status IS NULL OR status = :status)
    AND (:queue IS NULL OR queue = :queue)
    AND (:before IS NULL OR coalesce(finished_at, enqueued_at) < :before)

-- name: adjust_totals_for_delete
INSERT INTO errands_finished_totals (queue, status, n)
SELECT queue, status, -1 FROM errands_jobs
WHERE id = ? AND (status = 'succeeded' OR status = 'failed' OR status = 'cancelled')
ON CONFLICT (queue, status) DO UPDATE SET n = n + excluded.n

-- name: delete_job
DELETE FROM errands_jobs
WHERE id = ? AND (status = 'succeeded' OR status = 'failed' OR status = 'cancelled')

-- name: register_worker
INSERT INTO errands_workers (id, info, expires_at) VALUES (?, ?, ?)
ON CONFLICT (id) DO UPDATE SET info = excluded.info, expires_at = excluded.expires_at

-- name: unregister_worker
DELETE FROM errands_workers WHERE id = ?

-- name: list_workers
SELECT id, info FROM errands_workers WHERE expires_at > ? ORDER BY id

-- name: prune_workers
DELETE FROM errands_workers WHERE expires_at <= ?
