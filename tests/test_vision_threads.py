"""The vision service's thread pools start every thread up front (fixed thread count)."""

from __future__ import annotations

import threading
import time

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
