"""Real Redis for tests: the shared one on 127.0.0.1:6379 (own DB number), or a private server.

Import the fixtures into a ``conftest.py`` (``from tests.redis_fixtures import *``). Tests that stop
or restart Redis must use :func:`private_redis` and never touch the shared server.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

SHARED_HOST = "127.0.0.1"
SHARED_PORT = 6379
#: DB numbers reserved for the store and cluster tests.
STORE_DB = 11
CLUSTER_DB = 12

__all__ = [
    "CLUSTER_DB",
    "STORE_DB",
    "RedisServer",
    "delete_prefix",
    "free_port",
    "private_redis",
    "redis_answers",
    "redis_base_url",
    "redis_cluster_url",
    "redis_store_url",
    "unique_prefix",
]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a Redis server answers PING at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A private ``redis-server`` on a free loopback port that a test may stop, kill and restart.

    Args:
        appendonly: persist with AOF (``appendfsync always``) in a private directory, so a restart
            keeps the data; otherwise nothing survives a restart.
    """

    def __init__(self, appendonly: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH; install Redis to run these tests")
        self.binary = binary
        self.port = free_port()
        self.appendonly = appendonly
        self.dir = Path(tempfile.mkdtemp(prefix="bridge-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        """``redis://127.0.0.1:PORT/DB`` for this server."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 15.0) -> None:
        """Start the server (on the same port as before) and wait until it answers PING."""
        if self.proc is not None and self.proc.poll() is None:
            return
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--dir", str(self.dir),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not redis_answers("127.0.0.1", self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not answer in time")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server gracefully (SIGTERM) and wait for it to exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Kill the server (SIGKILL), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def unique_prefix() -> str:
    """A key prefix no other test (or concurrent test run) uses."""
    return f"t{uuid.uuid4().hex[:12]}:"


def _flush(url: str) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_base_url() -> Iterator[str]:
    """``redis://host:port`` of the shared Redis, or of a private one when 6379 does not answer."""
    if redis_answers(SHARED_HOST, SHARED_PORT):
        yield f"redis://{SHARED_HOST}:{SHARED_PORT}"
        return
    server = RedisServer()
    server.start()
    try:
        yield f"redis://127.0.0.1:{server.port}"
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def redis_store_url(redis_base_url: str) -> Iterator[str]:
    """The store tests' database (DB 11), flushed at the start and end of the session."""
    url = f"{redis_base_url}/{STORE_DB}"
    _flush(url)
    yield url
    with contextlib.suppress(redis.RedisError):
        _flush(url)


@pytest.fixture(scope="session")
def redis_cluster_url(redis_base_url: str) -> Iterator[str]:
    """The cluster tests' database (DB 12), flushed at the start and end of the session."""
    url = f"{redis_base_url}/{CLUSTER_DB}"
    _flush(url)
    yield url
    with contextlib.suppress(redis.RedisError):
        _flush(url)


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A private, started redis-server without persistence, for tests that stop or restart it."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (per-test cleanup that leaves concurrent runs alone)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
