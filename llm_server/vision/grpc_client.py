"""DvD's image encoder: the remote vision service over gRPC.

A ``dns:///name:port`` target with round-robin load balancing spreads calls over every
address the name resolves to (several vision replicas behind one Compose/Kubernetes name).
Several channels (``channels``) give each replica several HTTP/2 connections, so that large
transfers do not queue behind each other on one connection.

Embeddings come back in one of two ways, chosen per call by the vision service: streamed as
chunk messages, or written straight into this process's shared memory when the service runs
on the same host (``transport``: ``auto`` offers shared memory once the vision service has
proved it sees this process's ``/dev/shm``, ``grpc`` never does, ``shared-memory`` requires
it). The proof is a probe segment named in ``GetModelInfo``, whose random nonce the service
must read back; until it succeeds (never, across hosts or pods) no shared memory is reserved
and no segment is named in calls.

Model identity: rows only make sense in prompts of the checkpoint they were computed for.
``GetModelInfo`` is asked when a connection becomes ready (at start-up and after every
reconnect) and before the first Encode after that; a service with another width or another
checkpoint digest gets image requests refused with 503. Every image header carries the digest
too, which catches one replica behind a shared name that serves another checkpoint.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
import time
import warnings
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import ExifTags, Image, PngImagePlugin, TiffImagePlugin

from checkpoints.identity import short_digest
from llm_server import metrics
from llm_server.errors import VisionBadResponse, VisionModelMismatch, VisionUnavailable
from llm_server.settings import EmbeddingTransport
from llm_server.vision.arena import EmbeddingArena, Reservation
from llm_server.vision.errors import rpc_error, vision_error
from protos import codec, messages, shm
from protos.dvd.v1 import vision_pb2
from protos.image_formats import IMAGE_FORMATS
from protos.messages import EncodeCall, EncodeResult, ImageInput, VisualEmbedding
from protos.tiling import TilingOptions, most_tiles

logger = logging.getLogger(__name__)

# Pillow warns of a possible decompression bomb when it reads a large image's header. This
# process reads headers only, never pixels (the vision service decodes, under its own pixel
# limit), so the warning says nothing here; and it is raised in worker threads, where
# warnings.catch_warnings is not safe (it swaps a process-wide list).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning, module=r"PIL\.Image")


# Encode is idempotent: a call that fails with UNAVAILABLE before its first reply (a replica
# that just went away) is retried on another replica, twice at most, with a short backoff.
# CANCELLED too: a replica that stops drops, as CANCELLED, a call grpcio had accepted but not
# yet handed to the servicer. Calls this process cancels itself are never retried.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "dvd.v1.VisionService"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 3,
                    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                },
            }
        ],
    }
)


# Shortest time between two DNS look-ups of a dns:/// target (each triggered by a connection
# that ended). Bounds how soon a new vision replica gets calls, with the server's connection age.
DNS_RERESOLUTION_INTERVAL_MS = 5_000


class GrpcImageEncoder:
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
        self.expected_hidden_size = expected_hidden_size
        # Empty: compare the width only (a caller that does not know its checkpoint's digest).
        self.expected_checkpoint_digest = expected_checkpoint_digest
        self.transport = transport
        self._channels = [_open_channel(target, index) for index in range(channels)]
        self._next_channel = 0
        # Encode's messages arrive as raw bytes: codec.parse_response reads chunks without
        # copying them through protobuf objects.
        self._encode = [
            channel.unary_stream(
                "/dvd.v1.VisionService/Encode",
                request_serializer=vision_pb2.EncodeRequest.SerializeToString,
                response_deserializer=None,
            )
            for channel in self._channels
        ]
        self._health = health_pb2_grpc.HealthStub(self._channels[0])
        self._model_info = self._channels[0].unary_unary(
            "/dvd.v1.VisionService/GetModelInfo",
            request_serializer=vision_pb2.GetModelInfoRequest.SerializeToString,
            response_deserializer=vision_pb2.ModelInfo.FromString,
        )
        self.info: vision_pb2.ModelInfo | None = None
        self.shared_memory_bytes = shared_memory_bytes
        self.arena = _open_arena(transport, shared_memory_bytes)
        # Whether a model check proved that the vision service sees our /dev/shm. It stays
        # true: replicas behind the name that do not see it stream, call by call.
        self.shared_memory_proven = False
        self._arena_task: asyncio.Task[None] | None = None
        self._model_checked = False
        self._model_check_lock = asyncio.Lock()
        # Checkpoint digests vision replicas answered with, and mismatches already logged.
        self._digests_seen: set[str] = set()
        self._mismatches_logged: set[str] = set()
        self._watchers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Connect now, and check the model whenever a connection becomes ready (at start-up
        and after every reconnect). Call on the event loop."""
        for index, channel in enumerate(self._channels):
            self._watchers.append(
                asyncio.get_running_loop().create_task(
                    self._watch_connection(channel), name=f"vision-connection-{index}"
                )
            )

    async def _watch_connection(self, channel: grpc.aio.Channel) -> None:
        ready = grpc.ChannelConnectivity.READY
        state = channel.get_state(try_to_connect=True)
        while True:
            await channel.wait_for_state_change(state)
            previous, state = state, channel.get_state(try_to_connect=False)
            if state is ready and previous is not ready:
                # Possibly another replica, or the same address serving another model now.
                self._model_checked = False
                try:
                    await self._check_model(self.timeout_s)
                except Exception as exc:  # logged; requests check again before encoding
                    logger.info("vision service at %s: model check failed: %s", self.target, exc)

    async def _check_model(self, timeout_s: float) -> None:
        """Before the first Encode after a connection became ready: ask the vision service
        what it serves and refuse to mix its rows into prompts of a language model they
        cannot belong to. Waiting for another request's check counts against ``timeout_s``
        too."""
        if self._model_checked:
            return
        try:
            async with asyncio.timeout(timeout_s), self._model_check_lock:
                if not self._model_checked:
                    await self._ask_model_info(timeout_s)
        except TimeoutError as exc:
            raise vision_error(grpc.StatusCode.DEADLINE_EXCEEDED, "model check") from exc
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc) from exc

    async def _ask_model_info(self, timeout_s: float) -> None:
        """GetModelInfo, with a shared-memory probe until a vision service has read one."""
        probe = _new_probe() if self.transport == "auto" and self.arena is None else None
        request = vision_pb2.GetModelInfoRequest(
            shared_memory_probe=probe.name if probe is not None else ""
        )
        try:
            info = await self._model_info(request, timeout=timeout_s)
        finally:
            if probe is not None:
                probe.close()
        self._accept_model(info)
        if probe is not None:
            await self._accept_probe(probe, info)

    async def _accept_probe(self, probe: shm.ProbeSegment, info: vision_pb2.ModelInfo) -> None:
        """Offer shared memory from now on if the vision service read the probe's nonce, and
        make the arena for it."""
        if not secrets.compare_digest(info.shared_memory_nonce, probe.nonce):
            return  # another host or pod, or shared memory off there: calls stream
        if not self.shared_memory_proven:
            logger.info("vision service at %s sees this host's shared memory", self.target)
        self.shared_memory_proven = True
        if self.arena is None:
            if self._arena_task is None or self._arena_task.done():
                self._arena_task = asyncio.get_running_loop().create_task(
                    self._create_arena(), name="vision-shared-memory"
                )
            # Shielded: a check that times out meanwhile leaves the arena to be finished.
            await asyncio.shield(self._arena_task)

    async def _create_arena(self) -> None:
        # Reserving the pages (posix_fallocate of --shared-memory-mb) takes tens of ms.
        try:
            arena = await asyncio.to_thread(EmbeddingArena, self.shared_memory_bytes)
        except shm.SharedMemoryError as exc:
            logger.info("embeddings will be streamed over gRPC: %s", exc)
            return
        self.arena = arena
        _log_arena(arena)

    def _accept_model(self, info: vision_pb2.ModelInfo) -> None:
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
        self._check_digest(info.checkpoint_digest, info.model_id)
        logger.info(
            "vision service at %s: %s (checkpoint %s) on %s",
            self.target,
            info.model_id,
            short_digest(info.checkpoint_digest),
            info.device,
        )
        self.info = info
        self._model_checked = True

    def _check_digest(self, digest: str, model_id: str | None) -> None:
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
        self._model_checked = False  # ask again before the next call
        raise VisionModelMismatch(
            f"the vision service at {self.target} serves another checkpoint ({served}) than "
            f"this language service (digest {short_digest(expected)}): its embeddings cannot "
            "be used; retry later"
        )

    async def ready(self) -> bool:
        try:
            reply = await self._health.Check(
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
        if reservation is not None and self.arena is not None:
            request.shared_memory.CopyFrom(
                vision_pb2.SharedMemoryTarget(
                    segment=self.arena.segment.name,
                    token=self.arena.segment.token,
                    offset=reservation.offset,
                    capacity=reservation.size,
                    generation=reservation.generation,
                )
            )
        encode = self._encode[self._next_channel]
        self._next_channel = (self._next_channel + 1) % len(self._encode)
        rpc = encode(request, timeout=max(deadline - time.monotonic(), 0.001))
        try:
            items = await self._receive(rpc, reservation)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, request_bytes=request.ByteSize()) from exc
        except (codec.CodecError, messages.ContractError) as exc:
            raise VisionBadResponse(f"vision service sent a malformed stream: {exc}") from exc
        finally:
            # Whatever ended this (a local error, the client going away), the call ends on the
            # vision service now, which drops its queued tiles, rather than whenever the call
            # object is collected. A finished call ignores this.
            rpc.cancel()
            if reservation is not None and self.arena is not None:
                # Even if the vision service is still writing: the range's stamp is cleared
                # first, so no late write can land in it once it is reserved again.
                self.arena.release(reservation)
        try:
            return messages.result_of(call, items)
        except messages.ContractError as exc:
            raise VisionBadResponse(str(exc)) from exc

    async def _reserve(self, call: EncodeCall) -> Reservation | None:
        """A shared-memory range large enough for the most rows the call's images and videos
        can produce (a video: one tile per frame); None when shared memory is not offered."""
        if self.arena is None or self.info is None:
            return None
        if self.transport == "auto" and not self.shared_memory_proven:
            return None
        if any(video.num_frames is None for video in call.videos):
            return None  # frames only the vision service knows: its rows stream
        info = self.info
        try:
            row_bytes = codec.tensor_bytes((info.hidden_size,), info.dtype)
        except codec.CodecError:  # a service that does not describe its rows: they stream
            return None
        counted = [(image.data, _max_tiles(image, call, info)) for image in call.images]
        # Reading the headers parses the request's bytes: off the event loop, in one hop.
        tiles = await asyncio.to_thread(count_tiles, counted, info)
        tiles += sum(video.num_frames or 0 for video in call.videos)
        reservation = self.arena.reserve(tiles * info.tokens_per_tile * row_bytes)
        if reservation is None:
            metrics.shared_memory_full.inc()
            if self.transport == "shared-memory":
                raise VisionUnavailable("shared memory for embeddings is full; retry later")
        return reservation

    async def _receive(
        self, call: grpc.aio.UnaryStreamCall, reservation: Reservation | None
    ) -> list[VisualEmbedding]:
        """Read the Encode stream: per image a header, then its rows from shared memory or
        from the chunk messages that follow."""
        results: list[VisualEmbedding] = []
        header: vision_pb2.ImageHeader | None = None
        assembler: codec.EmbeddingAssembler | None = None
        header_at = 0.0
        # Cancelling this coroutine (client gone) cancels the call on the vision service.
        async for raw in call:
            message = codec.parse_response(raw)
            if isinstance(message, vision_pb2.ImageHeader):
                if assembler is not None:
                    raise VisionBadResponse(
                        "vision service started an image before finishing the last"
                    )
                header = message
                self._check_header(header, len(results))
                header_at = time.perf_counter()
                metrics.vision_queue_wait.observe(header.queue_ms / 1000)
                metrics.vision_encode.observe(header.encode_ms / 1000)
                shape = (header.num_visual_tokens, header.hidden_size)
                if codec.tensor_bytes(shape, header.dtype) != header.num_bytes:
                    raise VisionBadResponse(
                        f"vision service header announces {header.num_bytes} bytes for a "
                        f"{shape[0]}x{shape[1]} tensor"
                    )
                if header.HasField("shared_memory_offset"):
                    if reservation is None or self.arena is None:
                        raise VisionBadResponse(
                            "vision service wrote to shared memory it was not given"
                        )
                    rows = self.arena.rows(
                        reservation, header.shared_memory_offset, header.num_bytes
                    )
                    embeddings = codec.tensor_from_bytes(rows, shape, header.dtype)
                    if not self.arena.holds(reservation):  # copied while still ours?
                        raise VisionBadResponse("the shared-memory range changed hands")
                    metrics.embedding_bytes.labels(transport="shared_memory").inc(header.num_bytes)
                    metrics.vision_transfer.observe(time.perf_counter() - header_at)
                    results.append(messages.item_from_wire(header, embeddings))
                    continue
                if self.transport == "shared-memory":
                    raise VisionUnavailable(
                        "the vision service streamed embeddings instead of writing them to "
                        "shared memory (is it on another host, or started with "
                        "--no-shared-memory?); use --embedding-transport auto or grpc"
                    )
                assembler = codec.EmbeddingAssembler(shape, header.dtype)
                continue
            image_index, offset, data = message
            if assembler is None or header is None or image_index != header.image_index:
                raise VisionBadResponse(
                    "vision service sent embedding bytes without a matching header"
                )
            assembler.add(offset, data)
            metrics.embedding_bytes.labels(transport="grpc").inc(len(data))
            if assembler.complete:
                metrics.vision_transfer.observe(time.perf_counter() - header_at)
                results.append(messages.item_from_wire(header, assembler.tensor()))
                assembler = None
        return results

    def _check_header(self, header: vision_pb2.ImageHeader, expected_index: int) -> None:
        if header.image_index != expected_index:
            raise VisionBadResponse(
                f"vision service sent image {header.image_index}, expected {expected_index}"
            )
        if header.hidden_size != self.expected_hidden_size:
            raise VisionBadResponse(
                f"vision service embeddings are {header.hidden_size} wide but the language model "
                f"is {self.expected_hidden_size} wide: the two services run different models"
            )
        if sum(header.tokens_per_tile) != header.num_visual_tokens:
            raise VisionBadResponse(
                "vision service header is inconsistent (tokens per tile vs total)"
            )
        self._check_digest(header.checkpoint_digest, None)

    async def close(self) -> None:
        for watcher in self._watchers:
            watcher.cancel()
        for channel in self._channels:
            await channel.close()
        if self._arena_task is not None:
            await self._arena_task
        if self.arena is not None:
            self.arena.close()


