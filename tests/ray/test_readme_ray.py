"""The README's Ray example runs as written against a real (the session's) Ray cluster."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from .cluster import REPO


def _ray_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    (block,) = [textwrap.dedent(b) for b in blocks if "RayRuntime(" in b]
    return block


def test_the_readme_ray_example_runs(ray_cluster: Any, tmp_path: Path) -> None:
    """The deployment section's example reaches the cluster with address="auto" and prints 1."""
    script = tmp_path / "rooms.py"
    script.write_text(_ray_block())
    env = {**ray_cluster.env, "RAY_ADDRESS": ray_cluster.address}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1"]
