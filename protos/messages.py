"""The vision contract in Python: what one Encode call asks for, what it answers, and why it
fails, as frozen types; and the one conversion of each to and from its ``dvd.v1`` message.

The language service builds an ``EncodeCall`` and gets an ``EncodeResult`` back, whichever
encoder serves it (the gRPC client or the in-process one); the vision service's servicer
reads the call from the wire and its pipeline answers it with ``VisualEmbedding`` items. Only
this module knows how these map to ``vision.proto``'s messages (``codec.py`` knows the bytes
of the rows). On the wire the items are one sequence, the images then the videos; here they
are kept apart (``EncodeResult.images``, ``EncodeResult.videos``), so that no caller counts
positions across the two.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING

from protos.dvd.v1 import vision_pb2
from protos.options import VirMode, vir_from_wire, vir_to_wire
from protos.tiling import TileGrid

if TYPE_CHECKING:
    import torch

# torch (and the codec, which needs it) is imported where rows are handled, not here: the
# vision service's media workers import the error types below and must not load torch.

# ---- the call -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInput:
    """One image of a call: its encoded file and an optional cap on its grid tiles."""

    data: bytes
    max_tiles: int | None = None  # None: the call's
    max_visual_tokens: int | None = None  # None: no cap of its own


@dataclass(frozen=True)
class VideoInput:
    """One video of a call: its encoded file and how many frames to sample from it."""

    data: bytes
    num_frames: int | None = None  # None: the vision service's default


@dataclass(frozen=True)
class EncodeOptions:
    """What applies to every image of a call."""

    max_tiles: int | None = None  # None: the checkpoint's default
    vir: VirMode | None = None  # None: the vision service's default (auto)
    vir_threshold: float | None = None  # None: the checkpoint's absolute router threshold
    # Most visual tokens the call's items may take together (None: no budget); see
    # vision_server.routing.compress_to_fit.
    max_visual_tokens: int | None = None


@dataclass(frozen=True)
class EncodeCall:
    """The images and videos of one chat request, to be encoded together: all their tiles
    are routed as one set."""

    images: Sequence[ImageInput] = ()
    videos: Sequence[VideoInput] = ()
    options: EncodeOptions = EncodeOptions()
    request_id: str = ""


def call_to_wire(call: EncodeCall) -> vision_pb2.EncodeRequest:
    """The ``EncodeRequest`` of ``call`` (0 on the wire where the call leaves a value open)."""
    options = call.options
    return vision_pb2.EncodeRequest(
        request_id=call.request_id,
        images=[
            vision_pb2.Image(
                data=image.data,
                max_tiles=image.max_tiles or 0,
                max_visual_tokens=image.max_visual_tokens,
            )
            for image in call.images
        ],
        videos=[
            vision_pb2.Video(data=video.data, num_frames=video.num_frames or 0)
            for video in call.videos
        ],
        options=vision_pb2.EncodeOptions(
            max_tiles=options.max_tiles or 0,
            vir_mode=vir_to_wire(options.vir),
            vir_threshold=options.vir_threshold,
            max_visual_tokens=options.max_visual_tokens,
        ),
    )


def call_from_wire(request: vision_pb2.EncodeRequest, request_id: str) -> EncodeCall:
    """The call an ``EncodeRequest`` makes, under ``request_id``. Raises ``ContractError``
    (``field``: ``options.vir_mode``) for a router mode this side does not know."""
    options = request.options
    try:
        vir = vir_from_wire(options.vir_mode)
    except ValueError as exc:
        raise ContractError(str(exc), field=Field.VIR_MODE) from None
    return EncodeCall(
        images=[
            ImageInput(
                image.data,
                image.max_tiles or None,
                image.max_visual_tokens if image.HasField("max_visual_tokens") else None,
            )
            for image in request.images
        ],
        videos=[VideoInput(video.data, video.num_frames or None) for video in request.videos],
        options=EncodeOptions(
            max_tiles=options.max_tiles or None,
            vir=vir,
            vir_threshold=options.vir_threshold if options.HasField("vir_threshold") else None,
            max_visual_tokens=(
                options.max_visual_tokens if options.HasField("max_visual_tokens") else None
            ),
        ),
        request_id=request_id,
    )


class RowSelection(StrEnum):
    """Which rows of its tiles an image sends, as far as is known when they are encoded."""

    FULL = "full"  # every tile's 256 rows: vir off, or a checkpoint without a router
    COMPRESSED = "compressed"  # every tile's 64 rows: vir max
    # Chosen over all tiles of the call: vir auto, or vir off under a visual-token budget.
    ROUTED = "routed"

    @classmethod
    def for_mode(cls, applied: VirMode | None, budgeted: bool = False) -> RowSelection:
        """The selection under the router mode ``applied`` (None: the checkpoint has no
        router, so every tile keeps its rows), ``budgeted`` when the call caps its visual
        tokens (``max_visual_tokens``: under ``off`` the budget alone routes the tiles)."""
        if applied is VirMode.MAX:
            return cls.COMPRESSED
        if applied is VirMode.AUTO or (applied is VirMode.OFF and budgeted):
            return cls.ROUTED
        return cls.FULL


# ---- the answer -----------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoFrames:
    """Which frames of a video its rows are (tile i is sampled frame i), and what its
    container says of it."""

    video_index: int  # in EncodeCall.videos
    frame_numbers: Sequence[int]  # 0-based, presentation order
    total_frames: int = 0
    duration_s: float = 0.0
    fps: float = 0.0


@dataclass(frozen=True)
class VisualEmbedding:
    """The rows that replace one image's placeholders in the prompt, or one video's: then
    each tile is a frame, and ``frames`` says which frames of the video they are."""

    embeddings: torch.Tensor  # [num_visual_tokens, llm_hidden]
    tokens_per_tile: list[int]
    full_tokens_per_tile: int  # tokens of an uncompressed tile (256)
    vir: VirMode | None = None  # router mode applied; None: the checkpoint has no router
    from_cache: bool = False  # the vision service's embedding cache served it
    frames: VideoFrames | None = None  # set for a video
    grid: TileGrid | None = None  # how the image was tiled (a video: 1x1, one tile a frame)
    queue_ms: float = 0.0  # its tiles' wait for a forward pass
    encode_ms: float = 0.0  # the passes that encoded them

    @property
    def is_video(self) -> bool:
        return self.frames is not None

    @property
    def frame_numbers(self) -> list[int] | None:
        """A video's sampled frames; None for an image."""
        return list(self.frames.frame_numbers) if self.frames is not None else None

    def frame_rows(self) -> list[torch.Tensor]:
        """A video's rows split per frame (each frame is one tile): ``[tokens, hidden]`` each."""
        import torch

        return list(torch.split(self.embeddings, self.tokens_per_tile))

    @property
    def num_visual_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def num_compressed_tiles(self) -> int:
        return sum(1 for tokens in self.tokens_per_tile if tokens < self.full_tokens_per_tile)

    @property
    def tokens_saved(self) -> int:
        """Rows the router removed from this image."""
        return len(self.tokens_per_tile) * self.full_tokens_per_tile - self.num_visual_tokens


