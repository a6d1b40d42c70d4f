"""A RabbitMQ server of a test's own, on ports 5680-5689 (each pytest-xdist worker
has ten of its own: ``PORTS``), to stop and start at will.

Never the machine's shared broker (rabbit@localhost on 5672): this one has its
own node name (``errands-test-*@localhost``), port, configuration and data
folder, so stopping it touches nothing else. Its data survives a restart, as
a real broker's durable queues and persistent messages do.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from tests.helpers import unavailable, worker_ports

PORTS = worker_ports(5680, 10)
#: The server script itself: the one on PATH hands over to another user through ``su``,
#: in a session of its own that a signal to the test's process group would miss.
SCRIPT = "/usr/lib/rabbitmq/bin/rabbitmq-server"


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


class RabbitServer:
    """``rabbitmq-server`` in the foreground, in a folder of its own."""

    def __init__(self, folder: Path) -> None:
        script = SCRIPT if os.path.exists(SCRIPT) else shutil.which("rabbitmq-server")
        if script is None:
            unavailable("rabbitmq-server is not installed")
        self.script = script
        free = [port for port in PORTS if _port_is_free(port) and _port_is_free(port + 20000)]
        if not free:
            unavailable(f"no free port among {PORTS}")
        self.port = free[0]
        self.folder = folder
        self.node = f"errands-test-{uuid.uuid4().hex[:6]}@localhost"
        (folder / "mnesia").mkdir(parents=True)
        (folder / "log").mkdir()
        (folder / "enabled_plugins").write_text("[].\n")
        (folder / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.port + 20000),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(folder / "mnesia" / "feature_flags"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(folder / "mnesia" / "plugins"),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def start(self, timeout: float = 180.0) -> None:
        """Start the server and wait until it takes AMQP connections."""
        import pika

        with open(self.folder / "server.out", "ab") as out:
            self.proc = subprocess.Popen(
                [self.script],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server ended:\n{self.output()}")
            if not _port_is_free(self.port):
                with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                    pika.BlockingConnection(pika.URLParameters(self.url)).close()
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"rabbitmq-server did not come up:\n{self.output()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server (SIGTERM to its process group: a clean shutdown) and wait."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        while not _port_is_free(self.port):
            time.sleep(0.05)

    def output(self) -> str:
        return (self.folder / "server.out").read_text(errors="replace")[-4000:]
