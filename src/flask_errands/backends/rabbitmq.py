"""RabbitMQ as the transport: durable priority queues, persistent messages, a consumer thread.

Built on pika. Each thread that publishes (``.delay()`` in a web request, a
worker's retry) has its own ``BlockingConnection``, so no lock serialises the
threads of a web server; a publish is a write to its socket, unconfirmed, as
the store holds the job already (see :mod:`.brokered`). Consuming happens on one thread of
its own, which owns its connection: it takes deliveries, applies acks asked
for by other threads, and reconnects by itself with a growing pause after a
broker restart or a cut connection (heartbeats find a silent one).

Queues are classic durable queues with ``x-max-priority``: quorum queues only
know two priorities (normal and high), and errands tasks have many. A message
says which job it is for (its id as body); the store holds everything else.
A queue ``emails`` is RabbitMQ's ``errands.emails`` (the URL's ``?prefix=``
changes ``errands.``, for deployments that share a virtual host).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pika
import pika.exceptions
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from ..exceptions import BackendUnavailable
from .urls import hide_password

logger = logging.getLogger("flask_errands")

#: The highest RabbitMQ priority; errands priorities above it are delivered as this one.
MAX_PRIORITY = 9
#: Heartbeats of the consumer's and publishers' connections: a silent link is found in ~2x.
HEARTBEAT = 5
#: How long connecting (TCP, AMQP handshake) may take before a publish gives up.
CONNECT_TIMEOUT = 5.0
#: The longest pause between two tries at reconnecting the consumer.
MAX_RECONNECT_PAUSE = 5.0
#: How often the consumer thread looks up from the socket for chores (acks wake it at once).
TICK = 0.05
#: A publisher connection unused this long is checked before a publish (RabbitMQ may have
#: dropped it: pika sends heartbeats only while it is used).
IDLE_CHECK = 1.0
#: After a failed connect, how long publishes skip RabbitMQ (the store poll finds their jobs).
RETRY_CONNECT = 1.0

#: The errors of a connection or channel that is gone or refused, as pika raises them.
LINK_ERRORS: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPError,
    AMQPConnectorException,  # a handshake that timed out or failed
    OSError,
)


#: pika's loggers that report a connection lost or closed, as errors.
PIKA_LOGGERS = (
    "pika.adapters.base_connection",
    "pika.adapters.blocking_connection",
    "pika.adapters.utils.io_services_utils",
)


class _Muted(logging.Filter):
    """Drops pika's records in a thread that is inside :func:`_pika_errors_muted`."""

    local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "muted", False)


_MUTED = _Muted()
for _name in PIKA_LOGGERS:
    logging.getLogger(_name).addFilter(_MUTED)


@contextlib.contextmanager
def _pika_errors_muted() -> Iterator[None]:
    """Silence pika in this thread: it calls a connection dropped while idle an error."""
    _MUTED.local.muted = True
    try:
        yield
    finally:
        _MUTED.local.muted = False


#: What the names of a deployment's RabbitMQ queues start with, unless the URL's ``?prefix=`` says.
DEFAULT_PREFIX = "errands."


def split_url(url: str) -> tuple[str, str]:
    """``url`` without its ``prefix`` query parameter (pika's own are kept), and that prefix.

    Deployments that share a virtual host keep apart by their prefixes: each has
    its own queues and its own leader.
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((value for key, value in query if key == "prefix"), DEFAULT_PREFIX)
    rest = urlencode([(key, value) for key, value in query if key != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefix


def amqp_queue(prefix: str, queue: str) -> str:
    """The RabbitMQ queue for the errands queue ``queue``; AMQP names end at 255 bytes.

    A name too long is shortened to its start and a digest of the whole, the
    same in every process.
    """
    full = prefix + queue
    if len(full.encode()) <= 255:
        return full
    digest = hashlib.sha256(queue.encode()).hexdigest()[:32]
    start = full.encode()[: 255 - 33].decode(errors="ignore")
    return f"{start}~{digest}"


def amqp_priority(priority: int) -> int:
    """An errands priority (any int, higher first) as a RabbitMQ one, 0 to :data:`MAX_PRIORITY`."""
    return max(0, min(MAX_PRIORITY, priority))


@dataclass(frozen=True)
class Delivery:
    """A message for ``job_id`` taken from ``queue`` by the consumer's connection ``epoch``."""

    job_id: str
    queue: str
    tag: int
    epoch: int
    redelivered: bool


