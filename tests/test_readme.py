"""The README's and docs/fastapi.md's Python examples run as written, and the console demo's help is right."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FASTAPI_DOC = ROOT / "docs" / "fastapi.md"
# Starlette's TestClient (no port needed) warns when it runs on httpx instead of httpx2; the
# warning is about the client, not about the code under test.
TESTCLIENT_ON_HTTPX = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def _python_blocks(path: Path = README) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def _kind(block: str) -> str:
    """Which test below runs a README block (a new kind of block needs a test here)."""
    if "RayRuntime(" in block:
        return "ray"  # run by tests/ray/test_readme_ray.py on the session's Ray cluster
    if "asyncio.run(main())" in block:
        return "script"
    if "FastAPI(" in block:
        return "fastapi"
    if "@pytest.mark.looptime" in block:
        return "pytest"
    return "unknown"


def _module(code: str, path: Path, name: str) -> ModuleType:
    path.write_text(code)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_readme_block_is_run_by_a_test() -> None:
    """Each Python block of the README is one of the kinds the tests below run as written."""
    kinds = [_kind(block) for block in _python_blocks()]
    assert "unknown" not in kinds, kinds
    assert sorted(kinds) == ["fastapi", "pytest", "ray", "script"]


def test_twenty_line_example_runs_and_state_survives_a_restart(tmp_path: Path) -> None:
    """The first example prints 1, 2 on its first run and 3, 4 on the second (thawed from SQLite)."""
    (example,) = [b for b in _python_blocks() if _kind(b) == "script"]
    assert len(example.strip().splitlines()) <= 25
    script = tmp_path / "example.py"
    script.write_text(example)
    runs = [
        subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60, check=True, env=ENV).stdout.split()
        for _ in range(2)
    ]
    assert runs == [["1", "2"], ["3", "4"]]
    assert (tmp_path / "sessions.db").exists()


def _exercise(app: object) -> None:
    """Drive the notes app of the FastAPI example without a port: socket, HTTP and dashboard."""
    from starlette.testclient import TestClient

    with TestClient(app) as client:  # type: ignore[arg-type]
        with client.websocket_connect("/ws/s1") as ws:
            ws.send_text("hello")
            assert ws.receive_json() == ["hello"]
            ws.send_text("again")
            assert ws.receive_json() == ["hello", "again"]
        assert client.get("/notes/s1").json() == ["hello", "again"]
        snapshot = client.get("/keyhive/api/snapshot").json()
        assert snapshot["managers"][0]["name"] == "notes"
    with TestClient(app) as client:  # type: ignore[arg-type]
        assert client.get("/notes/s1").json() == ["hello", "again"]  # thawed from notes.db


@TESTCLIENT_ON_HTTPX
def test_readme_fastapi_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's FastAPI example imports what it uses, defines Notes, and serves sockets and HTTP."""
    pytest.importorskip("fastapi", reason="needs keyhive[fastapi]")
    (block,) = [b for b in _python_blocks() if _kind(b) == "fastapi"]
    monkeypatch.chdir(tmp_path)
    module = _module(block, tmp_path / "app.py", "readme_fastapi_app")
    _exercise(module.app)
    assert (tmp_path / "notes.db").exists()


@TESTCLIENT_ON_HTTPX
def test_docs_fastapi_examples_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/fastapi.md's blocks, run one after the other as the text reads, build working apps."""
    pytest.importorskip("fastapi", reason="needs keyhive[fastapi]")
    first, *rest = _python_blocks(FASTAPI_DOC)
    monkeypatch.chdir(tmp_path)
    module = _module(first, tmp_path / "app.py", "docs_fastapi_app")
    _exercise(module.app)
    for block in rest:
        exec(compile(block, "docs/fastapi.md", "exec"), vars(module))  # the doc continues its first block
    from starlette.testclient import TestClient

    with TestClient(module.app) as client:
        names = [m["name"] for m in client.get("/keyhive/api/snapshot").json()["managers"]]
        assert names == ["notes", "carts"]
        assert client.get("/keyhive/api/snapshot").json()["allow_stop"] is True


def test_readme_testing_example_passes_under_pytest(tmp_path: Path) -> None:
    """The README's test example passes when pytest runs it with asyncio_mode = auto, as the text says."""
    pytest.importorskip("looptime")
    (block,) = [b for b in _python_blocks() if _kind(b) == "pytest"]
    (tmp_path / "test_sessions.py").write_text(block)
    (tmp_path / "pytest.ini").write_text(textwrap.dedent("""\
        [pytest]
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = function
    """))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_console_demo_help_names_itself_and_its_options() -> None:
    """counter_demo.py --help describes the console demo (not the web one) and explains --storage."""
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "counter_demo.py"), "--help"],
                            capture_output=True, text=True, timeout=60, env=ENV)
    assert result.returncode == 0
    assert "console demo" in result.stdout
    assert "Run: python examples/counter_demo.py" in result.stdout
    assert re.search(r"--storage URL\s+where checkpoints go: a storage URL", result.stdout)
