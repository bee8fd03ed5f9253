"""Two web workers on one manager: a real ``uvicorn --workers 2`` of tests/procs/workers_app.py.

Without Ray, the manager's lease (SPEC §10) lets one worker own the rooms: the other
fails at start-up with OwnedElsewhere. uvicorn (>= 0.30) then stops the whole server
(a worker that failed to start stops the parent), so the test pins what matters: the
failure is loud and names the owner, and every message that got a 200 is stored,
none that did not. With Ray (SPEC §11), both workers serve the same room agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

import keyhive
from tests.procs.harness import REPO, child_env
from tests.procs.room import Room
from tests.storage.servers import free_port

httpx = pytest.importorskip("httpx", reason="needs keyhive[test]")
pytest.importorskip("uvicorn", reason="needs keyhive[fastapi]")

N = 40  # messages per client


@contextlib.contextmanager
def _uvicorn(env: dict[str, str], log: Path) -> Any:
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests.procs.workers_app:app", "--workers", "2",
             "--host", "127.0.0.1", "--port", str(port), "--timeout-graceful-shutdown", "10"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: uvicorn and its workers
                proc.wait()


async def _wait_up(client: Any, base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"uvicorn exited at start-up:\n{log.read_text()[-3000:]}"
        with contextlib.suppress(httpx.TransportError):
            if (await client.get(f"{base}/health")).status_code == 200:
                return
        await asyncio.sleep(0.1)
    raise AssertionError(f"uvicorn did not come up:\n{log.read_text()[-3000:]}")


async def _post_all(base: str, name: str, count: int, *, until_refused: bool = False
                    ) -> tuple[list[tuple[str, int, int]], list[str]]:
    """Each of 2 clients posts ``count`` messages on fresh connections: (acked, failed)."""
    acked: list[tuple[str, int, int]] = []
    failed: list[str] = []

    async def client(c: int) -> None:
        async with httpx.AsyncClient(timeout=30, headers={"Connection": "close"}) as http:
            for i in range(count):
                text = f"{name}-{c}-{i}"
                try:
                    reply = await http.post(f"{base}/rooms/lobby", json={"text": text})
                except httpx.TransportError:
                    failed.append(text)
                    if until_refused:
                        return
                    continue
                if reply.status_code == 200:
                    body = reply.json()
                    acked.append((text, body["seq"], body["pid"]))
                else:
                    failed.append(text)

    await asyncio.gather(client(0), client(1))
    return acked, failed


async def _stored(url: str, name: str) -> list[str]:
    async with keyhive.InstanceManager(name, Room, storage=url, _takeover=True) as m:
        messages: list[str] = await m.call("lobby", "messages")
        return messages


@pytest.mark.timeout(120)
async def test_two_workers_without_ray_one_owns_the_rooms_and_nothing_is_lost(tmp_path: Path) -> None:
    """Without Ray, the second worker fails at start-up with OwnedElsewhere naming the first, and stored == acknowledged."""
    url, name, log = f"sqlite:///{tmp_path}/rooms.db", f"rooms-{uuid.uuid4().hex[:6]}", tmp_path / "uv.log"
    env = child_env(ROOMS_STORAGE=url, ROOMS_NAME=name)
    with _uvicorn(env, log) as (proc, base):
        async with httpx.AsyncClient(timeout=5) as probe:
            try:
                await _wait_up(probe, base, proc, log)
                owner = (await probe.get(f"{base}/health")).json()["pid"]
            except AssertionError:
                owner = None  # the server stopped before it could answer: still checked below
        acked, failed = await _post_all(base, name, 10_000, until_refused=True)
        await asyncio.to_thread(proc.wait, 30)
    text = log.read_text()
    assert "OwnedElsewhere" in text and "already running in another process" in text
    if owner is not None:
        assert f"pid {owner}," in text  # the refused worker names the one that owns the rooms
    assert "Application startup failed" in text
    stored = await _stored(url, name)
    print(f"WORKERS no Ray: {len(acked)} acknowledged before uvicorn stopped, {len(failed)} refused, "
          f"{len(stored)} stored; serving pids {sorted({p for _, _, p in acked})}")
    assert sorted(stored) == sorted(t for t, _, _ in acked)  # stored == acknowledged
    assert sorted(s for _, s, _ in acked) == list(range(1, len(acked) + 1))
    assert len({p for _, _, p in acked}) <= 1  # one worker served them all


@pytest.mark.timeout(180)
async def test_two_workers_on_ray_serve_one_room(tmp_path: Path, ray_cluster: Any) -> None:
    """With Ray, both workers serve the same room agent: stored == acknowledged, sequence numbers distinct and consecutive."""
    from keyhive.ray import RayRuntime

    url, name, log = f"sqlite:///{tmp_path}/rooms.db", f"rooms-{uuid.uuid4().hex[:6]}", tmp_path / "uv.log"
    env = {**ray_cluster.env, **child_env(ROOMS_STORAGE=url, ROOMS_NAME=name,
                                          ROOMS_RAY_ADDRESS=ray_cluster.address)}
    with _uvicorn(env, log) as (proc, base):
        async with httpx.AsyncClient(timeout=5) as probe:
            await _wait_up(probe, base, proc, log)
        acked, failed = await _post_all(base, name, N)
        extra = 0
        while len({p for _, _, p in acked}) < 2 and extra < 10:  # the kernel may favour one worker
            more, lost = await _post_all(base, f"{name}-x{extra}", 5)
            acked += more
            failed += lost
            extra += 1
        assert proc.poll() is None, log.read_text()[-3000:]
    assert not failed, f"{len(failed)} posts failed:\n{log.read_text()[-3000:]}"
    pids = {p for _, _, p in acked}
    manager = keyhive.InstanceManager(name, Room, storage=url, runtime=RayRuntime(ray_cluster.address, shards=2))
    await manager.start()
    try:
        stored = await manager.call("lobby", "messages")
    finally:
        await manager.shutdown_hosts()
    print(f"WORKERS Ray: {len(acked)} acknowledged by workers {sorted(pids)}, {len(stored)} stored")
    assert len(pids) == 2  # both workers served the one room
    assert sorted(stored) == sorted(t for t, _, _ in acked)
    assert sorted(s for _, s, _ in acked) == list(range(1, len(acked) + 1))
