"""Thread pools whose threads all exist from start-up.

``ThreadPoolExecutor`` starts a thread only when a task finds none idle, so a pool grows
with the first burst that needs it. Starting every thread up front fixes the service's
thread count after start-up: operators (and the soak test) can then read a growing count as
a leak rather than a pool warming up.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait


def started_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A ``ThreadPoolExecutor`` of ``workers`` threads, all of them running on return."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    # Each task holds its thread until all have arrived, so every submit finds no idle
    # thread and starts a new one.
    everyone = threading.Barrier(workers)
    done, _ = wait([pool.submit(everyone.wait) for _ in range(workers)], timeout=30)
    if len(done) != workers:
        everyone.abort()
        raise RuntimeError(f"thread pool {name!r}: {workers} threads did not start in 30 s")
    return pool
