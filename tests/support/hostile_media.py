"""A corpus of hostile media, generated: small files that cost a decoder far more than their
size, files that are truncated or corrupt, and videos whose headers say one thing and whose
frames another."""

from __future__ import annotations

import io
import struct
import zlib
from fractions import Fraction

import numpy as np
from PIL import Image

# The formats the vision service accepts, as Pillow names them.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(side: int) -> bytes:
    """A valid greyscale PNG of ``side`` x ``side`` black pixels (12000: about 140 KB)."""
    row = bytes(side + 1)  # filter byte, then the pixels
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grey
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )


def bmp_bomb(side: int) -> bytes:
    """A valid 8-bit RLE BMP of ``side`` x ``side`` black pixels (a few hundred KB): runs of
    255 pixels, two bytes each."""
    full, rest = divmod(side, 255)
    row = b"\xff\x00" * full + (bytes([rest, 0]) if rest else b"") + b"\x00\x00"
    pixels = row * side + b"\x00\x01"  # end of line per row, then end of bitmap
    palette = b"\x00\x00\x00\x00" * 256
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    return (
        b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels
    )


def image_bomb(fmt: str, side: int = 12000) -> bytes:
    """A small ``fmt`` file of ``side`` x ``side`` black pixels: its header passes any check
    of the file's size, and decoding it needs hundreds of MB."""
    if fmt == "PNG":
        return png_bomb(side)
    if fmt == "BMP":
        return bmp_bomb(side)
    image = Image.new("L", (side, side))
    buffer = io.BytesIO()
    options = {
        "JPEG": {"quality": 1},
        "WEBP": {"lossless": True, "method": 0},
        "GIF": {},
        "TIFF": {"compression": "tiff_deflate"},
    }[fmt]
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def truncated(data: bytes) -> bytes:
    """The first third of a file."""
    return data[: max(16, len(data) // 3)]


def corrupt(data: bytes, seed: int = 0) -> bytes:
    """``data`` with 2% of the bytes after its first 64 replaced by noise (the signature
    survives, so the right decoder opens it)."""
    rng = np.random.default_rng(seed)
    noisy = bytearray(data)
    positions = rng.integers(min(64, len(data) - 1), len(data), max(1, len(data) // 50))
    for position in positions:
        noisy[position] = int(rng.integers(0, 256))
    return bytes(noisy)


# The codec id each container stores, and a same-length id no decoder knows.
_CODEC_IDS = {
    "mp4": (b"avc1", b"zzzz"),
    "mov": (b"avc1", b"zzzz"),
    "matroska": (b"V_MPEG4/ISO/AVC", b"V_DVD/UNKNOWN/X"),
    "webm": (b"V_VP9", b"V_ZZ9"),
}


def unknown_codec(encoded: bytes, fmt: str) -> bytes:
    """A video of container ``fmt`` (made by ``helpers.encode_video``) whose stream names a
    codec FFmpeg has no decoder for."""
    known, unknown = _CODEC_IDS[fmt]
    assert known in encoded, f"{known!r} not in the {fmt} file"
    return encoded.replace(known, unknown)


def repeated_frames_video(width: int, height: int, frames: int, fps: int = 30) -> bytes:
    """An H.264 MP4 of ``frames`` frames from two encoded ones: a key frame, then one inter
    frame (every block skipped) muxed again and again, about 25 bytes each. A few hundred KB
    of file, a full decode of every frame: what the headers say is true, and the cost is
    ``frames`` x ``width`` x ``height``."""
    import av

    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, "yuv420p"
    codec.time_base = Fraction(1, fps)
    codec.options = {"preset": "ultrafast", "tune": "zerolatency"}
    black = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24")
    black = black.reformat(format="yuv420p")
    packets = []
    for pts in range(2):
        black.pts = pts
        packets += [bytes(packet) for packet in codec.encode(black)]
    packets += [bytes(packet) for packet in codec.encode(None)]
    key, inter = packets[0], packets[1]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.extradata = codec.extradata
        for index in range(frames):
            packet = av.Packet(key if index == 0 else inter)
            packet.stream = stream
            packet.time_base = Fraction(1, fps)
            packet.pts = packet.dts = index
            packet.is_keyframe = index == 0
            container.mux(packet)
    return buffer.getvalue()


def _jpeg(width: int, height: int, level: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (level,) * 3).save(buffer, "JPEG", quality=50)
    return buffer.getvalue()


def growing_frames_video(sizes: list[tuple[int, int]], fmt: str = "avi", fps: int = 10) -> bytes:
    """A Motion JPEG video whose frames have the given sizes (its header states the first):
    each frame is a JPEG of its own, so a frame may grow mid-stream."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream("mjpeg", rate=fps)
        stream.width, stream.height = sizes[0]
        stream.pix_fmt = "yuvj420p"
        for index, (width, height) in enumerate(sizes):
            packet = av.Packet(_jpeg(width, height, 8 * index))
            packet.stream = stream
            packet.time_base = Fraction(1, fps)
            packet.pts = packet.dts = index
            packet.is_keyframe = True
            container.mux(packet)
    return buffer.getvalue()