def _parameters(url: str) -> pika.URLParameters:
    """pika's parameters for ``url``; a ``?heartbeat=`` in it wins over :data:`HEARTBEAT`."""
    params = pika.URLParameters(split_url(url)[0])
    if "heartbeat" not in dict(parse_qsl(urlsplit(url).query)):
        params.heartbeat = HEARTBEAT
    params.socket_timeout = CONNECT_TIMEOUT
    params.stack_timeout = CONNECT_TIMEOUT
    params.blocked_connection_timeout = CONNECT_TIMEOUT
    params.connection_attempts = 1
    return params


def _declare(channel: pika.adapters.blocking_connection.BlockingChannel, full_name: str) -> None:
    channel.queue_declare(full_name, durable=True, arguments={"x-max-priority": MAX_PRIORITY})


def _publish(
    channel: pika.adapters.blocking_connection.BlockingChannel,
    declared: set[str],
    prefix: str,
    messages: Sequence[tuple[str, str, int]],
) -> None:
    """Publish ``(queue, job_id, priority)`` messages, persistent, declaring queues once."""
    for name, job_id, priority in messages:
        full_name = amqp_queue(prefix, name)
        if full_name not in declared:
            _declare(channel, full_name)
            declared.add(full_name)
        channel.basic_publish(
            "",
            full_name,
            job_id.encode(),
            pika.BasicProperties(
                delivery_mode=pika.DeliveryMode.Persistent, priority=amqp_priority(priority)
            ),
        )


