"""Both services start every thread of their pools up front (fixed thread count).

The pools' own threads are counted, by name, never the process's total: other libraries in
the test process (gRPC's event engine, for one) start and stop threads of their own at any
time.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

from llm_server.executor import install_default_executor
from vision_server.threads import started_pool


def threads_named(prefix: str) -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(prefix)}


def test_every_thread_runs_on_return_and_a_burst_adds_none() -> None:
    name = f"probe-{uuid.uuid4().hex[:8]}"  # no other pool's threads share it
    pool = started_pool(3, name)
    try:
        started = threads_named(name)
        assert len(started) == 3 and all(t.is_alive() for t in started)
        # A burst wider than the pool queues on the threads that exist.
        list(pool.map(lambda _: time.sleep(0.01), range(12)))
        assert threads_named(name) == started
    finally:
        pool.shutdown(wait=True)
    assert threads_named(name) == set()


def test_the_api_default_executor_is_started_whole() -> None:
    async def scenario() -> tuple[int, int, int]:
        before = threads_named("api-io")  # left by another test's loop, if any
        executor = await install_default_executor(4)
        started = threads_named("api-io") - before
        await asyncio.gather(*(asyncio.to_thread(time.sleep, 0.01) for _ in range(16)))
        after_burst = threads_named("api-io") - before
        executor.shutdown(wait=True)
        return len(started), len(after_burst), len(after_burst - started)

    assert asyncio.run(scenario()) == (4, 4, 0)
