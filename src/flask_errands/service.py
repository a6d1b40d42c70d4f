"""A worker and its scheduler, started and stopped as one.

The embedded worker and ``flask errands worker`` both run a :class:`Service`,
built by the app's runtime, so the two never differ in how they start, stop
or fire periodic jobs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .scheduler import Scheduler
from .worker import Worker

if TYPE_CHECKING:
    from .backends.outbox import Relay


class Service:
    """Job threads plus, optionally, the scheduler and the outbox relay."""

    def __init__(
        self, worker: Worker, scheduler: Scheduler | None, relay: Relay | None = None
    ) -> None:
        self.worker = worker
        self.scheduler = scheduler
        self.relay = relay

    def start(self) -> Service:
        """Start the job threads, the scheduler and the relay; returns at once."""
        self.worker.start()
        if self.scheduler is not None:
            self.scheduler.start()
        if self.relay is not None:
            self.relay.start()
        return self

    def stop(self, grace: float, *, wait: bool = True) -> None:
        """Stop firing ticks at once, stop taking jobs, and give running ones ``grace`` s.

        With ``wait=False`` this only asks; :meth:`join` waits for the stop to complete.
        """
        if self.scheduler is not None:
            self.scheduler.stop(wait=False)
        if self.relay is not None:
            self.relay.stop(wait=False)
        self.worker.stop(grace, wait=wait)

    def join(self) -> None:
        """Wait until a requested stop has finished."""
        self.worker.join()
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.relay is not None:
            self.relay.stop()

    @property
    def running(self) -> bool:
        return self.worker.running

    @property
    def stuck(self) -> bool:
        """True when a job ignored its timeout and the worker quit to have it killed."""
        return self.worker.stuck

    @property
    def jobs_done(self) -> int:
        return self.worker.jobs_done

    def active_jobs(self) -> list[str]:
        """Ids of the jobs running now."""
        return self.worker.active_jobs()
