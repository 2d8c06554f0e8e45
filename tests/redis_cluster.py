"""A real three-master Redis Cluster for the tests: `redis-server` processes on loopback ports.

Use it through pytest: a test module says ``pytest_plugins = ["tests.redis_cluster"]`` and asks
for `redis_cluster` (session-wide: the nodes, started once) or `redis_cluster_url` (the same
cluster, flushed before and after the test). `running_cluster()` is the plain context manager
behind them, for scripts and benchmarks.

The nodes are ordinary processes in temp dirs (no persistence: ``--save "" --appendonly no``);
they are stopped and their dirs removed when the session ends, even when a test fails.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

HOST = "127.0.0.1"
BUS_OFFSET = 10000  # Redis Cluster's bus listens on port + 10000


@dataclass
class RedisClusterNodes:
    """The started cluster: its startup nodes and the URL `pbmigrate.cache.client.connect` takes."""

    nodes: list[tuple[str, int]]
    root: Path
    procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in self.nodes)

    def node_client(self, index: int) -> redis.Redis:
        host, port = self.nodes[index]
        return redis.Redis(host=host, port=port, decode_responses=True)

    def flushall(self) -> None:
        """Empty every master (a cluster has no logical dbs to isolate tests with)."""
        for i in range(len(self.nodes)):
            with self.node_client(i) as client:
                client.flushall()
                client.script_flush()


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback port nothing listens on (now)."""
    return _pick_ports(1)[0]


def _pick_ports(count: int) -> list[int]:
    """Ports whose cluster-bus twin (port + 10000) is free too; random, so parallel runs rarely clash."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20000, 39999)
        if port not in ports and _free(port) and _free(port + BUS_OFFSET):
            ports.append(port)
    return ports


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError):
            if predicate():
                return
        time.sleep(0.05)
    raise RuntimeError(f"Redis Cluster test fixture: timed out waiting for {what}")


def _start_node(root: Path, port: int) -> subprocess.Popen:
    node_dir = root / str(port)
    node_dir.mkdir()
    args = [
        "redis-server",
        "--port", str(port),
        "--bind", HOST,
        "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", "3000",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(node_dir),
        "--logfile", str(node_dir / "redis.log"),
    ]  # fmt: skip
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(handle: RedisClusterNodes) -> None:
    for proc in handle.procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in handle.procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    shutil.rmtree(handle.root, ignore_errors=True)


def _form(handle: RedisClusterNodes, timeout: float) -> None:
    def up(i: int) -> bool:
        if handle.procs[i].poll() is not None:  # exited: most likely its port was taken meanwhile
            raise RuntimeError(f"redis-server on port {handle.nodes[i][1]} exited")
        with handle.node_client(i) as client:
            return bool(client.ping())

    for i in range(len(handle.procs)):
        _wait(lambda i=i: up(i), timeout, "nodes to start")
    addrs = [f"{h}:{p}" for h, p in handle.nodes]
    created = subprocess.run(
        ["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if created.returncode != 0:
        raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-500:]} {created.stderr[-500:]}")

    def all_ok() -> bool:
        for i in range(len(handle.nodes)):
            with handle.node_client(i) as client:
                info = client.execute_command("CLUSTER INFO")
            if isinstance(info, str):  # redis-py parses it into a dict; older versions give the text
                info = dict(line.split(":", 1) for line in info.split() if ":" in line)
            if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != len(handle.nodes):
                return False
        return True

    _wait(all_ok, timeout, "cluster_state:ok on every node")


@contextlib.contextmanager
def running_cluster(masters: int = 3, timeout: float = 30.0) -> Iterator[RedisClusterNodes]:
    """Start `masters` cluster-mode redis-servers, form the cluster, yield it, stop and clean up."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        raise RuntimeError("redis-server and redis-cli are needed for the Redis Cluster tests (make services)")
    for attempt in range(3):  # another process may grab a port between picking and binding it
        root = Path(tempfile.mkdtemp(prefix="pbm-redis-cluster-"))
        ports = _pick_ports(masters)
        handle = RedisClusterNodes(nodes=[(HOST, p) for p in ports], root=root)
        try:
            for port in ports:
                handle.procs.append(_start_node(root, port))
            _form(handle, timeout)
        except BaseException as exc:  # never leave a process behind, whatever went wrong
            _stop(handle)
            if attempt == 2 or not isinstance(exc, (RuntimeError, subprocess.TimeoutExpired)):
                raise
            continue
        try:
            yield handle
        finally:
            _stop(handle)
        return


@contextlib.contextmanager
def running_server(timeout: float = 15.0) -> Iterator[str]:
    """A private standalone redis-server (for tests that kill connections or the server itself);
    yields its URL and removes it afterwards."""
    root = Path(tempfile.mkdtemp(prefix="pbm-redis-"))
    port = _pick_ports(1)[0]
    args = ["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
            "--dir", str(root), "--logfile", str(root / "redis.log")]  # fmt: skip
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    handle = RedisClusterNodes(nodes=[(HOST, port)], root=root, procs=[proc])
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {port} exited")
            with handle.node_client(0) as client:
                return bool(client.ping())

        _wait(up, timeout, "the private redis-server")
        yield f"redis://{HOST}:{port}/0"
    finally:
        _stop(handle)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    """A real three-master Redis Cluster for the whole test session."""
    with running_cluster() as handle:
        yield handle


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterNodes) -> Iterator[str]:
    """The session cluster's URL, emptied before and after the test."""
    redis_cluster.flushall()
    yield redis_cluster.url
    redis_cluster.flushall()