def _open_channel(target: str, index: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", _SERVICE_CONFIG),
            ("grpc.max_receive_message_length", 2 * codec.MAX_CHUNK_BYTES),
            ("grpc.max_send_message_length", 256 * 1024 * 1024),
            # Notice a dead replica quickly, and come back quickly when it returns.
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2_000),
            # Channels with equal arguments share connections; these must not.
            ("grpc.use_local_subchannel_pool", 1),
            # A replica ending an aged connection (the vision service's --max-connection-age-ms)
            # makes the channel resolve the name again; gRPC allows that once per 30 s by
            # default, too slow to pick up new replicas.
            ("grpc.dns_min_time_between_resolutions_ms", DNS_RERESOLUTION_INTERVAL_MS),
            ("dvd.channel_index", index),
        ],
    )


def _max_tiles(image: ImageInput, call: EncodeCall, info: vision_pb2.ModelInfo) -> int:
    """The image's ``max_tiles`` as the vision service will take it; above the service's
    limit (which refuses the call) counted at the limit, which bounds the tiling arithmetic."""
    max_tiles = image.max_tiles or call.options.max_tiles or info.default_max_tiles
    return min(max_tiles, info.max_tiles_limit) if info.max_tiles_limit else max_tiles


def count_tiles(images: Sequence[tuple[bytes, int]], info: vision_pb2.ModelInfo) -> int:
    """The tiles of all these (encoded image, max_tiles), each counted by ``image_tiles``."""
    return sum(image_tiles(data, max_tiles, info) for data, max_tiles in images)


