"""Threshold calibration's arithmetic and input reading, on hand-worked cases (no model).

Each case states its arithmetic: with the relative threshold 0.5, the cut-off is the median
of the request's p0 (numpy/torch linear interpolation), a tile is compressed when its p0 is
above the cut-off and at least the absolute threshold; a tile costs 256 tokens, 64 compressed.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch

from protos.options import VirMode
from vision_server.calibrate import (
    InputError,
    build_parser,
    chat_request,
    folder_requests,
    jsonl_requests,
)
from vision_server.vir_calibration import (
    RequestScores,
    TokenCosts,
    default_thresholds,
    evaluate,
    sweep,
    threshold_for_saving,
)

COSTS = TokenCosts(full=256, compressed=64)


def request(p0: list[float], tiles_per_image: list[int], mode=VirMode.AUTO) -> RequestScores:
    return RequestScores(torch.tensor(p0, dtype=torch.float32), tuple(tiles_per_image), mode)


# Two images routed together: cut-off = median(0.9, 0.2, 0.6, 0.4, 0.7) = 0.6, so only 0.9
# and 0.7 are above it.
TWO_IMAGES = request([0.9, 0.2, 0.6, 0.4, 0.7], [3, 2])
# Alone: cut-off = median(0.3, 0.8) = 0.55; only 0.8 is above it.
ALONE = request([0.3, 0.8], [2])


def test_tokens_per_image_at_thresholds():
    # Threshold 0.5: 0.9 (image 0) and 0.7 (image 1) compressed; 0.8 (alone) too.
    row = evaluate([TWO_IMAGES, ALONE], 0.5, 0.5, COSTS)
    assert row.tokens_per_image == (64 + 256 + 256, 256 + 64, 256 + 64)
    assert (row.tiles, row.compressed_tiles) == (7, 3)
    assert row.uncompressed_tokens == 7 * 256
    assert row.saving == pytest.approx(3 * 192 / (7 * 256))
    # Threshold 0.8: 0.7 no longer; 0.8 and 0.9 still (>= is inclusive).
    assert evaluate([TWO_IMAGES, ALONE], 0.8, 0.5, COSTS).tokens_per_image == (
        64 + 256 + 256,
        256 + 256,
        256 + 64,
    )
    # Threshold 1: nothing.
    assert evaluate([TWO_IMAGES, ALONE], 1.0, 0.5, COSTS).compressed_tiles == 0


def test_a_one_tile_request_is_never_compressed():
    # Its p0 is its own median: never above it, at any threshold.
    rows = sweep([request([0.99], [1])], [0.0, 0.5, 1.0], 0.5, COSTS)
    assert [row.tokens_per_image for row in rows] == [(256,), (256,), (256,)]


def test_off_and_max_requests_ignore_the_threshold():
    off = request([0.9, 0.1, 0.8], [3], VirMode.OFF)
    most = request([0.9, 0.1, 0.8], [3], VirMode.MAX)
    for threshold in (0.0, 0.5, 1.0):
        row = evaluate([off, most], threshold, 0.5, COSTS)
        assert row.tokens_per_image == (3 * 256, 3 * 64)


def test_statistics_over_images():
    # Tokens per image at threshold 0.5: 576, 320, 320 -> mean 405.33, p50 320,
    # p90 = 320 + 0.8 * (576 - 320) = 524.8 (linear interpolation).
    row = evaluate([TWO_IMAGES, ALONE], 0.5, 0.5, COSTS)
    assert row.tokens_stat("mean") == pytest.approx(1216 / 3)
    assert row.tokens_stat("p50") == 320
    assert row.tokens_stat("p90") == pytest.approx(524.8)
    assert row.compressed_share == pytest.approx(3 / 7)


def test_target_saving_is_the_loosest_threshold_that_reaches_it():
    # Compressible tiles: 0.9, 0.7 (of TWO_IMAGES), 0.8 (ALONE); each saves 192 of 1792.
    # Two of them (saving 384/1792 = 21.4%) need a threshold <= 0.8: the loosest is 0.8.
    found = threshold_for_saving([TWO_IMAGES, ALONE], 0.2, 0.5, COSTS)
    assert found.threshold == pytest.approx(0.8)
    assert found.saving == pytest.approx(384 / 1792)
    assert found.next_threshold == pytest.approx(0.8001)
    assert found.next_saving == pytest.approx(192 / 1792)
    # All three (32.1%): <= 0.7 (0.7 as float32 is 0.69999999; the step 0.7 in float32 is
    # the same value, so the loosest step is 0.7).
    found = threshold_for_saving([TWO_IMAGES, ALONE], 0.3, 0.5, COSTS)
    assert found.threshold == pytest.approx(0.7)
    assert found.next_saving is not None and found.next_saving < 0.3


def test_unreachable_and_trivial_targets():
    # At most three tiles of seven: 32.1%.
    found = threshold_for_saving([TWO_IMAGES, ALONE], 0.5, 0.5, COSTS)
    assert found.threshold is None and found.saving == pytest.approx(576 / 1792)
    # Nothing to save: any threshold, the loosest being 1.
    found = threshold_for_saving([TWO_IMAGES, ALONE], 0.0, 0.5, COSTS)
    assert found.threshold == 1.0 and found.next_threshold is None


def test_default_thresholds_hold_the_checkpoints():
    grid = default_thresholds(0.123)
    assert grid[0] == 0.0 and grid[-1] == 1.0 and 0.123 in grid and 0.05 in grid
    assert len(grid) == 22 and grid == sorted(grid)
    assert len(default_thresholds(0.05)) == 21


# ---- input ----------------------------------------------------------------------------------


PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)


def test_folder_is_one_request_per_image(tmp_path: Path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.PNG", "a.jpg", "notes.txt", "c.webp"):
        (tmp_path / name).write_bytes(PNG)
    requests = folder_requests(tmp_path)
    assert [r.label for r in requests] == ["a.jpg", "b/2.PNG", "c.webp"]
    assert all(len(r.images) == 1 for r in requests)


def test_chat_request_images_and_fields(tmp_path: Path):
    (tmp_path / "x.png").write_bytes(PNG)
    body = {
        "messages": [
            {"role": "system", "content": "plain text"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "two images"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                       + base64.b64encode(PNG).decode()}},
                    {"type": "image_url", "image_url": {"url": "x.png", "detail": "low"}},
                    {"type": "image_url", "image_url": f"file://{tmp_path / 'x.png'}"},
                ],
            },
        ],
        "max_tiles": 3,
        "vir": "off",
    }  # fmt: skip
    parsed = chat_request(body, "r", tmp_path)
    assert parsed.max_tiles == 3 and parsed.vir is VirMode.OFF
    first, second, third = parsed.images
    assert first.data == PNG and first.max_tiles is None
    assert second.path == tmp_path / "x.png" and second.max_tiles == 1
    assert third.path == tmp_path / "x.png"


@pytest.mark.parametrize(
    ("part", "reason"),
    [
        ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AA=="}}, "video"),
        ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "remote"),
        ({"type": "image_url", "image_url": {"url": "data:image/png,abc"}}, "base64"),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}, "base64"),
        ({"type": "image_url", "image_url": {"url": "missing.png"}}, "no file"),
        ({"type": "text", "text": "no image"}, "no images"),
    ],
)
def test_chat_requests_that_cannot_be_calibrated(tmp_path: Path, part, reason):
    with pytest.raises(InputError, match=reason):
        chat_request({"messages": [{"role": "user", "content": [part]}]}, "r", tmp_path)


def test_jsonl_skips_bad_lines_with_their_reason(tmp_path: Path):
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    good = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": url}]}]}
    lines = [json.dumps(good), "", "{not json", json.dumps({"messages": []}), json.dumps(good)]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    requests, skipped = jsonl_requests(tmp_path / "r.jsonl")
    assert [r.label for r in requests] == ["r.jsonl:1", "r.jsonl:5"]
    assert [s.source for s in skipped] == ["r.jsonl:3", "r.jsonl:4"]
    assert "not JSON" in skipped[0].reason and "no images" in skipped[1].reason


def test_flags_are_checked():
    parser = build_parser()
    args = parser.parse_args(["d", "--thresholds", "0.5,0.1,0.5", "--target-saving", "0.4"])
    assert args.thresholds == [0.1, 0.5] and args.target_saving == 0.4
    for bad in (["d", "--target-saving", "1.5"], ["d", "--thresholds", "0.2,-1"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
