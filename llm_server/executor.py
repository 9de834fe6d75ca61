"""The API process's default executor: a fixed number of threads, all started up front.

``asyncio.to_thread`` (image fetching and decoding, prompt building, vLLM's own helpers) runs
on the loop's default executor, which otherwise starts threads one by one as bursts need
them. Starting them all at once fixes the process's thread count after start-up, so a
growing count is a leak, never a pool warming up.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor


def default_executor_workers() -> int:
    """The size ``asyncio`` would pick for its own default executor."""
    return min(32, (os.cpu_count() or 1) + 4)


async def install_default_executor(workers: int) -> ThreadPoolExecutor:
    """Give the running loop a default executor of ``workers`` threads, all running."""
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="api-io")
    loop.set_default_executor(executor)
    # Every call blocks its thread until all have one: each submit starts a new thread.
    arrived = threading.Barrier(workers)
    await asyncio.gather(*(loop.run_in_executor(None, arrived.wait, 30.0) for _ in range(workers)))
    return executor
