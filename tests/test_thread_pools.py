"""Both services start every thread of their pools up front (fixed thread count)."""

from __future__ import annotations

import asyncio
import threading
import time

from llm_server.executor import install_default_executor
from vision_server.threads import started_pool


def test_every_thread_runs_on_return_and_a_burst_adds_none() -> None:
    before = threading.active_count()
    pool = started_pool(3, "probe")
    try:
        assert threading.active_count() == before + 3
        names = {t.name for t in threading.enumerate() if t.name.startswith("probe")}
        assert len(names) == 3
        # A burst wider than the pool queues on the threads that exist.
        list(pool.map(lambda _: time.sleep(0.01), range(12)))
        assert threading.active_count() == before + 3
    finally:
        pool.shutdown(wait=True)
    assert threading.active_count() == before


def test_the_api_default_executor_is_started_whole() -> None:
    async def scenario() -> tuple[int, int]:
        before = threading.active_count()
        executor = await install_default_executor(4)
        started = threading.active_count() - before
        await asyncio.gather(*(asyncio.to_thread(time.sleep, 0.01) for _ in range(16)))
        after_burst = threading.active_count() - before
        executor.shutdown(wait=True)
        return started, after_burst

    assert asyncio.run(scenario()) == (4, 4)
