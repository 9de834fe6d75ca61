"""Session fixtures: the tiny checkpoints and real servers on 127.0.0.1, started once."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import helpers
import pytest
from helpers import (
    PROCESS_FIXTURES,
    PROCESSES_MARK,
    ServerProcess,
    Stack,
    process_fixture,
    start_stacks,
    start_vision_server,
)
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

# Keep vLLM and torch modest on 2-core CI machines, and never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Property-based runs (hypothesis, and schemathesis on top of it) draw the same examples on
# every run and machine by default: a failure is reproducible, a pass is not luck, and no
# example database carries one run's finds into the next. No deadline or too-slow check: a
# loaded machine is slow, not wrong. `pytest --hypothesis-profile=explore` draws fresh
# examples instead (a failure prints the seed and blob that replay it).
hypothesis_settings.register_profile(
    "seeded",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
hypothesis_settings.register_profile(
    "explore",
    derandomize=False,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
hypothesis_settings.load_profile("seeded")  # `--hypothesis-profile` overrides it


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cpu-hogs",
        type=int,
        default=0,
        metavar="N",
        help="run N busy-loop processes for the whole session (a loaded machine: timing "
        "assumptions and races show up as failures)",
    )


_cpu_hogs: list[subprocess.Popen[bytes]] = []


def pytest_configure(config: pytest.Config) -> None:
    for _ in range(config.getoption("--cpu-hogs", 0) or 0):
        _cpu_hogs.append(
            subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    for hog in _cpu_hogs:
        hog.kill()
        hog.wait()
    _cpu_hogs.clear()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a fixture declared with ``process_fixture``, and run the
    modules marked ``runs_first`` before all others: each starts several stacks of its own
    (about 2.5 GiB each on CPU), which must not be up while the session's shared stacks are,
    or a 24 GiB machine runs out of memory."""
    for item in items:
        if PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(PROCESSES_MARK)
    items.sort(key=lambda item: item.get_closest_marker("runs_first") is None)  # stable


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _marked_while(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _marked_while(item):
        yield


@contextlib.contextmanager
def _marked_while(item: pytest.Item) -> Iterator[None]:
    helpers._current_test_marked.append(item.get_closest_marker(PROCESSES_MARK) is not None)
    try:
        yield
    finally:
        helpers._current_test_marked.pop()


@pytest.fixture(autouse=True)
def _test_process_keeps_normal_scheduling() -> Iterator[None]:
    """A test that leaves this process under a real-time policy fails by name: every server
    started afterwards would inherit it (a busy-polling vLLM worker at SCHED_FIFO 99 starves
    a 2-core machine). SVT-AV1's encoder, run as root, did that once."""
    yield
    policy = os.sched_getscheduler(0)
    if policy != os.SCHED_OTHER:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        pytest.fail(f"the test left the test process under scheduling policy {policy}")


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny checkpoint (seed 0) in both layouts: the same weights under two formats."""
    from checkpoints.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("models")
    return {
        layout: write_tiny_checkpoint(root / f"tiny-{layout}", seed=0, layout=layout)
        for layout in ("hf", "original")
    }


@pytest.fixture(scope="session")
def tiny_flash_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """InternVL3.5-Flash variants of the same seed: the tiny weights plus router and mlp2."""
    from checkpoints.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("flash-models")
    return {
        layout: write_tiny_checkpoint(
            root / f"tiny-flash-{layout}", seed=0, layout=layout, flash=True
        )
        for layout in ("hf", "original")
    }


@process_fixture(scope="session")
def flash_vision(
    tiny_flash_models: dict[str, Path], log_dir: Path
) -> Iterator[dict[str, tuple[str, str]]]:
    """One vision server per Flash checkpoint layout; layout -> (gRPC target, metrics URL)."""
    servers: list[ServerProcess] = []
    running: dict[str, tuple[str, str]] = {}
    try:
        for layout, path in tiny_flash_models.items():
            extra_args = ["--max-batch-tiles", "8"]
            if layout == "original":
                # An idle encoder takes each image in parts (grid, then thumbnail), as it does
                # on CUDA: the oracle tests of this layout check that path.
                extra_args += ["--overlap-preparation", "on"]
            server, target = start_vision_server(
                f"flash-vision-{layout}", path, log_dir, extra_args=extra_args
            )
            servers.append(server)
            running[layout] = (target, str(server.metrics_url))
        yield running
    finally:
        for server in servers:
            server.stop()


@process_fixture(scope="session")
def vision_targets(tiny_models: dict[str, Path], log_dir: Path) -> Iterator[dict[str, str]]:
    """One vision server per layout; yields layout -> 'host:port'."""
    servers: list[ServerProcess] = []
    targets: dict[str, str] = {}
    try:
        for layout, path in tiny_models.items():
            # A small batch cap, so that concurrent requests really get split and mixed.
            server, target = start_vision_server(
                f"vision-{layout}",
                path,
                log_dir,
                extra_args=["--max-batch-tiles", "8", "--max-wait-ms", "20"],
            )
            servers.append(server)
            targets[layout] = target
        yield targets
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def oracle(tiny_models: dict[str, Path]):
    """transformers' own InternVL and image processor on the hf-layout checkpoint."""
    import torch
    from transformers import InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    path = tiny_models["hf"]
    model = InternVLForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    processor = GotOcr2ImageProcessorPil.from_pretrained(str(path))
    return model, processor


@process_fixture(scope="session")
def stacks(
    tiny_models: dict[str, Path], tiny_flash_models: dict[str, Path], log_dir: Path
) -> Iterator[dict[str, Stack]]:
    """A vision server and a language server per checkpoint layout ("hf", "original"), one
    pair on the Flash checkpoint ("flash"), and the coupled baseline ("coupled": one language
    server encoding images in-process, on the Flash checkpoint), as real processes. "original"
    receives embeddings over gRPC, "hf" and "flash" through shared memory."""
    models = {**tiny_models, "flash": tiny_flash_models["hf"], "coupled": tiny_flash_models["hf"]}
    # Both embedding transports: the "original" stack streams them over gRPC, the others get
    # them through shared memory (both services run on this host).
    running = start_stacks(
        models,
        log_dir,
        coupled=frozenset({"coupled"}),
        llm_args_by_name={"original": ["--embedding-transport", "grpc"]},
    )
    try:
        yield running
    finally:
        for stack in running.values():
            stack.stop()