class Publisher:
    """Publishes over one connection per thread (pika connections are not shared), unconfirmed.

    A message only tells a worker early about a job the store holds already,
    so a publish waits for no confirm: one lost in a broker crash, or never
    sent while RabbitMQ was away, is found by the workers' store poll instead.
    After a failed connect, publishing is skipped for :data:`RETRY_CONNECT`
    seconds, so ``.delay()`` stays quick while RabbitMQ is down.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = split_url(url)[1]
        self._params = _parameters(url)
        self._local = threading.local()
        self._all: list[pika.BlockingConnection] = []
        self._lock = threading.Lock()
        self._retry_at = 0.0

    def publish(self, messages: Sequence[tuple[str, str, int]]) -> None:
        """Publish ``(queue, job_id, priority)`` messages, persistent.

        A connection found dead is replaced and the publish tried once more;
        raises :class:`BackendUnavailable` if RabbitMQ cannot be reached or refuses.
        """
        if not messages:
            return
        for attempt in (1, 2):
            fresh = getattr(self._local, "channel", None) is None
            try:
                channel = self._channel()
                if time.monotonic() - self._local.used > IDLE_CHECK:
                    with _pika_errors_muted():  # a link RabbitMQ dropped meanwhile is found here
                        channel.connection.process_data_events(time_limit=0)
                _publish(channel, self._local.declared, self.prefix, messages)
                self._local.used = time.monotonic()
                return
            except LINK_ERRORS as exc:
                self._drop()
                if fresh or attempt == 2:
                    raise BackendUnavailable(
                        f"RabbitMQ at {hide_password(self.url)} did not take the message: "
                        f"{type(exc).__name__} {exc}".strip()
                    ) from exc

    def _channel(self) -> pika.adapters.blocking_connection.BlockingChannel:
        channel = getattr(self._local, "channel", None)
        if channel is None or channel.is_closed:
            if time.monotonic() < self._retry_at:
                raise pika.exceptions.AMQPConnectionError("not retried yet after a failed connect")
            try:
                connection = pika.BlockingConnection(self._params)
            except LINK_ERRORS:
                self._retry_at = time.monotonic() + RETRY_CONNECT
                raise
            channel = connection.channel()
            self._local.channel, self._local.declared = channel, set()
            self._local.used = time.monotonic()
            with self._lock:
                self._all.append(connection)
        return channel

    def _drop(self) -> None:
        channel = getattr(self._local, "channel", None)
        self._local.channel = None
        if channel is not None:
            with self._lock:
                if channel.connection in self._all:
                    self._all.remove(channel.connection)
            close_quietly(channel.connection)

    def close(self) -> None:
        with self._lock:
            connections, self._all = self._all, []
        for connection in connections:
            close_quietly(connection)


def close_quietly(connection: pika.BlockingConnection) -> None:
    """Close our own connection, open or found dead, without pika logging it as an error."""
    with _pika_errors_muted(), contextlib.suppress(Exception):
        if connection.is_open:
            connection.close()


class Consumer:
    """One thread that keeps a consuming connection up and hands deliveries to ``on_delivery``.

    Acks and rejections asked for from other threads (:meth:`ack`, :meth:`requeue`)
    are applied on the consumer's thread. A delivery of an earlier connection
    (``epoch``) cannot be acked any more: RabbitMQ has requeued it already.
    """

    def __init__(
        self,
        url: str,
        prefetch: int,
        on_delivery: Callable[[Delivery], None],
        on_lost: Callable[[], None],
        chore: Callable[[Publisher | None], None] | None = None,
    ) -> None:
        self.url = url
        self.prefix = split_url(url)[1]
        self.prefetch = max(1, prefetch)
        self.epoch = 0
        self._params = _parameters(url)
        self._on_delivery = on_delivery
        self._on_lost = on_lost
        self._chore = chore
        self._queues: set[str] = set()
        self._consuming: set[str] = set()
        self._replies: queue.SimpleQueue[tuple[int, int, bool]] = queue.SimpleQueue()
        self._connection: pika.BlockingConnection | None = None
        self._waking = False
        #: Tags of the current connection's deliveries not acked or rejected yet.
        self._unsettled: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="errands-rabbitmq", daemon=True)
        self.connected = threading.Event()

    def start(self, queues: Iterable[str]) -> Consumer:
        self._queues.update(queues)
        self._thread.start()
        return self

    def add_queues(self, queues: Iterable[str]) -> None:
        """Consume from these queues too, from the next turn of the consumer's loop."""
        self._queues.update(queues)

    def ack(self, delivery: Delivery) -> None:
        self._replies.put((delivery.epoch, delivery.tag, True))
        if self._replies.qsize() * 2 >= self.prefetch:
            self._wake()  # half the window waits for its acks: send them now, as one

    def requeue(self, delivery: Delivery) -> None:
        self._replies.put((delivery.epoch, delivery.tag, False))
        self._wake()

    def _wake(self) -> None:
        """Have the consumer's thread send the replies now, not at its next tick.

        An unacked message counts against the prefetch: RabbitMQ delivers no
        more while the window is full.
        """
        connection = self._connection
        if connection is None or self._waking:
            return
        self._waking = True
        with contextlib.suppress(Exception):  # closed meanwhile: its deliveries are void
            connection.add_callback_threadsafe(self._nothing)

    @staticmethod
    def _nothing() -> None:
        """A callback that only ends the consumer's wait for the socket."""

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        pause, down_since = 0.2, None
        while not self._stop.is_set():
            connection = None
            try:
                connection = pika.BlockingConnection(self._params)
                self._connection = connection
                self._unsettled = set()
                self.epoch += 1
                self._consuming = set()
                channel = connection.channel()
                channel.basic_qos(prefetch_count=self.prefetch)
                leader = _Leader(connection, self.prefix)
                self.connected.set()
                if down_since is not None:
                    logger.warning("errands: RabbitMQ at %s is back", hide_password(self.url))
                pause, down_since = 0.2, None
                while not self._stop.is_set():
                    self._subscribe(channel)
                    connection.process_data_events(time_limit=TICK)
                    self._reply(channel)
                    if self._chore is not None:
                        self._chore(leader.publisher())
                self._reply(channel)  # the acks of the last jobs, not left to a re-delivery
            except LINK_ERRORS as exc:
                self.connected.clear()
                self._on_lost()
                if down_since is None:
                    down_since = time.monotonic()
                    logger.warning(
                        "errands: lost RabbitMQ at %s (%s); reconnecting",
                        hide_password(self.url),
                        f"{type(exc).__name__} {exc}".strip(),
                    )
                self._stop.wait(pause)
                pause = min(pause * 2, MAX_RECONNECT_PAUSE)
            except Exception:
                logger.exception("errands: RabbitMQ consumer error; reconnecting")
                self.connected.clear()
                self._on_lost()
                down_since = down_since or time.monotonic()
                self._stop.wait(1.0)
            finally:
                self._connection = None
                if connection is not None:
                    close_quietly(connection)

    def _subscribe(self, channel: pika.adapters.blocking_connection.BlockingChannel) -> None:
        epoch = self.epoch
        for name in sorted(self._queues - self._consuming):
            full_name = amqp_queue(self.prefix, name)
            _declare(channel, full_name)
            channel.basic_consume(full_name, partial(self._deliver, name, epoch))
            self._consuming.add(name)

    def _deliver(
        self, name: str, epoch: int, _channel: object, method: Any, _props: object, body: bytes
    ) -> None:
        self._unsettled.add(method.delivery_tag)
        delivery = Delivery(body.decode(), name, method.delivery_tag, epoch, method.redelivered)
        self._on_delivery(delivery)

    def _reply(self, channel: pika.adapters.blocking_connection.BlockingChannel) -> None:
        """Send the acks and rejections asked for; one ack covers a run of settled deliveries."""
        self._waking = False
        acks: list[int] = []
        while True:
            try:
                epoch, tag, ack = self._replies.get_nowait()
            except queue.Empty:
                break
            if epoch != self.epoch:
                continue
            if ack:
                acks.append(tag)
            else:
                self._unsettled.discard(tag)
                channel.basic_nack(tag, requeue=True)
        if not acks:
            return
        acks.sort()
        self._unsettled.difference_update(acks)
        first_open = min(self._unsettled, default=acks[-1] + 1)
        covered = bisect.bisect_left(acks, first_open)
        if covered:
            channel.basic_ack(acks[covered - 1], multiple=True)  # every earlier one is settled
        for tag in acks[covered:]:
            channel.basic_ack(tag)


