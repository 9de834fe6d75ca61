"""Encoded video bytes -> sampled frames as uint8 tiles, as InternVL3.5's reference does it.

The reference (the model card's ``load_video``) samples ``num_frames`` frames at the middle of
``num_frames`` equal segments of the whole video (``get_index``), converts each to RGB, and
cuts each into a single 448x448 tile (``dynamic_preprocess`` with ``max_num=1``: a bicubic
resize, no thumbnail). The prompt then reads ``Frame1: <image>\\nFrame2: <image>\\n…``.

Decoding uses PyAV (FFmpeg's libraries, bundled in its wheel). Only a few container formats
and codecs are opened at all, and the limits (bytes, resolution, duration, frames) are checked
from the container's header and from its packets, before any frame is decoded. CPU-heavy: the
service runs it in its preprocessing thread pool, never on the event loop.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from vision_server.errors import InvalidVideo
from vision_server.preprocess import PreparedImage, TilingOptions, tile_image

if TYPE_CHECKING:
    import av

# FFmpeg demuxer names, as FFmpeg lists them (one name may cover several extensions). Anything
# else (playlists, image sequences, raw streams) is refused before it is even probed.
VIDEO_FORMATS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi")
# Decoders (FFmpeg's names, with the external decoders the wheel may pick for the same codec).
VIDEO_CODECS = frozenset(
    {"h264", "hevc", "vp8", "libvpx", "vp9", "libvpx-vp9", "av1", "libdav1d", "mpeg4", "mjpeg"}
)
# Bounds on FFmpeg's probing of the header (bytes read, microseconds of stream analysed).
_PROBE_OPTIONS = {"probesize": "5000000", "analyzeduration": "5000000"}


@dataclass(frozen=True)
class VideoLimits:
    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 3840 * 2160  # width x height of a frame
    max_duration_s: float = 600.0
    max_decoded_frames: int = 36_000  # frames in the video: decoding cost


@dataclass(frozen=True)
class VideoStreamInfo:
    """What the container says about its video stream, and what its packets show."""

    width: int
    height: int
    total_frames: int  # video packets: one per frame
    duration_s: float
    fps: float


@dataclass(frozen=True)
class PreparedVideo:
    """A video's sampled frames, one tile each."""

    frames: PreparedImage  # tiles: [num_frames, 3, 448, 448] uint8; grid: 1x1, no thumbnail
    frame_numbers: list[int]  # the decoded frame each sample is (0-based, presentation order)
    info: VideoStreamInfo
    num_frames: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_frames", len(self.frame_numbers))


@dataclass(frozen=True)
class SampledFrames:
    """Which video an encoded item is, and which of its frames were sampled (for its header)."""

    video_index: int  # in the call's videos
    frame_numbers: list[int]
    info: VideoStreamInfo


def segment_middles(total_frames: int, num_frames: int) -> list[int]:
    """The frames sampled from a video of ``total_frames`` frames: the middle of each of
    ``num_frames`` equal segments, exactly the model card's ``get_index`` over the whole video
    (its ``max_frame`` is the last frame's index; numpy's round, half to even). A video shorter
    than ``num_frames`` gives repeated frames, as the reference does."""
    if total_frames < 1 or num_frames < 1:
        raise ValueError(f"need at least one frame, got {total_frames} and {num_frames}")
    start, end = 0, total_frames - 1
    segment = float(end - start) / num_frames
    return [int(start + segment / 2 + np.round(segment * index)) for index in range(num_frames)]


def _open(data: bytes) -> av.container.InputContainer:
    import av  # imported on first use: a service that never sees a video never loads FFmpeg

    options = {"format_whitelist": ",".join(VIDEO_FORMATS), **_PROBE_OPTIONS}
    try:
        return av.open(io.BytesIO(data), mode="r", options=options)
    except av.error.FFmpegError as exc:
        accepted = "MP4/MOV, WebM/Matroska, AVI"
        raise InvalidVideo(f"cannot open video (accepted containers: {accepted}): {exc}") from exc


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise InvalidVideo("the file has no video stream")
    stream = container.streams.video[0]
    codec = stream.codec_context.name
    if codec not in VIDEO_CODECS:
        allowed = "H.264, HEVC, VP8, VP9, AV1, MPEG-4 Part 2, Motion JPEG"
        raise InvalidVideo(f"video codec {codec} is not accepted (allowed: {allowed})")
    return stream


