"""DvD's image encoder: the remote vision service over gRPC.

A thin composition of the pieces that change for different reasons:

- ``llm_server.vision.channels``: the channels, and which one carries each call (round robin
  over the channels; gRPC's round robin over the replicas a ``dns:///`` name resolves to);
- ``llm_server.vision.model_identity``: the model-identity gate (no rows of another model or
  checkpoint reach a prompt);
- ``llm_server.vision.shm_offer`` and ``llm_server.vision.shm_sizing``: whether the vision
  service may write a call's rows into this process's shared memory, and how large a range
  the call needs;
- ``llm_server.vision.encode_stream``: reading the reply back, checked, into the contract's
  items (``protos.messages``).
"""

from __future__ import annotations

import logging
import time

import grpc
from grpc_health.v1 import health_pb2

from llm_server import tracing
from llm_server.errors import VisionBadResponse
from llm_server.settings import EmbeddingTransport
from llm_server.vision.arena import EmbeddingArena, Reservation
from llm_server.vision.channels import ChannelBalancer
from llm_server.vision.encode_stream import receive
from llm_server.vision.errors import rpc_error
from llm_server.vision.model_identity import ModelIdentityGate
from llm_server.vision.shm_offer import SharedMemoryOffer
from protos import codec, messages
from protos.dvd.v1 import vision_pb2
from protos.messages import EncodeCall, EncodeResult

logger = logging.getLogger(__name__)


class GrpcVisualEncoder:
    """Calls ``dvd.v1.VisionService/Encode`` and reassembles the streamed embeddings."""

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float,
        expected_hidden_size: int,
        expected_checkpoint_digest: str = "",
        channels: int = 1,
        transport: EmbeddingTransport = "auto",
        shared_memory_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.transport = transport
        self.channels = ChannelBalancer(target, channels)
        self.identity = ModelIdentityGate(target, expected_hidden_size, expected_checkpoint_digest)
        self.shared_memory = SharedMemoryOffer(target, transport, shared_memory_bytes)

    @property
    def info(self) -> vision_pb2.ModelInfo | None:
        """What the vision service said it serves, once checked."""
        return self.identity.info

    @property
    def arena(self) -> EmbeddingArena | None:
        return self.shared_memory.arena

    @property
    def shared_memory_proven(self) -> bool:
        return self.shared_memory.proven

    def start(self) -> None:
        """Connect now, and check the model whenever a connection becomes ready (at start-up
        and after every reconnect). Call on the event loop."""
        self.channels.watch(self._on_connection_ready)

    async def _on_connection_ready(self) -> None:
        # Possibly another replica, or the same address serving another model now.
        self.identity.reset()
        try:
            await self._check_model(self.timeout_s)
        except Exception as exc:  # logged; requests check again before encoding
            logger.info("vision service at %s: model check failed: %s", self.target, exc)

    async def _check_model(self, timeout_s: float) -> None:
        await self.identity.check(timeout_s, self._ask_model_info)

    async def _ask_model_info(self, timeout_s: float) -> None:
        """GetModelInfo, with a shared-memory probe until a vision service has read one."""
        probe = self.shared_memory.probe()
        request = vision_pb2.GetModelInfoRequest(
            shared_memory_probe=probe.name if probe is not None else ""
        )
        try:
            info = await self.channels.model_info(request, timeout=timeout_s)
        finally:
            if probe is not None:
                probe.close()
        self.identity.accept(info)
        if probe is not None:
            await self.shared_memory.accept_probe(probe, info)

    async def ready(self) -> bool:
        try:
            reply = await self.channels.health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=min(2.0, self.timeout_s)
            )
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def encode(self, call: EncodeCall) -> EncodeResult:
        # One deadline for the whole call, the model check included: a hung vision service
        # costs a request --vision-timeout-s at most.
        deadline = time.monotonic() + self.timeout_s
        await self._check_model(self.timeout_s)
        request = messages.call_to_wire(call)
        reservation = await self._reserve(call)
        if reservation is not None:
            request.shared_memory.CopyFrom(self.shared_memory.target_of(reservation))
        encode = self.channels.pick()
        rpc = encode(
            request,
            timeout=max(deadline - time.monotonic(), 0.001),
            metadata=tracing.grpc_metadata(),  # the trace context, when tracing is on
        )
        try:
            items = await receive(
                rpc, self.identity, self.transport, self.shared_memory.arena, reservation
            )
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, request_bytes=request.ByteSize()) from exc
        except (codec.CodecError, messages.ContractError) as exc:
            raise VisionBadResponse(f"vision service sent a malformed stream: {exc}") from exc
        finally:
            # Whatever ended this (a local error, the client going away), the call ends on the
            # vision service now, which drops its queued tiles, rather than whenever the call
            # object is collected. A finished call ignores this.
            rpc.cancel()
            if reservation is not None:
                self.shared_memory.release(reservation)
        try:
            return messages.result_of(call, items)
        except messages.ContractError as exc:
            raise VisionBadResponse(str(exc)) from exc

    async def _reserve(self, call: EncodeCall) -> Reservation | None:
        return await self.shared_memory.reserve(call, self.identity.info)

    async def close(self) -> None:
        await self.channels.close()
        await self.shared_memory.close()