class _Leader:
    """Leadership of a deployment's chores, held as an exclusive queue on one connection.

    Only one connection at a time may hold ``<prefix>~leader``: the first to declare
    it publishes jobs as they fall due, and when its process dies RabbitMQ drops
    the queue, so the next worker to try takes over.
    """

    RETRY = 2.0

    def __init__(self, connection: pika.BlockingConnection, prefix: str) -> None:
        self._connection = connection
        self._prefix = prefix
        self._channel: pika.adapters.blocking_connection.BlockingChannel | None = None
        self._next_try = 0.0
        self._publisher: _ChannelPublisher | None = None

    def publisher(self) -> Publisher | None:
        """A publisher on this connection if it leads, else None (trying again now and then)."""
        if self._publisher is not None:
            return self._publisher  # type: ignore[return-value]
        if time.monotonic() < self._next_try:
            return None
        self._next_try = time.monotonic() + self.RETRY
        channel = self._connection.channel()
        try:
            channel.queue_declare(self._prefix + "~leader", exclusive=True, auto_delete=True)
        except pika.exceptions.ChannelClosedByBroker:
            return None  # RESOURCE_LOCKED: another connection leads
        channel.confirm_delivery()
        self._publisher = _ChannelPublisher(channel, self._prefix)
        return self._publisher  # type: ignore[return-value]


class _ChannelPublisher:
    """Confirmed publishes on the leader's own channel, in the consumer's thread."""

    def __init__(
        self, channel: pika.adapters.blocking_connection.BlockingChannel, prefix: str
    ) -> None:
        self._channel = channel
        self._prefix = prefix
        self._declared: set[str] = set()

    def publish(self, messages: Sequence[tuple[str, str, int]]) -> None:
        _publish(self._channel, self._declared, self._prefix, messages)
