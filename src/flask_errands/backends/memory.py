"""``memory://``: jobs in this process only, nothing kept across a restart.

The reference implementation of :class:`~flask_errands.backends.base.Backend`:
every other backend must behave as this one does under the conformance suite.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import threading
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from ..exceptions import DuplicateJob
from ..limits import Gate, Limit
from .base import (
    BLOCKED,
    CANCELLED,
    DEFAULT_MAX_LOST_LEASES,
    FAILED,
    FINISHED,
    LIVE,
    OUTCOMES,
    QUEUED,
    RUNNING,
    SCHEDULED,
    SUCCEEDED,
    UPSTREAM_FAILED_PREFIX,
    WAITING,
    Backend,
    Flow,
    JobRecord,
    ScheduleState,
    Timing,
    bucket_of,
    claimed_only,
    minute_of,
    random_id,
    upstream_failed,
    worker_lost_error,
)

_HeapEntry = tuple[int, float, int, str]
_DelayedEntry = tuple[float, int, int, str]


def _copy(job: JobRecord) -> JobRecord:
    """A copy of a record, so callers never share the stored one.

    Every field is an immutable value, so a shallow copy of the attributes is a
    full one; it is six times cheaper than ``dataclasses.replace``, and every
    enqueue, reservation and lookup makes one.
    """
    copied = object.__new__(JobRecord)
    copied.__dict__.update(job.__dict__)
    return copied


class MemoryBackend(Backend):
    """A dict of jobs and one heap of waiting jobs per queue, behind one lock."""

    def __init__(self, url: str = "memory://") -> None:
        super().__init__()
        self.url = url
        self._lock = threading.Lock()
        self._jobs: dict[str, JobRecord] = {}
        self._seq: dict[str, int] = {}
        self._counter = itertools.count()
        # Per queue: jobs due by now in priority order, and jobs not yet due in eta order
        # (moved over as they fall due), so a delayed urgent job never hides a due one.
        self._ready: dict[str, list[_HeapEntry]] = {}
        self._delayed: dict[str, list[_DelayedEntry]] = {}
        self._unique: dict[str, str] = {}
        self._running: set[str] = set()
        self._ticks: dict[tuple[str, float], tuple[float, str | None]] = {}
        self._workers: dict[str, tuple[float, dict[str, Any]]] = {}
        self._paused: set[str] = set()
        #: The rate-limit start log: how many starts each limit key has had, and the times
        #: of the latest of them, oldest first (``limits.Gate``).
        self._started: dict[str, int] = {}
        self._start_log: dict[str, collections.deque[float]] = {}
        self._schedule_states: dict[str, ScheduleState] = {}
        self._finished_counts: dict[tuple[int, str, str, str], int] = {}
        self._depth: dict[int, dict[tuple[str, str], int]] = {}
        self._enqueued: dict[tuple[str, str], int] = {}
        self._timings: dict[tuple[str, str, str], Timing] = {}
        #: Workflow steps' inputs: ``{job id: {position: result JSON}}``.
        self._inputs: dict[str, dict[int, str]] = {}

    def enqueue(self, jobs: Sequence[JobRecord]) -> list[JobRecord]:
        with self._lock:
            stored = self._insert(jobs)
        self._notify()
        return stored

    def reserve(
        self,
        queues: Sequence[str] | None,
        limit: int,
        worker_id: str,
        lease_seconds: float,
        now: float,
        *,
        max_lost_leases: int = DEFAULT_MAX_LOST_LEASES,
    ) -> list[JobRecord]:
        claimed: list[JobRecord] = []
        given_up: list[JobRecord] = []
        with self._lock:
            gate = Gate(now, partial(self._running_of, now), self._starts_of, limit)
            for job_id in self._running:
                job = self._jobs[job_id]
                if (
                    len(claimed) + len(given_up) < limit
                    and (job.lease_expires_at or 0) <= now
                    and (queues is None or job.queue in queues)
                    and job.queue not in self._paused
                ):
                    if job.lost_leases + 1 >= max_lost_leases:
                        job.lost_leases += 1
                        given_up.append(job)
                    elif gate.admit(job.limits):
                        job.lost_leases += 1
                        claimed.append(job)
            for job in given_up:
                self._count(job, "failed", now)
                self._give_up(job, now)
            names = list(self._delayed if queues is None else queues)
            heaps = [
                self._promote(name, now)
                for name in names
                if name in self._delayed and name not in self._paused
            ]
            held: list[JobRecord] = []
            while len(claimed) < limit:
                due = self._pop_due(heaps)
                if due is None:
                    break
                (claimed if gate.admit(due.limits) else held).append(due)
            for job in held:  # back in their place, for the next claim
                entry = (-job.priority, job.eta, self._seq[job.id], job.id)
                heapq.heappush(self._ready[job.queue], entry)
            for job in claimed:
                job.status = RUNNING
                job.attempts += 1
                job.started_at = now
                job.lease_expires_at = now + lease_seconds
                job.lease_token = random_id()
                job.worker_id = worker_id
                self._running.add(job.id)
            for key, starts, keep_from in gate.log():
                log = self._start_log.setdefault(key, collections.deque())
                log.extend(at for _, at in starts)
                done = self._started[key] = starts[-1][0] + 1
                while keep_from is not None and len(log) > done - keep_from:
                    log.popleft()
            self.limit_free_at = gate.free_at
            if given_up:
                claimed_only([_copy(job) for job in given_up])  # logs them
            return [_copy(job) for job in claimed]

    def _running_of(self, now: float, kind: str, name: str) -> int:
        """Jobs of a task (or queue) running under a live lease, for a :class:`Gate`."""
        return sum(
            1
            for job_id in self._running
            if getattr(job := self._jobs[job_id], kind) == name
            and (job.lease_expires_at or 0) > now
        )

    def _starts_of(self, key: str, rate: int, window: int) -> tuple[int, dict[int, float]]:
        done, log = self._started.get(key, 0), self._start_log.get(key, collections.deque())
        oldest = done - len(log)  # the number of the first start the log holds
        first = max(done - rate, oldest)
        return done, {n: log[n - oldest] for n in range(first, min(done - rate + window, done))}

    def limit_usage(self, limits: Sequence[Limit], now: float) -> dict[str, tuple[int, int]]:
        with self._lock:
            usage = {}
            for limit in limits:
                log = self._start_log.get(limit.key, collections.deque())
                since = now - (limit.per or 0.0)
                recent = sum(1 for at in log if at > since) if limit.per else 0
                usage[limit.key] = (self._running_of(now, limit.kind, limit.name), recent)
            return usage

    def heartbeat(self, leases: Mapping[str, str], lease_seconds: float, now: float) -> set[str]:
        cancelled = set()
        with self._lock:
            for job_id, token in leases.items():
                job = self._jobs.get(job_id)
                if job is None or job.status != RUNNING or job.lease_token != token:
                    continue
                job.lease_expires_at = now + lease_seconds
                if job.cancel_requested:
                    cancelled.add(job_id)
        return cancelled

    def set_progress(self, job_id: str, progress: float | None, message: str | None) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None:
                job.progress, job.progress_message = progress, message

    def finish(
        self,
        job_id: str,
        lease_token: str,
        status: str,
        now: float,
        *,
        result: str | None = None,
        error: str | None = None,
        traceback: str | None = None,
        eta: float | None = None,
    ) -> bool:
        with self._lock:
            job = self._owned(job_id, lease_token)
            if job is None:
                return False
            self._running.discard(job_id)
            status = job.status = str(status)  # plain, even when given a JobStatus
            self._count(job, status, now)
            job.result, job.error, job.traceback = result, error, traceback
            job.lease_expires_at = job.lease_token = None
            job.lost_leases = 0
            due = status == SCHEDULED
            if due:
                job.eta = now if eta is None else eta
                self._push(job)
            else:
                job.finished_at = now
                self._forget_unique(job)
                due = self._advance(job, now)
        if due:
            self._notify()
        return True

    def release(self, job_id: str, lease_token: str, now: float) -> bool:
        with self._lock:
            job = self._owned(job_id, lease_token)
            if job is None:
                return False
            self._running.discard(job_id)
            job.status = QUEUED
            job.attempts -= 1
            job.lost_leases = 0
            job.started_at = job.lease_expires_at = job.lease_token = job.worker_id = None
            self._push(job)
        self._notify()
        return True

    def cancel(self, job_id: str, now: float) -> JobRecord | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job.status in WAITING or job.status == BLOCKED:
                job.status = CANCELLED
                job.finished_at = now
                self._forget_unique(job)
                self._advance(job, now)
            elif job.status == RUNNING:
                job.cancel_requested = True
            return _copy(job)

    def requeue(self, job_id: str, now: float) -> JobRecord | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job.status in FINISHED:
                if self._live_unique(job.unique_key) is not None:
                    return _copy(job)
                job.result = job.error = job.traceback = job.progress_message = None
                job.progress = job.started_at = job.finished_at = job.worker_id = None
                job.status, job.attempts, job.eta, job.cancel_requested = QUEUED, 0, now, False
                job.lost_leases = 0
                if job.unique_key is not None:
                    self._unique[job.unique_key] = job.id
                if job.blocked_by > 0:
                    job.status = BLOCKED
                else:
                    self._push(job)
                self._revive(job)
            result = _copy(job)
        self._notify()
        return result

    def step_inputs(self, job_id: str) -> dict[int, str]:
        with self._lock:
            return dict(self._inputs.get(job_id, {}))

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else _copy(job)

    def list_jobs(
        self,
        status: str | None = None,
        queue: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[JobRecord]:
        with self._lock:
            matching = [
                job
                for job in self._jobs.values()
                if (status is None or job.status == status)
                and (queue is None or job.queue == queue)
            ]
            matching.sort(key=lambda job: self._seq[job.id], reverse=True)
            return [_copy(job) for job in matching[offset : offset + limit]]

    def job_page(
        self,
        status: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        *,
        limit: int = 50,
        before: int | None = None,
    ) -> tuple[list[JobRecord], int | None]:
        with self._lock:
            matching = sorted(
                (
                    (self._seq[job.id], job)
                    for job in self._jobs.values()
                    if (status is None or job.status == status)
                    and (queue is None or job.queue == queue)
                    and (task is None or job.task == task)
                    and (before is None or self._seq[job.id] < before)
                ),
                key=lambda entry: entry[0],
                reverse=True,
            )
            page = matching[:limit]
            more = len(matching) > limit
            return [_copy(job) for _, job in page], page[-1][0] if more else None

    def counts(self) -> dict[tuple[str, str], int]:
        totals: dict[tuple[str, str], int] = {}
        with self._lock:
            for job in self._jobs.values():
                key = (job.queue, job.status)
                totals[key] = totals.get(key, 0) + 1
        return totals

    def next_eta(self, queues: Sequence[str] | None) -> float | None:
        # The heaps hold every waiting job (and some stale entries): far fewer than _jobs,
        # which keeps finished jobs until they are pruned. An idle worker asks this often.
        with self._lock:
            free_at = self.limit_free_at or 0.0
            etas = [
                entry[1] if self._jobs[entry[3]].limits is None else max(entry[1], free_at)
                for name, heap in self._ready.items()
                if (queues is None or name in queues) and name not in self._paused
                for entry in heap
                if self._current(entry)
            ]
            for name, delayed in self._delayed.items():
                while delayed and (queues is None or name in queues) and name not in self._paused:
                    entry = delayed[0]
                    if self._current((entry[1], entry[0], entry[2], entry[3])):
                        etas.append(entry[0])
                        break
                    heapq.heappop(delayed)
        return min(etas, default=None)

    def pause_queue(self, queue: str, now: float) -> None:
        with self._lock:
            self._paused.add(queue)

    def resume_queue(self, queue: str) -> None:
        with self._lock:
            self._paused.discard(queue)
        self._notify()

    def paused_queues(self) -> set[str]:
        with self._lock:
            return set(self._paused)

    def set_schedule_paused(self, schedule: str, paused: bool, now: float) -> None:
        with self._lock:
            state = self._schedule_states.get(schedule, ScheduleState())
            since = now if state.paused and not paused else state.since
            self._schedule_states[schedule] = dataclasses.replace(
                state, paused=paused, since=since
            )

    def set_schedule_timing(
        self, schedule: str, every: float | None, cron: str | None, now: float
    ) -> None:
        with self._lock:
            state = self._schedule_states.get(schedule, ScheduleState())
            self._schedule_states[schedule] = dataclasses.replace(
                state, every=every, cron=cron, since=now
            )

    def schedule_states(self) -> dict[str, ScheduleState]:
        with self._lock:
            return dict(self._schedule_states)

    def finished_counts(self, since_minute: int) -> list[tuple[int, str, str, str, int]]:
        with self._lock:
            return sorted(
                (*key, n) for key, n in self._finished_counts.items() if key[0] >= since_minute
            )

    def enqueued_counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._enqueued)

    def timings(self) -> dict[tuple[str, str, str], Timing]:
        with self._lock:
            return {
                key: Timing(list(timing.buckets), timing.total)
                for key, timing in self._timings.items()
            }

    def sample_depth(self, now: float) -> bool:
        minute = minute_of(now)
        with self._lock:
            if minute in self._depth:
                return False
            sample: dict[tuple[str, str], int] = {}
            for job_id in self._running:
                key = (self._jobs[job_id].queue, RUNNING)
                sample[key] = sample.get(key, 0) + 1
            for job in self._jobs.values():
                if job.status in WAITING:
                    key = (job.queue, job.status)
                    sample[key] = sample.get(key, 0) + 1
            self._depth[minute] = sample
            return True

    def depth_samples(self, since_minute: int) -> dict[int, dict[tuple[str, str], int]]:
        with self._lock:
            return {
                minute: dict(sample)
                for minute, sample in self._depth.items()
                if minute >= since_minute
            }

    def fire_tick(self, schedule: str, fire_time: float, job: JobRecord, now: float) -> bool:
        with self._lock:
            if (schedule, fire_time) in self._ticks:
                return False
            stored = self._insert([job])[0]
            self._ticks[(schedule, fire_time)] = (now, stored.id)
        self._notify()
        return True

    def last_ticks(self) -> dict[str, tuple[float, str | None]]:
        latest: dict[str, tuple[float, str | None]] = {}
        with self._lock:
            for (schedule, fire_time), (_, job_id) in self._ticks.items():
                if schedule not in latest or fire_time > latest[schedule][0]:
                    latest[schedule] = (fire_time, job_id)
        return latest

    def prune(self, finished_before: float) -> int:
        with self._lock:
            old = [
                job_id
                for job_id, job in self._jobs.items()
                if job.status in FINISHED and (job.finished_at or 0) < finished_before
            ]
            self._delete(old)
        latest = {(name, at) for name, (at, _) in self.last_ticks().items()}
        with self._lock:
            self._workers = {
                worker_id: entry
                for worker_id, entry in self._workers.items()
                if entry[0] > finished_before
            }
            self._ticks = {
                key: value
                for key, value in self._ticks.items()
                if value[0] >= finished_before or key in latest
            }
            cut = minute_of(finished_before)
            kept: dict[tuple[int, str, str, str], int] = {}
            for (minute, queue, task, outcome), n in self._finished_counts.items():
                key = (minute if minute >= cut else 0, queue, task, outcome)
                kept[key] = kept.get(key, 0) + n
            self._finished_counts = kept
            self._depth = {minute: s for minute, s in self._depth.items() if minute >= cut}
        return len(old)

    def purge(
        self, status: str | None = None, queue: str | None = None, before: float | None = None
    ) -> int:
        with self._lock:
            doomed = [
                job.id
                for job in self._jobs.values()
                if job.status != RUNNING
                and (status is None or job.status == status)
                and (queue is None or job.queue == queue)
                and (before is None or (job.finished_at or job.enqueued_at) < before)
            ]
            self._delete(doomed)
        return len(doomed)

    def delete(self, job_id: str) -> bool:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.status not in FINISHED:
                return False
            self._delete([job_id])
        return True

    def register_worker(
        self, worker_id: str, info: Mapping[str, Any], ttl: float, now: float
    ) -> None:
        with self._lock:
            self._workers[worker_id] = (now + ttl, {**info, "id": worker_id})

    def unregister_worker(self, worker_id: str) -> None:
        with self._lock:
            self._workers.pop(worker_id, None)

    def list_workers(self, now: float) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(info) for expires, info in self._workers.values() if expires > now]

    # -- internals, called with the lock held --------------------------------

    def _count(self, job: JobRecord, status: str, now: float) -> None:
        """Add an attempt that ended so to its minute's count, and its duration and wait to
        their histograms, as every store's finish does."""
        key = (minute_of(now), job.queue, job.task, OUTCOMES[status])
        self._finished_counts[key] = self._finished_counts.get(key, 0) + 1
        started = now if job.started_at is None else job.started_at
        self._time("duration", job, now - started)
        self._time("wait", job, started - job.eta)

    def _time(self, timing: str, job: JobRecord, seconds: float) -> None:
        """Add one value to a histogram of :meth:`timings`."""
        key = (timing, job.queue, job.task)
        found = self._timings.get(key)
        if found is None:
            found = self._timings[key] = Timing()
        seconds = max(seconds, 0.0)
        found.buckets[bucket_of(seconds)] += 1
        found.total += seconds

    def _insert(self, jobs: Sequence[JobRecord]) -> list[JobRecord]:
        taken = [job.id for job in jobs if job.id in self._jobs]
        if taken or len({job.id for job in jobs}) < len(jobs):
            raise DuplicateJob(f"job id already stored: {(taken or [jobs[-1].id])[0]}")
        stored = []
        for job in jobs:
            existing = self._live_unique(job.unique_key)
            if existing is not None:
                stored.append(_copy(existing))
                continue
            job = _copy(job)
            key = (job.queue, job.task)
            self._enqueued[key] = self._enqueued.get(key, 0) + 1
            self._jobs[job.id] = job
            self._seq[job.id] = next(self._counter)
            if job.unique_key is not None:
                self._unique[job.unique_key] = job.id
            if job.status != BLOCKED:
                self._push(job)
            stored.append(_copy(job))
        return stored

    def _push(self, job: JobRecord) -> None:
        entry = (job.eta, -job.priority, self._seq[job.id], job.id)
        heapq.heappush(self._delayed.setdefault(job.queue, []), entry)
        self._ready.setdefault(job.queue, [])

    def _promote(self, queue: str, now: float) -> list[_HeapEntry]:
        """Move the jobs of ``queue`` that are due at ``now`` to its ready heap; return it."""
        delayed, ready = self._delayed[queue], self._ready[queue]
        while delayed and delayed[0][0] <= now:
            eta, priority, seq, job_id = heapq.heappop(delayed)
            heapq.heappush(ready, (priority, eta, seq, job_id))
        return ready

    def _pop_due(self, heaps: list[list[_HeapEntry]]) -> JobRecord | None:
        """Pop the best ready job across ``heaps``; stale heap entries are dropped."""
        best: list[_HeapEntry] | None = None
        for heap in heaps:
            while heap and not self._current(heap[0]):
                heapq.heappop(heap)
            if heap and (best is None or heap[0] < best[0]):
                best = heap
        if best is None:
            return None
        return self._jobs[heapq.heappop(best)[3]]

    def _current(self, entry: _HeapEntry) -> bool:
        job = self._jobs.get(entry[3])
        return (
            job is not None
            and job.status in WAITING
            and job.eta == entry[1]
            and self._seq[job.id] == entry[2]
        )

    def _give_up(self, job: JobRecord, now: float) -> None:
        """Fail a running job whose workers kept dying under it, as reserve does."""
        self._running.discard(job.id)
        job.status, job.finished_at = FAILED, now
        job.error = worker_lost_error(job.worker_id, job.attempts, job.lost_leases)
        job.traceback = job.lease_expires_at = job.lease_token = None
        self._forget_unique(job)
        self._advance(job, now)

    def _advance(self, job: JobRecord, now: float) -> bool:
        """Move a finished step's workflow on (see ``Backend.finish``); True if a step fell due."""
        if job.flow is None:
            return False
        links = Flow.loads(job.flow).next
        if job.status == SUCCEEDED:
            due = False
            for step_id, position in links:
                step, inputs = self._jobs.get(step_id), self._inputs.setdefault(step_id, {})
                if step is None or position in inputs:
                    continue
                inputs[position] = job.result or "null"
                step.blocked_by -= 1  # even if cancelled: a re-run of its upstream revives it
                if step.status == BLOCKED and step.blocked_by <= 0:
                    step.status = SCHEDULED if step.eta > now else QUEUED
                    self._push(step)
                    due = True
            return due
        error = upstream_failed(job.id, job.task, job.status)
        for step in self._downstream(links, BLOCKED):
            step.status, step.finished_at, step.error = CANCELLED, now, error
        return False

    def _revive(self, job: JobRecord) -> None:
        """Block again the steps downstream of a re-run step that its failure cancelled."""
        if job.flow is None:
            return
        for step in self._downstream(Flow.loads(job.flow).next, CANCELLED, UPSTREAM_FAILED_PREFIX):
            step.status, step.finished_at, step.error = BLOCKED, None, None

    def _downstream(
        self, links: tuple[tuple[str, int], ...], status: str, error_prefix: str = ""
    ) -> list[JobRecord]:
        """The steps reachable through ``links`` (and theirs) that are in ``status``."""
        found: dict[str, JobRecord] = {}
        pending = [step_id for step_id, _ in links]
        while pending:
            step = self._jobs.get(pending.pop())
            if (
                step is None
                or step.id in found
                or step.status != status
                or not (step.error or "").startswith(error_prefix)
            ):
                continue
            found[step.id] = step
            if step.flow is not None:
                pending.extend(step_id for step_id, _ in Flow.loads(step.flow).next)
        return list(found.values())

    def _owned(self, job_id: str, lease_token: str) -> JobRecord | None:
        job = self._jobs.get(job_id)
        if job is None or job.status != RUNNING or job.lease_token != lease_token:
            return None
        return job

    def _live_unique(self, key: str | None) -> JobRecord | None:
        if key is None:
            return None
        job = self._jobs.get(self._unique.get(key, ""))
        return job if job is not None and job.status in LIVE else None

    def _delete(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            job = self._jobs.pop(job_id)
            del self._seq[job_id]
            self._inputs.pop(job_id, None)
            self._forget_unique(job)

    def _forget_unique(self, job: JobRecord) -> None:
        if job.unique_key is not None and self._unique.get(job.unique_key) == job.id:
            del self._unique[job.unique_key]
