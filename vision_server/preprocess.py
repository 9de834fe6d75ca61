"""Encoded image bytes -> uint8 tiles, as InternVL cuts them (Pillow only).

CPU-heavy (decode, resize) and fed untrusted bytes: the service runs it in its media worker
processes (``vision_server/media_worker.py``), which write the tiles straight into shared
memory (``write_grid``, ``write_thumbnail``). torch is imported only by the functions that
return tensors (``tile_image``, ``prepare_image``: in-process use, tests and benchmarks), so
that a worker never loads it (a second of start-up and hundreds of MB of address space under
the worker's memory limit).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from protos.image_formats import IMAGE_FORMATS
from protos.tiling import TileGrid, TilingOptions
from vision_server.errors import MEMORY_LIMIT_REASON, InvalidImage
from vision_server.pixels import rgb_pixels

if TYPE_CHECKING:
    import torch

BICUBIC = Image.Resampling.BICUBIC

DEFAULT_FORMATS = frozenset(IMAGE_FORMATS)


@dataclass(frozen=True)
class ImageLimits:
    max_image_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    allowed_formats: frozenset[str] = DEFAULT_FORMATS


@dataclass(frozen=True)
class PreparedImage:
    # uint8 pixels, 4x smaller than float32: normalised on the encoder's device
    # (vision_server.model.encoder.normalise_tiles).
    tiles: torch.Tensor  # [num_tiles, 3, 448, 448] uint8
    grid: TileGrid

    @property
    def num_tiles(self) -> int:
        return int(self.tiles.shape[0])


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode and validate one encoded image; the pixel count is checked before decoding."""
    if not data:
        raise InvalidImage("image is empty")
    if len(data) > limits.max_image_bytes:
        raise InvalidImage(
            f"image is {len(data)} bytes; the limit is {limits.max_image_bytes} bytes"
        )
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below is the decompression-bomb guard.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = image.format or "unknown"
            if fmt not in limits.allowed_formats:
                allowed = ", ".join(sorted(limits.allowed_formats))
                raise InvalidImage(f"image format {fmt} is not accepted (allowed: {allowed})")
            width, height = image.size
            if width * height > limits.max_pixels:
                raise InvalidImage(
                    f"image is {width}x{height} = {width * height} pixels; "
                    f"the limit is {limits.max_pixels} pixels"
                )
            image.load()
    except InvalidImage:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
    ) as exc:
        raise InvalidImage(f"cannot decode image: {exc}") from exc
    except MemoryError as exc:  # the worker's address-space limit (RLIMIT_AS)
        raise InvalidImage(f"cannot decode image: {MEMORY_LIMIT_REASON}") from exc
    if image.width < 1 or image.height < 1:
        raise InvalidImage("image has no pixels")
    # Phone photos store their orientation in EXIF; what the user sees is the transposed image.
    # In place: without an orientation tag there is nothing to do, and no copy is made.
    ImageOps.exif_transpose(image, in_place=True)
    return image


@dataclass(frozen=True)
class PlannedImage:
    """A decoded RGB image and its tile plan, not cut yet. Its grid tiles and its thumbnail
    are independent (``write_grid``, ``write_thumbnail``: two threads can cut them at once,
    as Pillow releases the GIL while resizing)."""

    rgb: Image.Image
    grid: TileGrid


def plan_image(image: Image.Image, options: TilingOptions) -> PlannedImage:
    # convert() copies even an RGB image; most images are RGB already.
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    grid = options.plan(rgb.width, rgb.height)
    return PlannedImage(rgb, grid)


def write_grid(out: np.ndarray, planned: PlannedImage) -> None:
    """The grid tiles into ``out[:grid_tiles]`` ([n, 3, size, size] uint8), row-major."""
    rgb, grid = planned.rgb, planned.grid
    # Pillow returns a copy when the size is already right; skip even that.
    resized = rgb if rgb.size == grid.resized_size else rgb.resize(grid.resized_size, BICUBIC)
    # Each tile is written once, as [3, size, size], straight from the resized pixels (no
    # per-tile images, no stacking): the host's share of an image is mostly decode and resize.
    with rgb_pixels(resized) as pixels:  # [H, W, 3]
        for index, (left, top, right, bottom) in enumerate(grid.tile_boxes()):
            out[index] = pixels[top:bottom, left:right].transpose(2, 0, 1)


def write_thumbnail(out: np.ndarray, planned: PlannedImage) -> None:
    """The whole image at one tile's size into ``out`` ([3, size, size] uint8)."""
    size = planned.grid.tile_size
    with rgb_pixels(planned.rgb.resize((size, size), BICUBIC)) as pixels:
        out[...] = pixels.transpose(2, 0, 1)


def empty_tiles(count: int, size: int) -> np.ndarray:
    """Room for ``count`` tiles, ``[count, 3, size, size]`` uint8."""
    return np.empty((count, 3, size, size), dtype=np.uint8)


def tile_image(image: Image.Image, options: TilingOptions) -> PreparedImage:
    """Cut a decoded image into InternVL tiles (plus thumbnail), as uint8 pixels."""
    import torch

    planned = plan_image(image, options)
    tiles = empty_tiles(planned.grid.num_tiles, planned.grid.tile_size)
    write_tiles(tiles, planned)
    return PreparedImage(tiles=torch.from_numpy(tiles), grid=planned.grid)


def write_tiles(out: np.ndarray, planned: PlannedImage) -> None:
    """All of ``planned``'s tiles, grid then thumbnail, into ``out`` ([n, 3, size, size])."""
    write_grid(out, planned)
    if planned.grid.thumbnail:
        write_thumbnail(out[planned.grid.grid_tiles], planned)


def prepare_image(data: bytes, limits: ImageLimits, options: TilingOptions) -> PreparedImage:
    """Bytes -> validated, tiled image (uint8 pixels; the encoder normalises them)."""
    return tile_image(decode_image(data, limits), options)
