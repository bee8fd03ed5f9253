"""The README's examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_twenty_line_example_runs_and_state_survives_a_restart(tmp_path: Path) -> None:
    """The first example prints 1, 2 on its first run and 3, 4 on the second (thawed from SQLite)."""
    example = _python_blocks()[0]
    assert "asyncio.run(main())" in example
    assert len(example.strip().splitlines()) <= 25
    script = tmp_path / "example.py"
    script.write_text(example)
    runs = [
        subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60, check=True).stdout.split()
        for _ in range(2)
    ]
    assert runs == [["1", "2"], ["3", "4"]]
    assert (tmp_path / "sessions.db").exists()
