"""A store with RabbitMQ as its transport: the broker delivers jobs, the store keeps them.

``ERRANDS_BROKER_URL`` wraps the store ``ERRANDS_URL`` names in a
:class:`BrokeredBackend`, which the engine uses like any other backend:

- The store is the source of truth; a message is a worker's early word of a
  job. ``enqueue`` returns once the store holds the records (``EnqueueError``
  if it cannot), after one persistent message per due job is handed to
  RabbitMQ without waiting for its confirm. A message RabbitMQ loses, or one
  not sent because it is away, costs only time: every worker claims through
  the store and polls it when idle, so the job is run all the same.
- ``reserve`` claims through the store's own claim (priorities, leases, lost
  leases, paused queues and any limit the store applies hold as they are), and
  ties each claimed job to a delivery of its queue: the message stays unacked
  while the job runs and is acked only once its outcome is stored
  (``finish``), or handed back (``release``). A worker that dies leaves its
  messages unacked; RabbitMQ re-delivers them, and a re-delivery claims the
  job again once its lease has lapsed.
- A delivery no claim took is settled by its job's state: a finished, missing,
  blocked or not-yet-due job's message is acked (dropped); one whose job is
  due but refused (its queue paused, a limit reached) or running elsewhere is
  held for :data:`HOLD` seconds and handed back, so it returns once the job may run.
- Jobs not yet due (``countdown``, ``at=``, retry back-off) stay in the store.
  One worker of the deployment, the holder of RabbitMQ's exclusive queue
  ``errands.leader``, publishes each when it falls due: once per job and eta,
  whatever the number of workers.
- Idle workers are woken by deliveries, not by the store's notifications.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ..exceptions import BackendUnavailable
from ..limits import Limit
from .base import (
    BLOCKED,
    DEFAULT_MAX_LOST_LEASES,
    FINISHED,
    QUEUED,
    SCHEDULED,
    SUCCEEDED,
    Backend,
    Cursor,
    Flow,
    JobRecord,
    ScheduleState,
    Timing,
    logger,
)
from .rabbitmq import Consumer, Delivery, Publisher

#: How long a delivery whose job may not run yet is held before RabbitMQ gets it back.
HOLD = 1.0
#: How often the leader looks for jobs that fell due.
PROMOTE_INTERVAL = 0.2
#: How many scheduled jobs the leader looks at per turn.
PROMOTE_SCAN = 5000
#: How many finished jobs a process remembers, to drop their late deliveries without a look.
REMEMBER_FINISHED = 10_000
#: How often a worker serving every queue looks for queues it does not consume yet.
QUEUE_REFRESH = 2.0

Message = tuple[str, str, int]


class Publishes(Protocol):
    def publish(self, messages: Sequence[Message], /) -> None: ...


def message_of(record: JobRecord) -> Message:
    return (record.queue, record.id, record.priority)


class BrokeredBackend(Backend):
    """``store`` keeps the jobs; RabbitMQ at ``broker_url`` carries them to the workers."""

    def __init__(self, store: Backend, broker_url: str) -> None:
        self.store = store
        super().__init__()
        self.url = store.url
        self.broker_url = broker_url
        self._publisher = Publisher(broker_url)
        self._consumer: Consumer | None = None
        self._serves_all = False
        self._lock = threading.Lock()
        #: Deliveries not tied to a job yet, with when they came, oldest first.
        self._inbox: list[tuple[float, Delivery]] = []
        #: Deliveries held back until a time, then handed back.
        self._held: list[tuple[float, Delivery]] = []
        #: The delivery each running job of this process was tied to, by lease token.
        self._tickets: dict[str, Delivery | None] = {}
        #: This process's running jobs: their lease token and their record as claimed.
        self._running: dict[str, tuple[str, JobRecord]] = {}
        #: Jobs this process finished lately, oldest first: their late deliveries are dropped.
        self._finished: OrderedDict[str, None] = OrderedDict()
        #: What the leader published for jobs that fell due: job id -> eta.
        self._promoted: dict[str, float] = {}
        self._next_promote = 0.0
        #: Whether the last publish failed (an outage is said once).
        self._unpublished = False
        self._next_refresh = 0.0

    # -- life of a job -------------------------------------------------------

    def expect_limits(self) -> None:
        self.store.expect_limits()  # the store claims, so it is the one to look at limits

    def enqueue(self, jobs: Sequence[JobRecord]) -> list[JobRecord]:
        stored = self.store.enqueue(jobs)
        fresh = [record for record, job in zip(stored, jobs, strict=True) if record.id == job.id]
        due = [r for r in fresh if r.status == QUEUED]
        self._publish_quietly(due, "new jobs")
        if due:
            self._notify()  # this process's own workers need not wait for the delivery
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
        self._consume(queues, limit)
        records = self.store.reserve(
            queues, limit, worker_id, lease_seconds, now, max_lost_leases=max_lost_leases
        )
        with self._lock:
            inbox, self._inbox = self._inbox, []
            for record in records:
                ticket = _take(inbox, record)
                self._tickets[record.lease_token or ""] = ticket
                self._running[record.id] = (record.lease_token or "", record)
            left = []
            for arrived, delivery in inbox:
                mine = self._running.get(delivery.job_id)
                if mine is not None and self._tickets.get(mine[0]) is None:
                    self._tickets[mine[0]] = delivery  # claimed before its message came
                else:
                    left.append((arrived, delivery))
            if len(records) >= limit:
                self._inbox = left  # more may be due: the next reserve looks again
                left = []
        for _, delivery in left:
            self._settle(delivery)
        return records

    def _settle(self, delivery: Delivery) -> None:
        """Drop a delivery no claim took if its job needs none; else hold it, to hand back."""
        consumer = self._consumer
        try:
            job = self.store.get(delivery.job_id)
        except BackendUnavailable:
            needed = True  # not known now: kept, and asked about again after the hold
        else:
            done = job is None or job.status in FINISHED or job.status == BLOCKED
            later = job is not None and job.status in (QUEUED, SCHEDULED) and job.eta > time.time()
            needed = not (done or later)
        if consumer is None:
            return
        if needed:
            with self._lock:
                self._held.append((time.monotonic() + HOLD, delivery))
        else:
            consumer.ack(delivery)

    def heartbeat(self, leases: Mapping[str, str], lease_seconds: float, now: float) -> set[str]:
        return self.store.heartbeat(leases, lease_seconds, now)

    def set_progress(self, job_id: str, progress: float | None, message: str | None) -> None:
        self.store.set_progress(job_id, progress, message)

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
        applied = self.store.finish(
            job_id,
            lease_token,
            status,
            now,
            result=result,
            error=error,
            traceback=traceback,
            eta=eta,
        )
        ticket, record = self._forget(job_id, lease_token, done=applied and status in FINISHED)
        if ticket is not None and self._consumer is not None:
            self._consumer.ack(ticket)
        if applied and status == SUCCEEDED and record is not None and record.flow:
            self._publish_next(Flow.loads(record.flow))
        return applied

    def _publish_next(self, flow: Flow) -> None:
        """Publish the workflow steps a finished step made due."""
        steps = [self.store.get(job_id) for job_id, _ in flow.next]
        self._publish_quietly(
            [s for s in steps if s is not None and s.status == QUEUED], "workflow steps"
        )

    def _publish_quietly(self, records: Sequence[JobRecord], what: str) -> None:
        """Publish jobs the store holds already; if RabbitMQ is away, workers poll for them.

        An outage is said once, and its end once.
        """
        try:
            self._publisher.publish([message_of(r) for r in records])
        except BackendUnavailable as exc:
            if not self._unpublished:
                logger.warning("errands: could not publish %s (%s); workers will poll", what, exc)
            self._unpublished = True
        else:
            if self._unpublished and records:
                logger.warning("errands: publishing to RabbitMQ again")
                self._unpublished = False

    def _forget(
        self, job_id: str, lease_token: str, *, done: bool = False
    ) -> tuple[Delivery | None, JobRecord | None]:
        """Untie a job's run from this process; ``done``: remember the job finished."""
        with self._lock:
            if done:
                self._finished[job_id] = None
                if len(self._finished) > REMEMBER_FINISHED:
                    self._finished.popitem(last=False)
            ticket = self._tickets.pop(lease_token, None)
            running = self._running.get(job_id)
            if running is not None and running[0] == lease_token:
                del self._running[job_id]
                return ticket, running[1]
        return ticket, None

    def release(self, job_id: str, lease_token: str, now: float) -> bool:
        released = self.store.release(job_id, lease_token, now)
        ticket, record = self._forget(job_id, lease_token)
        if ticket is not None and self._consumer is not None:
            self._consumer.requeue(ticket)
        elif released and record is not None:
            self._publish_quietly([record], f"released job {job_id}")
        return released

    def cancel(self, job_id: str, now: float) -> JobRecord | None:
        return self.store.cancel(job_id, now)

    def requeue(self, job_id: str, now: float) -> JobRecord | None:
        record = self.store.requeue(job_id, now)
        with self._lock:
            self._finished.pop(job_id, None)
        if record is not None and record.status == QUEUED:
            self._publish_quietly([record], f"job {job_id}")
        return record

    def step_inputs(self, job_id: str) -> dict[int, str]:
        return self.store.step_inputs(job_id)

    def shares_database(self, cursor: Cursor) -> bool:
        return self.store.shares_database(cursor)

    def enqueue_in(self, cursor: Cursor, jobs: Sequence[JobRecord]) -> list[JobRecord]:
        # Published by no one: the app commits after this returns. Workers find them by polling.
        return self.store.enqueue_in(cursor, jobs)

    # -- looking at jobs -----------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        return self.store.get(job_id)

    def list_jobs(
        self, status: str | None = None, queue: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[JobRecord]:
        return self.store.list_jobs(status, queue, limit, offset)

    def job_page(
        self,
        status: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        *,
        limit: int = 50,
        before: int | None = None,
    ) -> tuple[list[JobRecord], int | None]:
        return self.store.job_page(status, queue, task, limit=limit, before=before)

    def counts(self) -> dict[tuple[str, str], int]:
        return self.store.counts()

    def next_eta(self, queues: Sequence[str] | None) -> float | None:
        return self.store.next_eta(queues)

    # -- queues and schedules ------------------------------------------------

    def pause_queue(self, queue: str, now: float) -> None:
        self.store.pause_queue(queue, now)

    def resume_queue(self, queue: str) -> None:
        self.store.resume_queue(queue)

    def paused_queues(self) -> set[str]:
        return self.store.paused_queues()

    def set_schedule_paused(self, schedule: str, paused: bool, now: float) -> None:
        self.store.set_schedule_paused(schedule, paused, now)

    def set_schedule_timing(
        self, schedule: str, every: float | None, cron: str | None, now: float
    ) -> None:
        self.store.set_schedule_timing(schedule, every, cron, now)

    def schedule_states(self) -> dict[str, ScheduleState]:
        return self.store.schedule_states()

    # -- figures -------------------------------------------------------------

    def finished_counts(self, since_minute: int) -> list[tuple[int, str, str, str, int]]:
        return self.store.finished_counts(since_minute)

    def limit_usage(self, limits: Sequence[Limit], now: float) -> dict[str, tuple[int, int]]:
        return self.store.limit_usage(limits, now)

    def enqueued_counts(self) -> dict[tuple[str, str], int]:
        return self.store.enqueued_counts()

    def timings(self) -> dict[tuple[str, str, str], Timing]:
        return self.store.timings()

    def sample_depth(self, now: float) -> bool:
        return self.store.sample_depth(now)

    def depth_samples(self, since_minute: int) -> dict[int, dict[tuple[str, str], int]]:
        return self.store.depth_samples(since_minute)

    # -- housekeeping --------------------------------------------------------

    def fire_tick(self, schedule: str, fire_time: float, job: JobRecord, now: float) -> bool:
        fired = self.store.fire_tick(schedule, fire_time, job, now)
        if fired and job.status == QUEUED:
            self._publish_quietly([job], f"the job of schedule {schedule}")
        return fired

    def last_ticks(self) -> dict[str, tuple[float, str | None]]:
        return self.store.last_ticks()

    def prune(self, finished_before: float) -> int:
        return self.store.prune(finished_before)

    def purge(
        self, status: str | None = None, queue: str | None = None, before: float | None = None
    ) -> int:
        return self.store.purge(status, queue, before)

    def delete(self, job_id: str) -> bool:
        return self.store.delete(job_id)

    def register_worker(
        self, worker_id: str, info: Mapping[str, Any], ttl: float, now: float
    ) -> None:
        self.store.register_worker(worker_id, info, ttl, now)

    def unregister_worker(self, worker_id: str) -> None:
        """The worker of this process stopped: so does its consumer, acking what it ran."""
        consumer = self._consumer
        if consumer is not None:
            consumer.stop()
            with self._lock:
                if self._consumer is consumer:
                    self._consumer = None  # a worker started later consumes anew
        self.store.unregister_worker(worker_id)

    def list_workers(self, now: float) -> list[dict[str, Any]]:
        return self.store.list_workers(now)

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.stop()
        self._publisher.close()
        self.store.close()

    # -- the consumer ----------------------------------------------------------

    def _consume(self, queues: Sequence[str] | None, prefetch: int) -> None:
        """Start consuming ``queues`` (every known queue if None) on the first reserve."""
        if self._consumer is not None:
            return
        with self._lock:
            if self._consumer is not None:
                return
            self._serves_all = queues is None
            consumer = Consumer(
                self.broker_url, prefetch, self._delivered, self._lost, chore=self._chores
            )
            self._consumer = consumer
        consumer.start(self._known_queues() if queues is None else queues)

    def _known_queues(self) -> set[str]:
        try:
            return {"default"} | {queue for queue, _ in self.store.counts()}
        except BackendUnavailable:
            return {"default"}

    def _delivered(self, delivery: Delivery) -> None:
        """On the consumer's thread: tie a delivery to its job if it runs here, drop it if
        the job finished here, else keep it for the next reserve and wake the workers."""
        with self._lock:
            finished = delivery.job_id in self._finished
            if not finished:
                mine = self._running.get(delivery.job_id)
                if mine is not None and mine[0] in self._tickets and not self._tickets[mine[0]]:
                    self._tickets[mine[0]] = delivery  # claimed before its message came
                    return
                self._inbox.append((time.monotonic(), delivery))
        if finished and self._consumer is not None:
            self._consumer.ack(delivery)  # came after its job was claimed from the store and run
        elif not finished:
            self._notify()

    def _lost(self) -> None:
        """The consumer's connection dropped: its deliveries are RabbitMQ's again."""
        with self._lock:
            self._inbox.clear()
            self._held.clear()
            for token in self._tickets:
                self._tickets[token] = None

    def _chores(self, leader: Publishes | None) -> None:
        """On the consumer's thread: hand back held deliveries; lead if this process does."""
        consumer = self._consumer
        assert consumer is not None
        now = time.monotonic()
        with self._lock:
            due = [d for until, d in self._held if until <= now]
            self._held = [(until, d) for until, d in self._held if until > now]
            # Not taken by a reserve in time (its worker is busy or gone): for other workers.
            due += [d for arrived, d in self._inbox if arrived + HOLD <= now]
            self._inbox = [(arrived, d) for arrived, d in self._inbox if arrived + HOLD > now]
        for delivery in due:
            consumer.requeue(delivery)
        if self._serves_all and now >= self._next_refresh:
            self._next_refresh = now + QUEUE_REFRESH
            consumer.add_queues(self._known_queues())
        if leader is not None and now >= self._next_promote:
            self._next_promote = now + PROMOTE_INTERVAL
            try:
                self._promote(leader, time.time())
            except BackendUnavailable as exc:
                logger.debug("errands: could not look for jobs falling due: %s", exc)

    def _promote(self, leader: Publishes, now: float) -> None:
        """Publish the scheduled jobs that fell due, each once per eta."""
        eta = self.store.next_eta(None)
        if eta is None or eta > now:
            self._promoted.clear()
            return
        waiting = self.store.list_jobs(status=SCHEDULED, limit=PROMOTE_SCAN)
        due = [r for r in waiting if r.eta <= now and self._promoted.get(r.id) != r.eta]
        leader.publish([message_of(r) for r in due])
        still = {r.id for r in waiting}
        self._promoted = {k: v for k, v in self._promoted.items() if k in still}
        self._promoted.update((r.id, r.eta) for r in due)


def _take(inbox: list[tuple[float, Delivery]], record: JobRecord) -> Delivery | None:
    """The job's own delivery, taken out of ``inbox``, if it has come."""
    for i, (_, delivery) in enumerate(inbox):
        if delivery.job_id == record.id:
            return inbox.pop(i)[1]
    return None
