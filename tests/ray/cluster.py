"""A private local Ray cluster on 127.0.0.1, for the Ray tests and the Ray bench.

The head runs as ``ray start --head --block`` in its own process group, so that stopping
it stops exactly the processes it started (never ``ray stop``, which would stop every Ray
cluster of the machine's user). When Ray cannot start, the caller is skipped with the
reason, or fails under ``KEYHIVE_REQUIRE_SERVERS=1``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..storage.servers import free_port, require_or_skip

__all__ = ["REPO", "Cluster", "cluster_env", "local_cluster"]

REPO = Path(__file__).resolve().parents[2]

# Ray reads these when it is imported (before any fixture runs): loopback addresses only,
# no auth, no usage report. The test modules import keyhive.ray after this conftest.
_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0"}
os.environ.update(_RAY_ENV)


@dataclass
class Cluster:
    address: str
    env: dict[str, str]
    temp_dir: str

    def run_client(self, *args: str) -> subprocess.Popen[str]:
        """Start ``python -m tests.ray.client *args`` with the cluster's environment."""
        return subprocess.Popen([sys.executable, "-m", "tests.ray.client", self.address, *args],
                                cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)


def cluster_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(_RAY_ENV)
    env["PYTHONPATH"] = f"{REPO / 'src'}{os.pathsep}{REPO}"
    return env


@contextlib.contextmanager
def local_cluster(num_cpus: int = 4) -> Iterator[Cluster]:
    """A private Ray head on 127.0.0.1 for the duration of the block."""
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        require_or_skip(f"Ray is not installed ({ray_bin} missing): pip install 'keyhive[ray]'")
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="kh-ray-")
    env = cluster_env()
    log = open(os.path.join(temp_dir, "head.log"), "w")  # noqa: SIM115  # closed below
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", "--include-dashboard=false", f"--num-cpus={num_cpus}",
         "--disable-usage-stats", f"--temp-dir={temp_dir}",
         # every fixed default port picked free, so that other clusters on the machine don't clash
         *(f"--{flag}={free_port()}" for flag in (
             "node-manager-port", "object-manager-port", "dashboard-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port"))],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while "Ray runtime started" not in Path(log.name).read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                require_or_skip(f"Ray did not start: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.2)
        yield Cluster(f"127.0.0.1:{port}", env, temp_dir)
    finally:
        # SIGTERM makes the head wait on its children for many seconds; a test cluster's
        # data is thrown away anyway. The group holds the head, its daemons and workers.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
