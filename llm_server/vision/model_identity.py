"""The model-identity gate: rows only make sense in prompts of the checkpoint they were
computed for.

``GetModelInfo`` is asked when a connection becomes ready (at start-up and after every
reconnect) and before the first Encode after that; a service with another width or another
checkpoint digest gets image requests refused with 503. Every image header carries the digest
too, which catches one replica behind a shared name that serves another checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc

from checkpoints.identity import short_digest
from llm_server.errors import VisionModelMismatch
from llm_server.vision.errors import rpc_error, vision_error
from protos.dvd.v1 import vision_pb2

logger = logging.getLogger(__name__)


class ModelIdentityGate:
    """Whether the vision service behind ``target`` serves rows this language model can use:
    checked once per ready connection, and on every image header."""

    def __init__(
        self, target: str, expected_hidden_size: int, expected_checkpoint_digest: str = ""
    ) -> None:
        self.target = target
        self.expected_hidden_size = expected_hidden_size
        # Empty: compare the width only (a caller that does not know its checkpoint's digest).
        self.expected_checkpoint_digest = expected_checkpoint_digest
        # What the last accepted model check answered (its rows' dtype, tiling, limits).
        self.info: vision_pb2.ModelInfo | None = None
        self._checked = False
        self._lock = asyncio.Lock()
        # Checkpoint digests vision replicas answered with, and mismatches already logged.
        self._digests_seen: set[str] = set()
        self._mismatches_logged: set[str] = set()

    def reset(self) -> None:
        """Check again before the next call (possibly another replica now, or the same
        address serving another model)."""
        self._checked = False

    async def check(self, timeout_s: float, ask: Callable[[float], Awaitable[None]]) -> None:
        """Before the first Encode after a connection became ready: ``ask`` the vision service
        what it serves (it hands the answer to ``accept``). Waiting for another request's check
        counts against ``timeout_s`` too."""
        if self._checked:
            return
        try:
            async with asyncio.timeout(timeout_s), self._lock:
                if not self._checked:
                    await ask(timeout_s)
        except TimeoutError as exc:
            raise vision_error(grpc.StatusCode.DEADLINE_EXCEEDED, "model check") from exc
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc) from exc

    def accept(self, info: vision_pb2.ModelInfo) -> None:
        """Take a model check's answer, or refuse to mix its rows into prompts of a language
        model they cannot belong to (``VisionModelMismatch``)."""
        if info.hidden_size != self.expected_hidden_size:
            logger.error(
                "vision service at %s serves %s with %d-wide embeddings; this language "
                "model is %d wide",
                self.target,
                info.model_id,
                info.hidden_size,
                self.expected_hidden_size,
            )
            raise VisionModelMismatch(
                f"the vision service serves {info.model_id!r}, whose embeddings are "
                f"{info.hidden_size} wide, but the language model is "
                f"{self.expected_hidden_size} wide: the two services run different models"
            )
        self.check_digest(info.checkpoint_digest, info.model_id)
        logger.info(
            "vision service at %s: %s (checkpoint %s) on %s",
            self.target,
            info.model_id,
            short_digest(info.checkpoint_digest),
            info.device,
        )
        self.info = info
        self._checked = True

    def check_digest(self, digest: str, model_id: str | None) -> None:
        """Refuse rows of another checkpoint (503); log loudly, once per digest, when replicas
        behind the target disagree."""
        expected = self.expected_checkpoint_digest
        if not expected or not digest:  # a side that predates digests: the width was checked
            return
        if digest == expected:
            self._digests_seen.add(digest)
            return
        served = short_digest(digest)
        if model_id:
            served = f"{model_id!r}, digest {served}"
        if digest not in self._mismatches_logged:
            self._mismatches_logged.add(digest)
            if self._digests_seen:
                logger.error(
                    "VISION REPLICAS DISAGREE: replicas behind %s serve different checkpoints "
                    "(%s, this language model's, and %s); requests that reach the latter get "
                    "503 until every replica serves the same checkpoint",
                    self.target,
                    short_digest(expected),
                    served,
                )
            else:
                logger.error(
                    "the vision service at %s serves checkpoint %s, this language service %s: "
                    "image requests get 503 until both serve the same checkpoint",
                    self.target,
                    served,
                    short_digest(expected),
                )
        self._checked = False  # ask again before the next call
        raise VisionModelMismatch(
            f"the vision service at {self.target} serves another checkpoint ({served}) than "
            f"this language service (digest {short_digest(expected)}): its embeddings cannot "
            "be used; retry later"
        )
