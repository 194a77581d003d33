"""The codebase stays linted (ruff) and typed (mypy on proxy/), as the style guide asks."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = BIN / name
    return str(found) if found.exists() else (shutil.which(name) or name)


def test_ruff_finds_nothing():
    done = subprocess.run([tool("ruff"), "check", "proxy", "tests", "bench"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_finds_nothing_in_the_package():
    done = subprocess.run([tool("mypy"), "proxy", "--ignore-missing-imports", "--cache-dir",
                           str(ROOT / ".mypy_cache")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_function_of_the_proxy_is_typed_and_the_shapers_need_no_ignores():
    config = (ROOT / "pyproject.toml").read_text()
    assert "disallow_untyped_defs = true" in config  # mypy, above, holds proxy/ to it
    ignored = [str(path.relative_to(ROOT)) for path in (ROOT / "proxy" / "shape").glob("*.py")
               if "type: ignore" in path.read_text()]
    assert ignored == []