@dataclass(frozen=True)
class EncodeResult:
    """The answer to one ``EncodeCall``: an item per image and per video, in call order."""

    images: Sequence[VisualEmbedding] = ()
    videos: Sequence[VisualEmbedding] = ()

    @property
    def items(self) -> list[VisualEmbedding]:
        return [*self.images, *self.videos]


def result_of(call: EncodeCall, items: Iterable[VisualEmbedding]) -> EncodeResult:
    """The result that answers ``call`` with ``items``, as they come (the images, then the
    videos). Raises ``ContractError`` unless they are one per image and per video, in order,
    and every video has one tile per frame it asked for."""
    images: list[VisualEmbedding] = []
    videos: list[VisualEmbedding] = []
    for item in items:
        if item.frames is None:
            if videos:
                raise ContractError("the vision service answered an image after a video")
            images.append(item)
        else:
            videos.append(item)
    if len(images) != len(call.images) or len(videos) != len(call.videos):
        raise ContractError(
            f"the vision service returned {len(images)} of {len(call.images)} images and "
            f"{len(videos)} of {len(call.videos)} videos"
        )
    for index, (video, asked) in enumerate(zip(videos, call.videos, strict=True)):
        frames = video.frames
        assert frames is not None
        tiles = len(video.tokens_per_tile)
        expected = asked.num_frames
        if (
            frames.video_index != index
            or len(frames.frame_numbers) != tiles
            or (expected is not None and tiles != expected)
        ):
            raise ContractError(
                f"the vision service answered video {index} with {tiles} tiles, expected "
                f"{expected if expected is not None else len(frames.frame_numbers)} frames"
            )
    _check_budget(call, images, videos)
    return EncodeResult(images, videos)


