"""Encoded video bytes -> sampled frames as uint8 tiles, as InternVL3.5's reference does it.

The reference (the model card's ``load_video``) samples ``num_frames`` frames at the middle of
``num_frames`` equal segments of the whole video (``get_index``), converts each to RGB, and
cuts each into a single 448x448 tile (``dynamic_preprocess`` with ``max_num=1``: a bicubic
resize, no thumbnail). The prompt then reads ``Frame1: <image>\\nFrame2: <image>\\n…``.

Decoding uses PyAV (FFmpeg's libraries, bundled in its wheel). Only a few container formats
and codecs are opened at all, and the limits (bytes, resolution, duration, frames) are checked
from the container's header and from its packets, before any frame is decoded. Decoding is then
bounded as it runs: every decoded frame's own size is checked (a header's is only a claim:
Motion JPEG or a new H.264 sequence header can change it mid-stream), and so are the pixels
decoded so far and the time spent, against the video's budgets; a sampled frame is cut into its
tile as soon as it is decoded, so at most one full frame is held (plus the decoder's own
reference frames). CPU-heavy and fed untrusted bytes: the service runs it in its media worker
processes (``vision_server/media_worker.py``), never in the server's own process. torch is
imported only by ``prepare_video`` (in-process use, tests), as in ``preprocess``.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from protos.tiling import TileGrid, TilingOptions
from vision_server.errors import MEMORY_LIMIT_REASON, InvalidVideo
from vision_server.preprocess import (
    PreparedImage,
    empty_tiles,
    plan_image,
    write_grid,
)

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
# Packets read between two looks at the clock and at a cancellation while counting them.
_PACKETS_PER_CHECK = 256


@dataclass(frozen=True)
class VideoLimits:
    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 3840 * 2160  # width x height of a frame
    max_duration_s: float = 600.0
    max_decoded_frames: int = 36_000  # frames in the video: decoding cost
    # Budgets of the decoding itself: what a video may cost, whatever its headers said.
    max_decoded_pixels: int = 20_000_000_000  # sum of width x height over the frames decoded
    max_decode_s: float = 60.0  # wall time from opening the file to the last sampled frame


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


class DecodeCancelled(Exception):  # noqa: N818 (an outcome, not an error)
    """Whoever asked for the video no longer wants it: decoding stopped early."""


class VideoBudget:
    """What decoding one video may still spend (wall time, decoded pixels), and whether the
    caller still wants it; checked between packets and between frames."""

    def __init__(self, limits: VideoLimits, should_stop: Callable[[], bool] | None = None) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.max_decode_s
        self.pixels = 0
        self._should_stop = should_stop

    def check(self) -> None:
        """Raises ``DecodeCancelled`` when the caller gave up, ``InvalidVideo`` past the time."""
        if self._should_stop is not None and self._should_stop():
            raise DecodeCancelled
        if time.monotonic() > self.deadline:
            raise InvalidVideo(
                f"decoding the video took more than {self.limits.max_decode_s:g} s, the limit"
            )

    def charge(self, number: int, width: int, height: int) -> None:
        """Count decoded frame ``number``: its own size (not the header's) against the frame
        limit, its pixels against the budget; then ``check``."""
        pixels = width * height
        if width < 1 or height < 1 or pixels > self.limits.max_pixels:
            raise InvalidVideo(
                f"video frame {number} is {width}x{height} = {pixels} pixels; the limit is "
                f"{self.limits.max_pixels} pixels"
            )
        self.pixels += pixels
        if self.pixels > self.limits.max_decoded_pixels:
            raise InvalidVideo(
                f"decoding the video up to frame {number} takes more than "
                f"{self.limits.max_decoded_pixels} pixels, the limit"
            )
        self.check()


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise InvalidVideo("the file has no video stream")
    stream = container.streams.video[0]
    allowed = "H.264, HEVC, VP8, VP9, AV1, MPEG-4 Part 2, Motion JPEG"
    # PyAV leaves no codec context when FFmpeg has no decoder for the stream's codec.
    if stream.codec_context is None:
        raise InvalidVideo(f"the video's codec is unknown (no decoder; allowed: {allowed})")
    codec = stream.codec_context.name
    if codec not in VIDEO_CODECS:
        raise InvalidVideo(f"video codec {codec} is not accepted (allowed: {allowed})")
    # One decoder thread: the service decodes several videos at once in its worker processes,
    # and a worker's memory and CPU limits then bound one thread's frames.
    stream.codec_context.thread_count = 1
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
    budget: VideoBudget,
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
        if frames % _PACKETS_PER_CHECK == 0:
            budget.check()
        if packet.pts is not None:
            end = packet.pts + (packet.duration or 0)
            first = packet.pts if first is None else min(first, packet.pts)
            last = max(last, end)
    time_base = stream.time_base or Fraction(0)
    duration_s = float((last - first) * time_base) if first is not None else 0.0
    _check_duration(duration_s, limits)
    return frames, duration_s


def probe_video(
    data: bytes, limits: VideoLimits, budget: VideoBudget | None = None
) -> VideoStreamInfo:
    """Open, check and measure a video without decoding any frame."""
    if not data:
        raise InvalidVideo("video is empty")
    if len(data) > limits.max_bytes:
        raise InvalidVideo(f"video is {len(data)} bytes; the limit is {limits.max_bytes} bytes")
    import av

    budget = budget or VideoBudget(limits)
    try:
        with _open(data) as container:
            stream = _video_stream(container)
            width, height = _check_header(container, stream, limits)
            total_frames, duration_s = _scan_packets(container, stream, limits, budget)
            fps = float(stream.average_rate or 0)
    except av.error.FFmpegError as exc:
        raise InvalidVideo(f"cannot read video: {exc}") from exc
    if total_frames < 1:
        raise InvalidVideo("video has no frames")
    return VideoStreamInfo(width, height, total_frames, duration_s, fps)


def frame_grid(tile_size: int = 448) -> TileGrid:
    """How a frame is tiled: one tile, no thumbnail (the reference's ``max_num=1``)."""
    return TileGrid(columns=1, rows=1, thumbnail=False, tile_size=tile_size)


def decode_sampled_tiles(
    data: bytes, frame_numbers: list[int], out: np.ndarray, budget: VideoBudget
) -> None:
    """Decode in presentation order, only as far as the last of ``frame_numbers``, and cut
    each sampled frame into its tile as soon as it is decoded: ``out[i]`` ([n, 3, size, size]
    uint8) becomes frame ``frame_numbers[i]``, a bicubic resize of the whole RGB frame. Raises
    ``InvalidVideo`` when a frame or the budget is over a limit, or the stream is corrupt or
    ends early; ``DecodeCancelled`` when the budget's caller gave up."""
    positions: dict[int, list[int]] = {}
    for index, number in enumerate(frame_numbers):
        positions.setdefault(number, []).append(index)
    last = max(positions)
    size = int(out.shape[-1])
    options = TilingOptions(min_tiles=1, max_tiles=1, use_thumbnail=False, tile_size=size)
    decoded = 0
    import av

    try:
        with _open(data) as container:
            stream = _video_stream(container)
            for number, frame in enumerate(container.decode(stream)):
                budget.charge(number, frame.width, frame.height)
                if number in positions:
                    first, *repeats = positions[number]
                    # RGB24 at the frame's own size, resized and cut at once: the full frame
                    # is dropped before the next one is decoded.
                    write_grid(out[first : first + 1], plan_image(frame.to_image(), options))
                    for index in repeats:  # a video shorter than num_frames repeats frames
                        out[index] = out[first]
                decoded = number + 1
                if number >= last:
                    break
    except av.error.FFmpegError as exc:
        raise InvalidVideo(f"cannot decode video: {exc}") from exc
    except MemoryError as exc:  # the worker's address-space limit (RLIMIT_AS)
        raise InvalidVideo(f"cannot decode video: {MEMORY_LIMIT_REASON}") from exc
    if decoded <= last:
        raise InvalidVideo(
            f"video decoded to fewer frames than its {last + 1} packets announced (corrupt?)"
        )


def sample_video(
    data: bytes,
    num_frames: int,
    limits: VideoLimits,
    out: np.ndarray,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[VideoStreamInfo, list[int]]:
    """Check, measure and sample a video into ``out[:num_frames]`` (one uint8 tile per frame,
    ``[n, 3, size, size]``), within ``limits``' budgets; returns the stream's description and
    the frames sampled (``segment_middles``)."""
    budget = VideoBudget(limits, should_stop)
    info = probe_video(data, limits, budget)
    numbers = segment_middles(info.total_frames, num_frames)
    decode_sampled_tiles(data, numbers, out[:num_frames], budget)
    return info, numbers


def prepare_video(
    data: bytes, num_frames: int, limits: VideoLimits, tile_size: int = 448
) -> PreparedVideo:
    """Bytes -> validated video, ``num_frames`` sampled frames of one uint8 tile each (the
    encoder normalises them, as for images), in this process."""
    import torch

    tiles = empty_tiles(num_frames, tile_size)
    info, numbers = sample_video(data, num_frames, limits, tiles)
    frames = PreparedImage(torch.from_numpy(tiles), frame_grid(tile_size))
    return PreparedVideo(frames, numbers, info)