def image_tiles(data: bytes, max_tiles: int, info: vision_pb2.ModelInfo) -> int:
    """The tiles the vision service will cut from this image, from its size in the header
    (EXIF orientation applied), so that its shared-memory range fits its rows and no more.
    An image whose size cannot be read without decoding its pixels gets the most tiles it
    can make; one that makes more than counted here (a service with a larger ``min_tiles``,
    a PNG whose EXIF orientation comes after its pixels) streams."""
    most = most_tiles(max_tiles, info.use_thumbnail)
    size = displayed_size(data)
    if size is None:
        return most
    options = TilingOptions(
        max_tiles=max_tiles, use_thumbnail=info.use_thumbnail, tile_size=info.tile_size or 448
    )
    return min(options.plan(*size).num_tiles, most)


def displayed_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of an image as it is shown (EXIF orientation applied), read from its
    header by the Pillow plugins of the formats the vision service accepts; no pixel is
    decoded. None when that cannot be done (the vision service decides what is wrong)."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            if image.format not in IMAGE_FORMATS:  # a JPEG plugin's MPO, say: refused there
                return None
            width, height = _stored_size(image)
            if _orientation(image) in TRANSPOSED:
                width, height = height, width
    except Exception:
        return None
    if width < 1 or height < 1:
        return None
    return width, height


