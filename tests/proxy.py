"""A loopback TCP proxy whose links can go silent or lose replies, for network-fault tests.

``Proxy(port)`` listens on 127.0.0.1 at a free port and forwards every
connection to ``127.0.0.1:port``. Its ``mode`` can be changed at any time:

- ``"forward"``: bytes flow both ways.
- ``"silent"``: every socket stays open and nothing is forwarded either way; bytes
  wait in the kernel's buffers, as behind a firewall that drops packets or a dead
  NAT, until the mode changes back. The kernel still acknowledges what it buffers,
  so TCP keepalives cannot tell: only an application-level deadline can.
- ``"drop_replies"``: what clients send reaches the server, what the server
  answers is thrown away, as when a reply is lost on its way back.

It never stops the server behind it, and it closes itself (and every socket)
after ``lifetime`` seconds, so a forgotten proxy cannot outlive its test.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time

MODES = ("forward", "silent", "drop_replies")
#: How often each pump looks up from its socket to see the mode or a stop.
POLL = 0.02
CHUNK = 65536


class Proxy:
    """Forward 127.0.0.1:``self.port`` to 127.0.0.1:``target_port`` in the current ``mode``."""

    def __init__(self, target_port: int, lifetime: float = 300.0) -> None:
        self.target = ("127.0.0.1", target_port)
        self.mode = "forward"
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(POLL * 5)
        self.port: int = self._listener.getsockname()[1]
        self._stopped = threading.Event()
        self._deadline = time.monotonic() + lifetime
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, name="proxy-accept", daemon=True)]
        self._threads[0].start()

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.mode = mode

    def url(self, scheme_and_auth: str, rest: str = "") -> str:
        """A URL to this proxy, e.g. ``url("postgresql://postgres@", "/test")``."""
        return f"{scheme_and_auth}127.0.0.1:{self.port}{rest}"

    def close(self) -> None:
        """Stop forwarding and close every socket, so clients see their connections end."""
        self._stopped.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in [self._listener, *sockets]:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)

    def _done(self) -> bool:
        return self._stopped.is_set() or time.monotonic() > self._deadline

    def _accept(self) -> None:
        while not self._done():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            for source, sink, upstream in ((client, server, True), (server, client, False)):
                pump = threading.Thread(
                    target=self._pump,
                    args=(source, sink, upstream),
                    name="proxy-pump",
                    daemon=True,
                )
                pump.start()
                self._threads.append(pump)
        if not self._stopped.is_set():
            threading.Thread(target=self.close, daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        """Copy ``source`` to ``sink`` as the mode says, until either end closes."""
        sink.settimeout(5)
        try:
            while not self._done():
                mode = self.mode
                if mode == "silent":
                    time.sleep(POLL)
                    continue
                readable, _, _ = select.select([source], [], [], POLL)
                if not readable:
                    continue
                data = source.recv(CHUNK)
                if not data:
                    break
                if upstream or self.mode == "forward":
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
