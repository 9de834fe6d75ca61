"""DvD's image encoder: the remote vision service over gRPC.

A thin composition of the pieces that change for different reasons:

- ``llm_server.vision.replicas`` and ``llm_server.vision.placement`` (``--vision-balancing
  affinity``): one set of channels per vision replica behind the target, and which replica
  takes each call (its cache identity's replica on a hash ring, within a load bound), with one
  retry on another replica for a call that failed before any reply;
- ``llm_server.vision.channels`` (``--vision-balancing round_robin``): channels to the target
  as a whole, gRPC's round robin over the replicas a ``dns:///`` name resolves to;
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
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2

from llm_server import metrics, tracing
from llm_server.errors import VisionBadResponse
from llm_server.settings import EmbeddingTransport, VisionBalancing
from llm_server.vision.arena import EmbeddingArena, Reservation
from llm_server.vision.channels import ChannelBalancer, EncodeMethod
from llm_server.vision.encode_stream import receive
from llm_server.vision.errors import rpc_error
from llm_server.vision.model_identity import ModelIdentityGate
from llm_server.vision.placement import cache_identity
from llm_server.vision.replicas import ReplicaFleet
from llm_server.vision.shm_offer import SharedMemoryOffer
from llm_server.vision.shm_sizing import call_tiles
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
        balancing: VisionBalancing = "affinity",
        load_bound: float = 1.25,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.transport = transport
        # affinity: this client places calls on replicas; round_robin: gRPC does, by count.
        self.fleet = ReplicaFleet(target, channels, load_bound) if balancing == "affinity" else None
        self.channels = ChannelBalancer(target, channels) if self.fleet is None else None
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
        if self.fleet is not None:
            self.fleet.watch(self._on_connection_ready)
        else:
            assert self.channels is not None
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
            model_info = await self._model_info_method(timeout_s)
            info = await model_info(request, timeout=timeout_s)
        finally:
            if probe is not None:
                probe.close()
        self.identity.accept(info)
        if probe is not None:
            await self.shared_memory.accept_probe(probe, info)

    async def _model_info_method(self, timeout_s: float) -> grpc.aio.UnaryUnaryMultiCallable:
        if self.fleet is None:
            assert self.channels is not None
            return self.channels.model_info
        self.fleet.start()
        await self.fleet.wait_resolved(timeout_s)
        replica = self.fleet.any_replica()
        if replica is None:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                f"no vision replica behind {self.target}",
            )
        return replica.model_info

    async def ready(self) -> bool:
        if self.fleet is not None:
            self.fleet.start()
            try:
                await self.fleet.wait_resolved(min(2.0, self.timeout_s))
            except TimeoutError:
                return False
            return await self.fleet.any_serving()
        assert self.channels is not None
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
        try:
            if self.fleet is not None:
                items = await self._encode_on_fleet(call, request, reservation, deadline)
            else:
                assert self.channels is not None
                items = await self._encode_on(self.channels.pick(), request, reservation, deadline)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, request_bytes=request.ByteSize()) from exc
        except (codec.CodecError, messages.ContractError) as exc:
            raise VisionBadResponse(f"vision service sent a malformed stream: {exc}") from exc
        finally:
            if reservation is not None:
                self.shared_memory.release(reservation)
        try:
            return messages.result_of(call, items)
        except messages.ContractError as exc:
            raise VisionBadResponse(str(exc)) from exc

    async def _encode_on(
        self,
        encode: EncodeMethod,
        request: vision_pb2.EncodeRequest,
        reservation: Reservation | None,
        deadline: float,
        replies: _Replies | None = None,
    ) -> list[messages.VisualEmbedding]:
        rpc = encode(
            request,
            timeout=max(deadline - time.monotonic(), 0.001),
            metadata=tracing.grpc_metadata(),  # the trace context, when tracing is on
        )
        replies = replies or _Replies()
        try:
            return await receive(
                replies.of(rpc),
                self.identity,
                self.transport,
                self.shared_memory.arena,
                reservation,
            )
        finally:
            # Whatever ended this (a local error, the client going away), the call ends on the
            # vision service now, which drops its queued tiles, rather than whenever the call
            # object is collected. A finished call ignores this.
            rpc.cancel()

    async def _encode_on_fleet(
        self,
        call: EncodeCall,
        request: vision_pb2.EncodeRequest,
        reservation: Reservation | None,
        deadline: float,
    ) -> list[messages.VisualEmbedding]:
        """The call on the replica ``placement`` chooses; once more on another replica if that
        one failed unreachable before replying anything (never after: no item twice)."""
        assert self.fleet is not None and self.identity.info is not None
        fleet = self.fleet
        await fleet.wait_resolved(max(deadline - time.monotonic(), 0.001))
        key = cache_identity(call)
        tiles = await call_tiles(call, self.identity.info)
        tried: frozenset[str] = frozenset()
        while True:
            placement = fleet.place(key, tiles, exclude=tried) or fleet.place(key, tiles)
            if placement is None:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    f"no vision replica behind {self.target}",
                )
            if not tried:
                if placement.replica == placement.home:
                    metrics.fleet_affinity_hits.inc()
                elif placement.overflowed:
                    metrics.fleet_overflow_redirects.inc()
            # A probable cache hit loads the replica's encoder with nothing.
            load = 0 if placement.remembered else tiles
            replica = fleet.begin(placement.replica, load)
            replies = _Replies()
            try:
                items = await self._encode_on(
                    replica.encode_method(), request, reservation, deadline, replies
                )
                if key is not None:
                    fleet.served(key, replica.name)
                return items
            except grpc.aio.AioRpcError as exc:
                if replies.received or not _unreachable(exc):
                    raise
                fleet.unreachable(replica)
                if tried:  # retried once already
                    raise
                logger.warning(
                    "vision replica %s unreachable (%s); retrying the call on another",
                    replica.name,
                    exc.code().name,
                )
                metrics.fleet_failovers.inc()
                tried = frozenset({replica.name})
            finally:
                fleet.end(replica, load)

    async def _reserve(self, call: EncodeCall) -> Reservation | None:
        return await self.shared_memory.reserve(call, self.identity.info)

    async def close(self) -> None:
        if self.fleet is not None:
            await self.fleet.close()
        if self.channels is not None:
            await self.channels.close()
        await self.shared_memory.close()


class _Replies:
    """A call's reply messages as they arrive, and whether any has (after which the call must
    not be sent again)."""

    def __init__(self) -> None:
        self.received = False

    async def of(self, rpc: grpc.aio.UnaryStreamCall) -> AsyncIterator[bytes]:
        async for raw in rpc:
            self.received = True
            yield raw


def _unreachable(exc: grpc.aio.AioRpcError) -> bool:
    """A failure that says the replica could not take the call: UNAVAILABLE (refused, reset,
    gone), or CANCELLED by the replica (one that stops drops calls it had accepted but not yet
    started as CANCELLED; this client's own cancellations never arrive here)."""
    return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
