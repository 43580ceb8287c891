"""Shared fixtures: run a command line of the project and check the one-line user-error contract."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args, env=None, cwd=ROOT, timeout=300):
    """Run `args` (a python script of the repo when args[0] ends in .py) and capture text output."""
    args = [str(a) for a in args]
    if args[0].endswith(".py"):
        args = [sys.executable, str(ROOT / args[0]), *args[1:]]
    elif args[0].endswith(".sh"):
        args[0] = str(ROOT / args[0])
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(args, check=False, env=full_env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _assert_user_error(result, *words):
    """Exit status 2, exactly one stderr line mentioning every word, and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def run_cli():
    return _run


@pytest.fixture
def assert_user_error():
    return _assert_user_error
