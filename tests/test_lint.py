"""ruff (lint + format) and mypy run as part of the test suite, so CI enforces them."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO_ROOT

PATHS = [
    name
    for name in ("vision_server", "llm_server", "protos", "clients", "tests")
    if (REPO_ROOT / name).is_dir()
]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, check=False)


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    result = run(sys.executable, "-m", "ruff", *command, *PATHS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy():
    result = run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr
