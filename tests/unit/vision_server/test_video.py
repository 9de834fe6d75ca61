"""Video decoding and frame sampling in the vision service (no servers): the reference's
frame choice, one tile per frame, the accepted formats, the limits and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import encode_video, grey_level_frames, mixed_frames
from reference import get_index, load_video_frames
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from vision_server import video as video_module
from vision_server.errors import InvalidVideo
from vision_server.video import VideoLimits, prepare_video, probe_video, segment_middles


@pytest.mark.parametrize("total", [1, 2, 5, 8, 9, 30, 31, 300, 1001])
@pytest.mark.parametrize("num_frames", [1, 3, 8, 16, 32])
def test_sampling_is_the_model_cards_get_index(total, num_frames):
    fps = 25.0  # without a bound the frame rate plays no part
    expected = get_index(None, fps, total - 1, first_idx=0, num_segments=num_frames).tolist()
    assert segment_middles(total, num_frames) == expected


def test_a_short_video_repeats_frames_as_the_reference_does():
    assert segment_middles(5, 8) == [0, 0, 1, 2, 2, 2, 3, 4]


def frame_of(tile: torch.Tensor) -> int:
    """Which frame of a grey-level video a tile shows (frame k is grey 8 k)."""
    return round(float(tile.float().mean()) / 8)


FORMATS = [
    ("libx264", "mp4"),
    ("libx264", "matroska"),
    ("libvpx-vp9", "webm"),
    ("libvpx", "webm"),
    ("mpeg4", "avi"),
]


@pytest.mark.parametrize(("codec", "fmt"), FORMATS, ids=[f"{c}-{f}" for c, f in FORMATS])
def test_sampled_frames_are_the_right_frames(codec, fmt):
    data = encode_video(grey_level_frames(30), codec=codec, fmt=fmt)
    video = prepare_video(data, 8, VideoLimits())
    assert video.info.total_frames == 30
    assert video.info.duration_s == pytest.approx(3.0)
    assert video.info.fps == pytest.approx(10.0)
    assert video.frame_numbers == segment_middles(30, 8) == [1, 5, 8, 12, 15, 19, 23, 26]
    tiles = video.frames.tiles
    assert tiles.shape == (8, 3, 448, 448) and tiles.dtype == torch.uint8
    assert [frame_of(tile) for tile in tiles] == video.frame_numbers
    grid = video.frames.grid
    assert (grid.columns, grid.rows, grid.thumbnail) == (1, 1, False)


def test_frames_are_tiled_as_transformers_tiles_a_one_tile_image(tiny_models):
    """Each frame is one tile, exactly what transformers' image processor makes of the same
    frame with one patch (the bicubic resize), as the reference's ``max_num=1``."""
    data = encode_video(mixed_frames(12, width=200, height=150), fmt="mp4")
    video = prepare_video(data, 4, VideoLimits())
    frames, indices = load_video_frames(data, 4)
    assert video.frame_numbers == indices
    processor = GotOcr2ImageProcessorPil.from_pretrained(str(tiny_models["hf"]))
    expected = processor(
        frames, crop_to_patches=False, do_normalize=False, do_rescale=False, return_tensors="pt"
    )["pixel_values"]
    assert expected.shape == video.frames.tiles.shape
    assert torch.equal(expected.round().to(torch.uint8), video.frames.tiles)


def test_frames_keep_their_own_content():
    """Different frames give different tiles (the decoder is not stuck on one frame)."""
    data = encode_video(mixed_frames(16, seed=4))
    tiles = prepare_video(data, 8, VideoLimits()).frames.tiles
    assert len({tile.float().mean().item() for tile in tiles}) == 8


@pytest.mark.parametrize(
    ("limits", "fragment"),
    [
        (VideoLimits(max_bytes=100), "bytes; the limit"),
        (VideoLimits(max_pixels=320 * 240 - 1), "pixels; the limit"),
        (VideoLimits(max_duration_s=2.0), "s long; the limit is 2 s"),
        (VideoLimits(max_decoded_frames=29), "more than 29 frames"),
    ],
)
def test_limits_are_checked_before_any_frame_is_decoded(monkeypatch, limits, fragment):
    data = encode_video(grey_level_frames(30))

    def no_decoding(*args, **kwargs):
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(video_module, "decode_sampled_tiles", no_decoding)
    with pytest.raises(InvalidVideo, match=fragment):
        prepare_video(data, 8, limits)


