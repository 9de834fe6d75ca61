"""How many bytes of shared memory an Encode call's rows can take, so that the range reserved
for it fits them and no more.

An image's rows depend on its tiles, and its tiles on its size: this reads each image's size
from its header (EXIF orientation applied) and tiles it as the vision service will; a video
takes one tile per frame. Only headers are read, never pixels (the vision service decodes,
under its own pixel limit).
"""

from __future__ import annotations

import asyncio
import io
import warnings
from collections.abc import Sequence

from PIL import ExifTags, Image, PngImagePlugin, TiffImagePlugin

from protos import codec
from protos.dvd.v1 import vision_pb2
from protos.image_formats import IMAGE_FORMATS
from protos.messages import EncodeCall, ImageInput
from protos.tiling import TilingOptions, most_tiles

# Pillow warns of a possible decompression bomb when it reads a large image's header. This
# process reads headers only, never pixels (the vision service decodes, under its own pixel
# limit), so the warning says nothing here; and it is raised in worker threads, where
# warnings.catch_warnings is not safe (it swaps a process-wide list).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning, module=r"PIL\.Image")


async def rows_bytes(call: EncodeCall, info: vision_pb2.ModelInfo) -> int | None:
    """The most bytes the call's images and videos can produce (a video: one tile per frame);
    None when that is not known here, and the rows stream instead."""
    if any(video.num_frames is None for video in call.videos):
        return None  # frames only the vision service knows
    try:
        row_bytes = codec.tensor_bytes((info.hidden_size,), info.dtype)
    except codec.CodecError:  # a service that does not describe its rows
        return None
    counted = [(image.data, _max_tiles(image, call, info)) for image in call.images]
    # Reading the headers parses the request's bytes: off the event loop, in one hop.
    tiles = await asyncio.to_thread(count_tiles, counted, info)
    tiles += sum(video.num_frames or 0 for video in call.videos)
    return tiles * info.tokens_per_tile * row_bytes


# Frames counted for a video that leaves its count to the vision service (its default).
_UNKNOWN_VIDEO_FRAMES = 8


async def call_tiles(call: EncodeCall, info: vision_pb2.ModelInfo) -> int:
    """The tiles ``call`` will take on a vision replica, counted from its images' headers (a
    video: its frames); what a replica's load is measured in. At least 1."""
    # At least 1 tile each (a service that does not describe its tiling counts one per image).
    counted = [(image.data, max(_max_tiles(image, call, info), 1)) for image in call.images]
    tiles = await asyncio.to_thread(count_tiles, counted, info) if counted else 0
    tiles += sum(video.num_frames or _UNKNOWN_VIDEO_FRAMES for video in call.videos)
    return max(tiles, 1)


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