def _stored_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as the file stores the pixels, before any orientation."""
    if isinstance(image, TiffImagePlugin.TiffImageFile):
        # Recent Pillow reports a TIFF's size with its orientation applied (and applies it
        # when loading); older Pillow does neither. The tags say what is stored.
        tags = image.tag_v2
        width = tags.get(ExifTags.Base.ImageWidth, image.width)
        height = tags.get(ExifTags.Base.ImageLength, image.height)
        return int(width), int(height)
    return image.size


def _orientation(image: Image.Image) -> object:
    """The EXIF orientation among what ``Image.open`` read: JPEG's APP1, WebP's EXIF chunk,
    TIFF's tags, a PNG's chunks before its pixels."""
    if isinstance(image, PngImagePlugin.PngImageFile):
        # Pillow's PNG reader would decode the whole image to look for an eXIf chunk after
        # the pixels; the generic reader takes only the chunks that came before them (eXIf,
        # an EXIF text profile, XMP), which Image.open kept.
        exif = Image.Image.getexif(image)
    else:
        exif = image.getexif()
    return exif.get(ExifTags.Base.Orientation, 1)


# EXIF orientations that swap width and height (a quarter turn, with or without a mirror).
TRANSPOSED = frozenset({5, 6, 7, 8})


def _open_arena(transport: EmbeddingTransport, size_bytes: int) -> EmbeddingArena | None:
    """The arena to create at start-up: only when shared memory is required (a full
    ``/dev/shm`` then stops the service at once). ``auto`` creates it once a vision service
    has proved it sees it; until then it only unlinks what dead processes left behind."""
    if transport == "auto" and shm.available():
        shm.reclaim_orphans()
    if transport != "shared-memory":
        return None
    arena = EmbeddingArena(size_bytes)
    _log_arena(arena)
    return arena


def _log_arena(arena: EmbeddingArena) -> None:
    logger.info(
        "offering the vision service %d MiB of shared memory (%s) for embeddings",
        arena.size >> 20,
        arena.segment.name,
    )


def _new_probe() -> shm.ProbeSegment | None:
    """A probe segment for the next model check; None where this host has no shared memory."""
    if not shm.available():
        return None
    try:
        return shm.ProbeSegment()
    except shm.SharedMemoryError as exc:
        logger.info("no shared-memory probe: %s", exc)
        return None
