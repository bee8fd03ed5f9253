"""Private Redis and PostgreSQL servers for tests and benchmarks.

Each starts on 127.0.0.1 on a free port with its data in a temp dir, and is stopped
(and its data removed) on exit. When the binaries are missing the caller is skipped
with the reason, unless ``KEYHIVE_REQUIRE_SERVERS=1`` (CI), which makes it a failure.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Server", "postgres_server", "redis_server", "require_or_skip"]


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    data_dir: str = ""


def require_or_skip(reason: str) -> None:
    """Skip the caller (a test or benchmark), or fail when servers are required."""
    if os.environ.get("KEYHIVE_REQUIRE_SERVERS") == "1":
        raise RuntimeError(f"KEYHIVE_REQUIRE_SERVERS=1 but {reason}")
    import pytest

    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def start_redis(port: int, data_dir: str, *extra: str) -> subprocess.Popen[bytes]:
    """Start (or restart, on the same port and dir) a private redis-server."""
    binary = shutil.which("redis-server")
    assert binary is not None
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", data_dir, "--protected-mode", "yes", "--daemonize", "no", "--loglevel", "warning",
         *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    _wait_port(port, 10, proc)
    return proc


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def redis_server(*extra: str) -> Iterator[Server]:
    """A private redis-server for the duration of the block; ``extra`` are more server flags."""
    if shutil.which("redis-server") is None:
        require_or_skip("redis-server is not installed (apt-get install redis-server)")
    data_dir = tempfile.mkdtemp(prefix="keyhive-redis-")
    port = free_port()
    server = Server(f"redis://127.0.0.1:{port}/0", port, start_redis(port, data_dir, *extra), data_dir)
    try:
        yield server
    finally:
        stop(server.process)
        shutil.rmtree(data_dir, ignore_errors=True)


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@contextlib.contextmanager
def postgres_server(*, durable: bool = False) -> Iterator[Server]:
    """A private PostgreSQL cluster (trust auth, user postgres) for the duration of the block.

    Tests run it without fsync (fast); ``durable=True`` keeps PostgreSQL's own defaults
    (fsync, synchronous_commit=on), which is what benchmarks should measure.
    """
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        require_or_skip("PostgreSQL is not installed (apt-get install postgresql)")
    assert initdb is not None and pg_ctl is not None
    data_dir = tempfile.mkdtemp(prefix="keyhive-pg-")
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the cluster as 'postgres'
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            require_or_skip("running as root and there is no 'postgres' user to run PostgreSQL as")
        os.chown(data_dir, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    db = os.path.join(data_dir, "db")
    log = os.path.join(data_dir, "log")

    def run(*cmd: str) -> None:
        subprocess.run([*prefix, *cmd], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    try:
        run(initdb, "-D", db, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        run(pg_ctl, "-D", db, "-l", log, "-w", "-t", "30", "start", "-o",
            f"-p {port} -k {data_dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
            + ("" if durable else " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"))
        _wait_port(port, 30)
        yield Server(f"postgresql://postgres@127.0.0.1:{port}/postgres", port, None, db)
    finally:
        with contextlib.suppress(Exception):
            run(pg_ctl, "-D", db, "-m", "immediate", "-w", "stop")
        shutil.rmtree(data_dir, ignore_errors=True)
