"""Waking workers in other processes on the same host, for stores with no notifications.

Each listening process binds a Unix datagram socket in a folder named after
the store; a writer sends one byte to every socket there after it commits.
Idle listeners block in ``recv``, so waiting costs nothing and a wake-up
arrives in microseconds. A socket left by a dead process is removed by the
first writer that finds nobody listening on it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import tempfile
import time
import uuid

#: How long a writer trusts its list of listeners before reading the folder again.
LISTING_TTL = 0.5


class SocketWakeup:
    """Datagram sockets in one folder per store: ``listen()`` to wait, ``send()`` to wake."""

    def __init__(self, store_path: str) -> None:
        digest = hashlib.sha1(os.path.abspath(store_path).encode()).hexdigest()[:16]
        # Under the temp dir, not beside the store: socket paths must stay short.
        self.directory = os.path.join(tempfile.gettempdir(), f"errands-{os.getuid()}-{digest}")
        self._sender: socket.socket | None = None
        self._sender_pid = -1
        self._listeners: list[str] = []
        self._listed_at = -LISTING_TTL

    def listen(self) -> socket.socket:
        """Bind a new listening socket in the folder; the caller closes it with :meth:`close`."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        path = os.path.join(self.directory, f"{os.getpid()}-{uuid.uuid4().hex[:8]}.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        return sock

    @staticmethod
    def close(sock: socket.socket) -> None:
        path = sock.getsockname()
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)

    @staticmethod
    def wait(sock: socket.socket, timeout: float) -> bool:
        """Block until a wake-up arrives or ``timeout`` passes; True if one arrived."""
        sock.settimeout(timeout)
        try:
            sock.recv(64)
        except TimeoutError:
            return False
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while sock.recv(64):  # several writers may have knocked: one wake-up is enough
                pass
        return True

    def send(self) -> None:
        """Wake every listener; never blocks and never raises."""
        now = time.monotonic()
        if now - self._listed_at > LISTING_TTL:
            self._listed_at = now
            try:
                names = os.listdir(self.directory)
            except OSError:
                names = []
            self._listeners = [
                os.path.join(self.directory, n) for n in names if n.endswith(".sock")
            ]
        if not self._listeners:
            return
        sender = self._socket()
        for path in self._listeners:
            try:
                sender.sendto(b"!", path)
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                    with contextlib.suppress(OSError):
                        os.unlink(path)  # its process is gone
                    self._listed_at = -LISTING_TTL
                # EAGAIN: its queue is full of wake-ups already; anything else: the poll backstop

    def shutdown(self) -> None:
        """Close the sending socket (a later :meth:`send` opens another)."""
        if self._sender is not None and self._sender_pid == os.getpid():
            self._sender.close()
        self._sender = None

    def _socket(self) -> socket.socket:
        if self._sender is None or self._sender_pid != os.getpid():
            self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sender.setblocking(False)
            self._sender_pid = os.getpid()
        return self._sender
