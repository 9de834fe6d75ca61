"""The language service sizes an image from its header only: no pixel is decoded, only the
formats the vision service accepts are parsed, and the reading happens off the event loop."""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import zlib
from collections.abc import Iterator

import pytest
from helpers import encode_image, noise_image
from PIL import ExifTags, Image, ImageFile

from llm_server.vision import grpc_client, shm_sizing
from llm_server.vision.shm_sizing import displayed_size, image_tiles
from protos.dvd.v1 import vision_pb2
from protos.image_formats import IMAGE_FORMATS
from protos.messages import EncodeCall, EncodeOptions, ImageInput
from protos.tiling import plan_tiles

INFO = vision_pb2.ModelInfo(tokens_per_tile=256, tile_size=448, use_thumbnail=True)


def _image_file_classes(base: type = ImageFile.ImageFile) -> Iterator[type]:
    yield base
    for subclass in base.__subclasses__():
        yield from _image_file_classes(subclass)


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every Pillow image reader fail the test when it decodes pixels (``load``)."""

    def load(self: ImageFile.ImageFile) -> None:
        raise AssertionError(f"{self.format} pixels were decoded")

    for cls in set(_image_file_classes()):
        if "load" in vars(cls):
            monkeypatch.setattr(cls, "load", load)


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return exif


def _png_chunk(tag: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(tag + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", crc)


def _huge_black_png(width: int, height: int, exif_after_pixels: bytes) -> bytes:
    """A 1-bit PNG of ``width`` x ``height`` black pixels (a few KB: all rows compress alike),
    with an eXIf chunk after its pixels, where only a full decode finds it."""
    row = bytes(1 + (width + 7) // 8)  # a filter byte, then the packed pixels
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", pixels),
            _png_chunk(b"eXIf", exif_after_pixels),
            _png_chunk(b"IEND", b""),
        ]
    )


# shm_sizing silences this warning when it is imported; pytest resets the filters after
# collecting the tests, which drops that.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_huge_png_is_sized_from_its_header(no_decoding: None) -> None:
    # 144 million pixels: decoding would take a second and 144 MB. Pillow's PNG reader would
    # decode them all just to look for EXIF after them; the count ignores that chunk.
    exif = _exif(6).tobytes()[len(b"Exif\x00\x00") :]
    data = _huge_black_png(16_000, 9_000, exif_after_pixels=exif)
    assert len(data) < 1_000_000
    assert displayed_size(data) == (16_000, 9_000)
    expected = plan_tiles(16_000, 9_000, max_tiles=12).num_tiles
    assert image_tiles(data, 12, INFO) == expected < 13


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_every_accepted_format_is_sized_without_decoding(fmt: str, no_decoding: None) -> None:
    data = encode_image(noise_image(570, 330, seed=1), fmt)
    assert displayed_size(data) == (570, 330)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize(
    ("orientation", "shown"), [(1, (570, 330)), (3, (570, 330)), (6, (330, 570)), (8, (330, 570))]
)
def test_exif_orientation_is_read_from_the_header(
    fmt: str, orientation: int, shown: tuple[int, int], no_decoding: None
) -> None:
    buffer = io.BytesIO()
    noise_image(570, 330, seed=2).save(buffer, fmt, exif=_exif(orientation))
    assert displayed_size(buffer.getvalue()) == shown


def test_a_quarter_turn_changes_the_count() -> None:
    buffer = io.BytesIO()
    noise_image(570, 330, seed=3).save(buffer, "JPEG", exif=_exif(6))
    assert image_tiles(buffer.getvalue(), 12, INFO) == 3  # 330 x 570: 1x2 and a thumbnail
    assert image_tiles(encode_image(noise_image(570, 330, seed=3), "JPEG"), 12, INFO) == 7


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "TGA", "PCX", "QOI"])
def test_other_formats_count_the_most_tiles(fmt: str) -> None:
    """Formats the vision service refuses are not even parsed: the most tiles."""
    data = encode_image(noise_image(64, 64, seed=4), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # a readable image, all the same
    assert displayed_size(data) is None
    assert image_tiles(data, 12, INFO) == 13
    assert image_tiles(data, 1, INFO) == 1


def test_a_multi_picture_jpeg_counts_the_most_tiles() -> None:
    """Pillow's JPEG reader opens a multi-picture file as MPO, which the vision service
    refuses."""
    buffer = io.BytesIO()
    image = noise_image(64, 64, seed=5)
    image.save(buffer, "MPO", save_all=True, append_images=[image])
    assert image_tiles(buffer.getvalue(), 6, INFO) == 7


def test_reservations_read_headers_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """All of a request's headers are read in one worker thread, never on the event loop;
    a ``max_tiles`` above the service's limit is counted at the limit."""
    threads: list[threading.Thread] = []
    count_tiles = shm_sizing.count_tiles

    def spy(images: list[tuple[bytes, int]], info: vision_pb2.ModelInfo) -> int:
        threads.append(threading.current_thread())
        return count_tiles(images, info)

    monkeypatch.setattr(shm_sizing, "count_tiles", spy)
    images = [ImageInput(b"not an image"), ImageInput(encode_image(noise_image(64, 64, 6)))]

    async def reserved() -> int:
        encoder = grpc_client.GrpcVisualEncoder(
            "127.0.0.1:9",
            timeout_s=1,
            expected_hidden_size=128,
            transport="shared-memory",
            shared_memory_bytes=64 * 1024 * 1024,
        )
        encoder.identity.info = vision_pb2.ModelInfo(
            hidden_size=128,
            dtype=vision_pb2.DTYPE_FLOAT32,
            tokens_per_tile=256,
            default_max_tiles=12,
            max_tiles_limit=40,
            use_thumbnail=True,
        )
        try:
            reservation = await encoder._reserve(
                EncodeCall(images, (), EncodeOptions(max_tiles=10**9))
            )
            assert reservation is not None
            return reservation.size
        finally:
            await encoder.close()

    size = asyncio.run(reserved())
    assert len(threads) == 1 and threads[0] is not threading.main_thread()
    row = 128 * 4
    assert (41 + 1) * 256 * row <= size < (41 + 1) * 256 * row + 1024 * 1024