def _check_header(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    limits: VideoLimits,
) -> tuple[int, int]:
    width, height = stream.codec_context.width, stream.codec_context.height
    if width < 1 or height < 1:
        raise InvalidVideo("video frames have no size")
    if width * height > limits.max_pixels:
        raise InvalidVideo(
            f"video frames are {width}x{height} = {width * height} pixels; "
            f"the limit is {limits.max_pixels} pixels"
        )
    if container.duration is not None:  # the header's claim (microseconds); packets checked next
        import av

        _check_duration(container.duration / av.time_base, limits)
    return width, height


def _check_duration(duration_s: float, limits: VideoLimits) -> None:
    if duration_s > limits.max_duration_s:
        raise InvalidVideo(
            f"video is {duration_s:.1f} s long; the limit is {limits.max_duration_s:g} s"
        )


def _scan_packets(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    limits: VideoLimits,
) -> tuple[int, float]:
    """Frames and duration from the packets (read, not decoded): headers may lie."""
    frames = 0
    first: int | None = None
    last = 0
    for packet in container.demux(stream):
        if not packet.size:  # the demuxer's final, empty packet
            continue
        frames += 1
        if frames > limits.max_decoded_frames:
            raise InvalidVideo(f"video has more than {limits.max_decoded_frames} frames, the limit")
        if packet.pts is not None:
            end = packet.pts + (packet.duration or 0)
            first = packet.pts if first is None else min(first, packet.pts)
            last = max(last, end)
    time_base = stream.time_base or Fraction(0)
    duration_s = float((last - first) * time_base) if first is not None else 0.0
    _check_duration(duration_s, limits)
    return frames, duration_s


def probe_video(data: bytes, limits: VideoLimits) -> VideoStreamInfo:
    """Open, check and measure a video without decoding any frame."""
    if not data:
        raise InvalidVideo("video is empty")
    if len(data) > limits.max_bytes:
        raise InvalidVideo(f"video is {len(data)} bytes; the limit is {limits.max_bytes} bytes")
    import av

    try:
        with _open(data) as container:
            stream = _video_stream(container)
            width, height = _check_header(container, stream, limits)
            total_frames, duration_s = _scan_packets(container, stream, limits)
            fps = float(stream.average_rate or 0)
    except av.error.FFmpegError as exc:
        raise InvalidVideo(f"cannot read video: {exc}") from exc
    if total_frames < 1:
        raise InvalidVideo("video has no frames")
    return VideoStreamInfo(width, height, total_frames, duration_s, fps)


def decode_frames(data: bytes, frame_numbers: list[int]) -> dict[int, Image.Image]:
    """The RGB images of the wanted frames (presentation order), decoding only as far as the
    last one. Raises ``InvalidVideo`` when the stream is corrupt or ends early."""
    wanted = set(frame_numbers)
    last = max(wanted)
    images: dict[int, Image.Image] = {}
    import av

    try:
        with _open(data) as container:
            stream = _video_stream(container)
            for number, frame in enumerate(container.decode(stream)):
                if number in wanted:
                    images[number] = frame.to_image()  # RGB24, the frame's own size
                if number >= last:
                    break
    except av.error.FFmpegError as exc:
        raise InvalidVideo(f"cannot decode video: {exc}") from exc
    if len(images) != len(wanted):
        raise InvalidVideo(
            f"video decoded to fewer frames than its {last + 1} packets announced (corrupt?)"
        )
    return images


def prepare_video(
    data: bytes, num_frames: int, limits: VideoLimits, tile_size: int = 448
) -> PreparedVideo:
    """Bytes -> validated video, ``num_frames`` sampled frames of one uint8 tile each (the
    encoder normalises them, as for images)."""
    info = probe_video(data, limits)
    numbers = segment_middles(info.total_frames, num_frames)
    images = decode_frames(data, numbers)
    # One tile per frame: a bicubic resize of the whole frame to the tile (max_num=1).
    options = TilingOptions(min_tiles=1, max_tiles=1, use_thumbnail=False, tile_size=tile_size)
    tiles = {number: tile_image(image, options) for number, image in images.items()}
    frames = torch.cat([tiles[number].tiles for number in numbers])  # [num_frames, 3, 448, 448]
    grid = tiles[numbers[0]].grid
    return PreparedVideo(PreparedImage(frames, grid), numbers, info)
