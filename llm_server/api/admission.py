"""Admission: how many chat requests the language service serves at once.

A request holds one slot from before any of its work starts (no image is fetched or decoded
for a request that will be refused) until its response has ended, however it ends: answered,
failed, streamed to the end, or abandoned by its client before or during the stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from llm_server import metrics, tracing
from llm_server.errors import Overloaded


class Admission:
    """At most ``limit`` chat requests in flight; beyond it, a 429."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    @property
    def full(self) -> bool:
        """Every slot is taken: a request arriving now would be refused."""
        return self.in_flight >= self.limit

    def refusal(self) -> Overloaded:
        return Overloaded(
            f"the server is at its limit of {self.limit} concurrent requests; retry later"
        )

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """One request's slot, released exactly once when the scope ends."""
        with tracing.stage("admission"):
            if self.full:
                raise self.refusal()
            self.in_flight += 1
        metrics.requests_in_flight.inc()
        try:
            yield
        finally:
            self.in_flight -= 1
            metrics.requests_in_flight.dec()