def _check_budget(
    call: EncodeCall, images: Sequence[VisualEmbedding], videos: Sequence[VisualEmbedding]
) -> None:
    """A reply over the call's ``max_visual_tokens`` (under a mode that honours it: not
    ``max``) comes from a vision service that does not know the budget: refused, never
    passed on as if the budget held."""
    if any(item.vir is VirMode.MAX for item in (*images, *videos)):
        return
    caps = [
        (image.max_visual_tokens, [item]) for image, item in zip(call.images, images, strict=True)
    ]
    caps.append((call.options.max_visual_tokens, [*images, *videos]))
    for cap, items in caps:
        tokens = sum(item.num_visual_tokens for item in items)
        if cap is not None and tokens > cap:
            raise ContractError(
                f"the vision service answered {tokens} visual tokens over a budget of "
                f"max_visual_tokens={cap} (a vision service that does not apply the budget)"
            )


def header_to_wire(
    item: VisualEmbedding, position: int, checkpoint_digest: str
) -> vision_pb2.ImageHeader:
    """The header of ``item``, the ``position``-th of its reply (images first, then videos)."""
    from protos import codec

    rows = item.embeddings
    grid = item.grid
    frames = item.frames
    return vision_pb2.ImageHeader(
        image_index=position,
        num_tiles=len(item.tokens_per_tile),
        tokens_per_tile=item.tokens_per_tile,
        num_visual_tokens=item.num_visual_tokens,
        hidden_size=int(rows.shape[1]),
        dtype=codec.wire_dtype(rows.dtype),
        num_bytes=rows.numel() * rows.element_size(),
        grid_columns=grid.columns if grid is not None else 0,
        grid_rows=grid.rows if grid is not None else 0,
        has_thumbnail=grid.thumbnail if grid is not None else False,
        queue_ms=item.queue_ms,
        encode_ms=item.encode_ms,
        vir_mode=vir_to_wire(item.vir),
        full_tokens_per_tile=item.full_tokens_per_tile,
        from_cache=item.from_cache,
        checkpoint_digest=checkpoint_digest,
        video=(
            vision_pb2.VideoFrames(
                video_index=frames.video_index,
                frame_numbers=frames.frame_numbers,
                total_frames=frames.total_frames,
                duration_s=frames.duration_s,
                fps=frames.fps,
            )
            if frames is not None
            else None
        ),
    )


def item_from_wire(header: vision_pb2.ImageHeader, embeddings: torch.Tensor) -> VisualEmbedding:
    """The item a header describes, with its rows (read from chunks or shared memory).
    Raises ``ContractError`` for a router mode this side does not know."""
    try:
        vir = vir_from_wire(header.vir_mode)
    except ValueError as exc:
        raise ContractError(f"the vision service sent {exc}") from None
    frames = None
    if header.HasField("video"):
        video = header.video
        frames = VideoFrames(
            video.video_index,
            list(video.frame_numbers),
            video.total_frames,
            video.duration_s,
            video.fps,
        )
    grid = None
    if header.grid_columns and header.grid_rows:
        grid = TileGrid(header.grid_columns, header.grid_rows, header.has_thumbnail)
    return VisualEmbedding(
        embeddings,
        list(header.tokens_per_tile),
        # Services that predate full_tokens_per_tile: the largest tile kept them all.
        header.full_tokens_per_tile or max(header.tokens_per_tile, default=0),
        vir,
        header.from_cache,
        frames,
        grid,
        header.queue_ms,
        header.encode_ms,
    )


