"""ruff (lint + format), mypy and the import contracts run as part of the test suite, so CI
enforces them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT

PATHS = [
    name
    for name in (
        "checkpoints",
        "telemetry",
        "vision_server",
        "llm_server",
        "protos",
        "clients",
        "benchmarks",
        "tests",
    )
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


def test_import_boundaries():
    """protos imports nothing of ours, checkpoints only protos, the services not each other
    (but for the coupled encoder), clients no server code: the contracts in pyproject.toml."""
    result = run(str(Path(sys.executable).with_name("lint-imports")))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_grpc_mode_never_loads_the_vit_code():
    """The language service imports the vision service only for --vision inprocess."""
    probe = (
        "import sys, llm_server.app, llm_server.server;"
        "print(sorted(m for m in sys.modules if m.startswith('vision_server')))"
    )
    result = run(sys.executable, "-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