def test_a_video_just_within_the_limits_passes():
    data = encode_video(grey_level_frames(30))
    limits = VideoLimits(
        max_bytes=len(data), max_pixels=320 * 240, max_duration_s=3.0, max_decoded_frames=30
    )
    assert probe_video(data, limits).total_frames == 30


@pytest.mark.parametrize("fmt", ["mp4", "matroska"])
def test_a_silent_header_does_not_hide_the_length(monkeypatch, fmt):
    """The duration is also measured from the packets: a header that states none (or a wrong
    one) does not get a long video past the limit."""
    monkeypatch.setattr(video_module, "_check_header", lambda container, stream, limits: (1, 1))
    data = encode_video(grey_level_frames(30), fmt=fmt)
    with pytest.raises(InvalidVideo, match="3.0 s long; the limit is 2.5 s"):
        probe_video(data, VideoLimits(max_duration_s=2.5))


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: b"", "empty"),
        (lambda: b"not a video at all" * 50, "cannot open video"),
        (lambda: encode_video(grey_level_frames(10), fmt="mpegts"), "cannot open video"),
        (lambda: encode_video(grey_level_frames(10), codec="ffv1", fmt="matroska",
                              pix_fmt="yuv420p"), "codec ffv1 is not accepted"),
        (lambda: encode_video(grey_level_frames(30))[:1500], "video"),
    ],
    ids=["empty", "garbage", "mpegts", "ffv1", "truncated"],
)  # fmt: skip
def test_bad_videos_are_invalid(make, fragment):
    with pytest.raises(InvalidVideo, match=fragment):
        prepare_video(make(), 8, VideoLimits())


def test_corrupt_frames_are_a_clear_error():
    """Bytes flipped inside the coded frames: the demuxer still reads the packets, the decoder
    either conceals the damage or refuses; never anything but ``InvalidVideo`` or frames."""
    data = bytearray(encode_video(mixed_frames(20, seed=2)))
    rng = np.random.default_rng(0)
    for position in rng.integers(len(data) // 3, len(data), 200):
        data[position] ^= 0xFF
    try:
        video = prepare_video(bytes(data), 8, VideoLimits())
    except InvalidVideo:
        return
    assert video.frames.tiles.shape == (8, 3, 448, 448)


def test_shared_memory_reservations_count_every_frame():
    """The language service reserves room for a call's rows before it knows them: one full
    tile per frame of each video, on top of the images' tiles."""
    import asyncio

    from llm_server.vision.grpc_client import GrpcVisualEncoder
    from protos.dvd.v1 import vision_pb2
    from protos.messages import EncodeCall, ImageInput, VideoInput

    async def reserved(images, videos) -> int:
        encoder = GrpcVisualEncoder(
            "127.0.0.1:9",
            timeout_s=1,
            expected_hidden_size=128,
            transport="shared-memory",
            shared_memory_bytes=128 * 1024 * 1024,
        )
        encoder.identity.info = vision_pb2.ModelInfo(
            hidden_size=128,
            dtype=vision_pb2.DTYPE_FLOAT32,
            tokens_per_tile=256,
            default_max_tiles=12,
            use_thumbnail=True,
        )
        try:
            reservation = await encoder._reserve(EncodeCall(images, videos))
            assert reservation is not None
            return reservation.size
        finally:
            await encoder.close()

    row = 128 * 4
    video_only = asyncio.run(reserved([], [VideoInput(b"", 32)]))
    assert video_only >= 32 * 256 * row
    both = asyncio.run(
        reserved([ImageInput(b"", max_tiles=1)], [VideoInput(b"", 32), VideoInput(b"", 8)])
    )
    assert both >= (1 + 32 + 8) * 256 * row