# ---- errors ---------------------------------------------------------------------------------


class ErrorCode(IntEnum):
    """Why the vision service refused or failed a call (``dvd.v1.ErrorCode``)."""

    UNSPECIFIED = vision_pb2.ERROR_CODE_UNSPECIFIED
    INVALID_REQUEST = vision_pb2.ERROR_CODE_INVALID_REQUEST
    INVALID_IMAGE = vision_pb2.ERROR_CODE_INVALID_IMAGE
    INVALID_VIDEO = vision_pb2.ERROR_CODE_INVALID_VIDEO
    TOO_MANY_IMAGES = vision_pb2.ERROR_CODE_TOO_MANY_IMAGES
    OVERLOADED = vision_pb2.ERROR_CODE_OVERLOADED
    OUT_OF_MEMORY = vision_pb2.ERROR_CODE_OUT_OF_MEMORY
    ENCODE_FAILED = vision_pb2.ERROR_CODE_ENCODE_FAILED
    UNAVAILABLE = vision_pb2.ERROR_CODE_UNAVAILABLE
    INTERNAL = vision_pb2.ERROR_CODE_INTERNAL


class Field(StrEnum):
    """The ``EncodeRequest`` fields an error can be about (``ErrorDetail.field``)."""

    IMAGES = "images"
    IMAGE_MAX_TILES = "images.max_tiles"
    VIDEOS = "videos"
    NUM_FRAMES = "videos.num_frames"
    MAX_TILES = "options.max_tiles"
    VIR_MODE = "options.vir_mode"
    VIR_THRESHOLD = "options.vir_threshold"
    MAX_VISUAL_TOKENS = "options.max_visual_tokens"
    IMAGE_MAX_VISUAL_TOKENS = "images.max_visual_tokens"


# The trailing-metadata key of ``ErrorDetail`` (binary: the "-bin" suffix).
ERROR_METADATA_KEY = "dvd-error-bin"


@dataclass(frozen=True)
class ErrorDetail:
    """What an error is, for machines: its code and the field it is about (empty: none)."""

    code: ErrorCode
    field: str = ""


class ContractError(ValueError):
    """A message that does not follow the contract (an unknown enum value, a reply that does
    not answer its call); ``field``: the request field it is about, when it is one."""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field


def error_metadata(detail: ErrorDetail) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata that carries ``detail`` with an error status."""
    wire = vision_pb2.ErrorDetail(code=vision_pb2.ErrorCode.Name(detail.code), field=detail.field)
    return ((ERROR_METADATA_KEY, wire.SerializeToString()),)


def error_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> ErrorDetail | None:
    """The ``ErrorDetail`` in an error's trailing metadata; None when there is none (a peer
    that predates it, an error of gRPC's own) or it cannot be read."""
    for key, value in metadata or ():
        if key != ERROR_METADATA_KEY or not isinstance(value, bytes):
            continue
        try:
            wire = vision_pb2.ErrorDetail.FromString(value)
        except Exception:  # protobuf's DecodeError: a garbled detail counts as none
            return None
        try:
            code = ErrorCode(wire.code)
        except ValueError:  # a code from a newer peer: known only by its status
            return None
        return ErrorDetail(code, wire.field) if code is not ErrorCode.UNSPECIFIED else None
    return None


# ---- request limits -------------------------------------------------------------------------
# The words of a refusal over a limit, the same whichever service catches it first.


def too_many(what: str, count: int, limit: int) -> str:
    """``what`` ("images", "videos"): more of them than one request may hold."""
    return f"{count} {what} in one request; the limit is {limit}"


def over_limit(option: str, value: int, limit: int, unit: str) -> str:
    """An option (``max_tiles``, ``num_frames``) over the limit, in ``unit`` ("tiles per
    image", "frames per video")."""
    return f"{option}={value} exceeds this server's limit of {limit} {unit}"
