"""A Redis Cluster of the tests' own: ``redis-server`` processes on loopback ports."""

from __future__ import annotations

import contextlib
import functools
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.helpers import unavailable, wait_until


def require_free(port: int) -> None:
    """Fail clearly if ``port`` is taken, as by a server an interrupted run left behind."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as redis-server does
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            pytest.fail(f"port {port} is taken (a redis-server left by an earlier run?)")


class RedisServers:
    """``redis-server`` processes of the tests' own, in a scratch directory, by port."""

    def __init__(self, what: str, first: int) -> None:
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            unavailable(f"redis-server and redis-cli are needed for the Redis {what} tests")
        self.directory = Path(tempfile.mkdtemp(prefix=f"errands-{what.lower()}-{first}-"))
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def cli(self, port: int, *command: str) -> str:
        done = subprocess.run(
            ["redis-cli", "-p", str(port), *command], capture_output=True, text=True, timeout=10
        )
        return done.stdout.strip()

    def kill(self, port: int) -> None:
        """SIGKILL one node, as a crash or a pulled plug would."""
        self.processes[port].kill()
        self.processes[port].wait()

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.directory)


class Cluster(RedisServers):
    """``masters`` masters, each with ``replicas`` replicas, on consecutive ports from ``first``.

    Nodes notice a dead peer after ``node_timeout_ms``, and a replica takes over its master.
    """

    def __init__(
        self, first: int, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 1000
    ) -> None:
        super().__init__("Cluster", first)
        self.ports = list(range(first, first + masters * (1 + replicas)))
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms

    @property
    def url(self) -> str:
        """An ERRANDS_URL naming every node, as a deployment would."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports) + "/"

    def start(self) -> Cluster:
        for port in self.ports:
            self.run(port)
        created = subprocess.run(
            [
                *("redis-cli", "--cluster", "create"),
                *(f"127.0.0.1:{port}" for port in self.ports),
                *("--cluster-replicas", str(self.replicas), "--cluster-yes"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if created.returncode != 0:
            self.stop()
            pytest.fail(f"redis-cli --cluster create failed: {created.stdout}{created.stderr}")
        for port in self.ports:
            wait_until(
                functools.partial(self.answers, port, "cluster info", "cluster_state:ok"),
                f"node {port} to see the cluster as ok",
            )
            wait_until(functools.partial(self.replicating, port), f"node {port} to replicate")
        return self

    def run(self, port: int) -> None:
        """Start (or start again) the node on ``port``; nodes-PORT.conf keeps its identity."""
        require_free(port)
        self.processes[port] = subprocess.Popen(
            [
                *("redis-server", "--port", str(port), "--bind", "127.0.0.1"),
                *("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"),
                *("--cluster-node-timeout", str(self.node_timeout_ms)),
                *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
                # A replica syncs at once, not after the 5 s a master waits for others by default.
                *("--repl-diskless-sync-delay", "0"),
                *("--logfile", f"redis-{port}.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(functools.partial(self.answers, port, "ping", "PONG"), f"port {port}")

    def replicating(self, port: int) -> bool:
        """Whether a replica is in sync with its master, or a master has all its replicas."""
        info = self.cli(port, "info", "replication")
        if "role:slave" in info:
            return "master_link_status:up" in info
        return f"connected_slaves:{self.replicas}" in info

    def answers(self, port: int, command: str, wanted: str) -> bool:
        return wanted in self.cli(port, *command.split())

    def master_of(self, key: str) -> int:
        """The port of the master that holds ``key``'s slot, as the live nodes see it."""
        live = next(port for port in self.ports if self.processes[port].poll() is None)
        slot = int(self.cli(live, "cluster", "keyslot", key))
        for line in self.cli(live, "cluster", "nodes").splitlines():
            fields = line.split()
            if "master" in fields[2] and "fail" not in fields[2]:
                for span in fields[8:]:
                    low, _, high = span.partition("-")
                    if low.isdigit() and int(low) <= slot <= int(high or low):
                        return int(fields[1].split(":")[1].split("@")[0])
        raise LookupError(f"no live master holds slot {slot}")

    def move_slot(self, key: str) -> tuple[int, int]:
        """Move ``key``'s slot, keys and all, to another master, as a resharding does."""
        source = self.master_of(key)
        slot = self.cli(source, "cluster", "keyslot", key)
        masters = [
            int(line.split()[1].split(":")[1].split("@")[0])
            for line in self.cli(source, "cluster", "nodes").splitlines()
            if "master" in line.split()[2] and "fail" not in line.split()[2]
        ]
        target = next(port for port in masters if port != source)
        source_id = self.cli(source, "cluster", "myid")
        target_id = self.cli(target, "cluster", "myid")
        self.cli(target, "cluster", "setslot", slot, "importing", source_id)
        self.cli(source, "cluster", "setslot", slot, "migrating", target_id)
        while keys := self.cli(source, "cluster", "getkeysinslot", slot, "100").split():
            self.cli(source, "migrate", "127.0.0.1", str(target), "", "0", "5000", "keys", *keys)
        for port in masters:
            self.cli(port, "cluster", "setslot", slot, "node", target_id)
        return source, target


class Sentinels(RedisServers):
    """A master, its replica and one sentinel watching them (as ``errands``), from ``first``.

    The sentinel alone is the quorum; it calls the master down after
    ``down_after_ms`` without an answer and promotes the replica.
    """

    def __init__(self, first: int, down_after_ms: int = 1000) -> None:
        super().__init__("Sentinel", first)
        self.master, self.replica, self.sentinel = first, first + 1, first + 2
        self.down_after_ms = down_after_ms

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel}/errands"

    def start(self) -> Sentinels:
        self.run(self.master)
        self.run(self.replica, "--replicaof", "127.0.0.1", str(self.master))
        config = self.directory / "sentinel.conf"
        config.write_text(
            f"port {self.sentinel}\nbind 127.0.0.1\ndir {self.directory}\n"
            f"sentinel monitor errands 127.0.0.1 {self.master} 1\n"
            f"sentinel down-after-milliseconds errands {self.down_after_ms}\n"
            "sentinel failover-timeout errands 5000\n"
            # Known from the start: the sentinel would otherwise learn of it from the
            # master's INFO, which it reads every 10 s.
            f"sentinel known-replica errands 127.0.0.1 {self.replica}\n"
        )
        require_free(self.sentinel)
        self.processes[self.sentinel] = subprocess.Popen(
            ["redis-server", str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(
            lambda: (
                "master_link_status:up" in self.cli(self.replica, "info", "replication")
                and str(self.replica) in self.cli(self.sentinel, "sentinel", "replicas", "errands")
            ),
            "the sentinel to see the replica in sync",
        )
        return self

    def run(self, port: int, *extra: str) -> None:
        require_free(port)
        self.processes[port] = subprocess.Popen(
            [
                *("redis-server", "--port", str(port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
                # A replica syncs at once, not after the 5 s a master waits for others by default.
                *("--repl-diskless-sync-delay", "0"),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: self.cli(port, "ping") == "PONG", f"port {port}")

    def master_port(self) -> int:
        """The master's port as the sentinel names it."""
        return int(
            self.cli(self.sentinel, "sentinel", "get-master-addr-by-name", "errands").split()[-1]
        )
