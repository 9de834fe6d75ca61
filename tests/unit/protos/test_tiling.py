"""InternVL dynamic tiling, checked against cases worked out by hand and against the plain scan
it replaced; the language service's count of an image's tiles, checked against the vision
service's own preprocessing."""

from __future__ import annotations

import io
import math
import random
import time
from functools import lru_cache

import pytest
from helpers import encode_image, noise_image
from PIL import ExifTags, Image

from protos.tiling import candidate_grids, closest_grid, plan_tiles


def test_candidate_grids_are_ordered_by_tile_count_then_columns():
    grids = candidate_grids(1, 4)
    assert grids == ((1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (2, 2), (4, 1))


def test_candidate_grids_respect_min_and_max():
    grids = candidate_grids(2, 12)
    assert (1, 1) not in grids
    assert all(2 <= c * r <= 12 for c, r in grids)
    assert len(grids) == 34  # (1..12 divisor pairs) minus (1, 1)


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (448, 448, (1, 1)),  # square -> one tile (ties with 2x2, 3x3 lose: image too small)
        (896, 448, (2, 1)),  # 2:1 exactly
        (448, 896, (1, 2)),
        (1344, 448, (3, 1)),
        (
            700,
            300,
            (5, 2),
        ),  # 2.333: 5/2 = 2.5 (d .167) beats 2/1 (d .333) and 7/3 is not allowed (21 > 12)
        (1000, 150, (7, 1)),  # 6.667: 7/1 (d .333) beats 6/1 (d .667)
        (150, 900, (1, 6)),  # 0.1667 = 1/6 exactly
        (333, 777, (2, 5)),  # 0.4286: 2/5 = 0.4 (d .029) beats 1/2 (d .071), 3/7 needs 21 tiles
        (50, 30, (3, 2)),  # 1.667: 3/2 (d .167); 5/3 would need 15 tiles
    ],
)
def test_closest_grid_hand_computed(width, height, expected):
    assert closest_grid(width, height, 1, 12) == expected


def test_square_tie_prefers_more_tiles_only_for_large_images():
    # 1:1 ties between 1x1, 2x2 and 3x3. A later grid wins a tie only while the image area
    # exceeds half of that grid's pixel area (448^2 * tiles / 2).
    assert closest_grid(448, 448, 1, 12) == (1, 1)  # 200704 <= 0.5*448^2*4 = 401408
    assert closest_grid(700, 700, 1, 12) == (2, 2)  # 490000 > 401408, < 0.5*448^2*9 = 903168
    assert closest_grid(1400, 1400, 1, 12) == (3, 3)  # 1960000 > 903168


def test_twelve_tiles_for_a_large_image():
    # 3:1 ties between 3x1 and 6x2; the image is large, so the 12-tile grid wins.
    plan = plan_tiles(3 * 1792, 1792)
    assert (plan.columns, plan.rows) == (6, 2)
    wide = plan_tiles(4 * 448, 3 * 448)  # 4:3 -> 4x3 = 12 tiles
    assert (wide.columns, wide.rows) == (4, 3)
    assert wide.grid_tiles == 12
    assert wide.num_tiles == 13  # + thumbnail
    assert wide.resized_size == (4 * 448, 3 * 448)


def test_thumbnail_only_when_more_than_one_tile():
    single = plan_tiles(448, 448)
    assert single.num_tiles == 1 and not single.thumbnail
    multi = plan_tiles(896, 448)
    assert multi.thumbnail and multi.num_tiles == 3
    off = plan_tiles(896, 448, use_thumbnail=False)
    assert not off.thumbnail and off.num_tiles == 2


def test_max_tiles_one_means_one_tile():
    plan = plan_tiles(5000, 300, max_tiles=1)
    assert (plan.columns, plan.rows, plan.num_tiles) == (1, 1, 1)


def test_tile_boxes_are_row_major():
    plan = plan_tiles(896, 896)  # 2x2
    assert (plan.columns, plan.rows) == (2, 2)
    assert plan.tile_boxes() == [
        (0, 0, 448, 448),
        (448, 0, 896, 448),
        (0, 448, 448, 896),
        (448, 448, 896, 896),
    ]


def test_ties_between_grids_on_either_side():
    # 1.5 sits halfway between 1x1 (1.0) and 2x1 (2.0); 3x2 needs 6 tiles, over 5. 2x2 (1.0)
    # ties too: the first of the three wins, and each later one while the image is large.
    assert closest_grid(3, 2, 1, 5) == (1, 1)
    assert closest_grid(600, 400, 1, 5) == (2, 1)  # 240000 > 0.5*448^2*2, < 0.5*448^2*4
    assert closest_grid(3000, 2000, 1, 5) == (2, 2)
    assert closest_grid(3000, 2000, 1, 6) == (3, 2)  # 1.5 exactly, alone at distance 0


def test_min_tiles_leaves_out_small_grids():
    assert closest_grid(448, 448, 2, 12) == (2, 2)  # 1x1 is out; 2x2 is the first 1:1 grid
    assert closest_grid(448, 448, 5, 12) == (3, 3)
    assert closest_grid(1344, 448, 4, 4) == (4, 1)  # only 1x4, 2x2, 4x1 have 4 tiles


@pytest.mark.parametrize(("min_tiles", "max_tiles"), [(0, 4), (3, 2)])
def test_invalid_tile_bounds(min_tiles, max_tiles):
    with pytest.raises(ValueError):
        candidate_grids(min_tiles, max_tiles)


def test_invalid_image_size():
    with pytest.raises(ValueError):
        closest_grid(0, 10, 1, 12)
    with pytest.raises(ValueError):
        closest_grid(10, 10, 0, 12)


# ---- the scan that closest_grid replaced (protos/tiling.py until then), verbatim ----------


@lru_cache(maxsize=64)
def reference_candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    if min_tiles < 1 or max_tiles < min_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    grids = [
        (columns, rows)
        for columns in range(1, max_tiles + 1)
        for rows in range(1, max_tiles + 1)
        if min_tiles <= columns * rows <= max_tiles
    ]
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def reference_closest_grid(
    width: int, height: int, min_tiles: int, max_tiles: int, tile_size: int = 448
) -> tuple[int, int]:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    area = width * height
    best = (1, 1)
    best_distance = float("inf")
    for columns, rows in reference_candidate_grids(min_tiles, max_tiles):
        distance = abs(aspect - columns / rows)
        if distance < best_distance:
            best_distance = distance
            best = (columns, rows)
        elif distance == best_distance and area > 0.5 * tile_size * tile_size * columns * rows:
            best = (columns, rows)
    return best


def _min_tiles_to_try(max_tiles: int) -> list[int]:
    return sorted({1, 2, 3, max_tiles // 2, max_tiles} & set(range(1, max_tiles + 1)))


def _image_sizes() -> list[tuple[int, int]]:
    """Every reduced ratio p:q up to 9:9 (grid ratios themselves, and halfway points between
    two, where distances tie exactly) at scales below and above the tie thresholds, and a few
    sizes of no particular shape."""
    ratios = [(p, q) for p in range(1, 10) for q in range(1, 10) if math.gcd(p, q) == 1]
    sizes = [(p * scale, q * scale) for p, q in ratios for scale in (1, 150, 320, 700, 1500)]
    rng = random.Random(7)
    sizes += [(rng.randint(1, 6000), rng.randint(1, 6000)) for _ in range(40)]
    return sizes + [(1, 10_000), (10_000, 1), (4032, 3024), (1920, 1080), (1000, 690)]


def test_candidate_grids_match_the_scan_they_replaced():
    for max_tiles in range(1, 65):
        for min_tiles in range(1, max_tiles + 1):
            expected = reference_candidate_grids(min_tiles, max_tiles)
            assert candidate_grids(min_tiles, max_tiles) == expected, (min_tiles, max_tiles)


def test_closest_grid_matches_the_scan_it_replaced():
    """The same grid as the plain scan for every ``max_tiles`` up to 64, ties included."""
    sizes = _image_sizes()
    for max_tiles in range(1, 65):
        for min_tiles in _min_tiles_to_try(max_tiles):
            for width, height in sizes:
                expected = reference_closest_grid(width, height, min_tiles, max_tiles)
                got = closest_grid(width, height, min_tiles, max_tiles)
                assert got == expected, (width, height, min_tiles, max_tiles)


def test_half_grid_tie_rule_matches_the_scan_it_replaced():
    """Tiny tiles make the tie rule's threshold (half the grid's pixel area) an integer that
    small images reach exactly: ``area > threshold`` is decided the same way."""
    at_threshold = 0
    for tile_size in (2, 4):
        for max_tiles in range(1, 41):
            for width in range(1, 13):
                for height in range(1, 13):
                    expected = reference_closest_grid(width, height, 1, max_tiles, tile_size)
                    got = closest_grid(width, height, 1, max_tiles, tile_size)
                    assert got == expected, (width, height, max_tiles, tile_size)
                    at_threshold += _ties_at_threshold(width, height, max_tiles, tile_size)
    assert at_threshold > 0  # the grid above did reach the threshold on a tie


def _ties_at_threshold(width: int, height: int, max_tiles: int, tile_size: int) -> bool:
    """Whether a grid tied at the least distance has exactly the image's area as threshold."""
    aspect = width / height
    grids = reference_candidate_grids(1, max_tiles)
    least = min(abs(aspect - c / r) for c, r in grids)
    tied = [(c, r) for c, r in grids if abs(aspect - c / r) == least]
    return len(tied) > 1 and any(
        width * height == 0.5 * tile_size * tile_size * c * r for c, r in tied[1:]
    )


def test_closest_grid_matches_the_scan_beyond_64_tiles():
    rng = random.Random(11)
    for max_tiles in (100, 144, 257):
        for _ in range(150):
            width, height = rng.randint(1, 8000), rng.randint(1, 8000)
            min_tiles = rng.choice((1, 1, 2, max_tiles // 3))
            expected = reference_closest_grid(width, height, min_tiles, max_tiles)
            assert closest_grid(width, height, min_tiles, max_tiles) == expected


def test_a_million_tiles_is_planned_at_once():
    """``max_tiles`` can come from a request: planning costs about sqrt(max_tiles) steps, not
    the max_tiles^2 of a scan (days, for a million)."""
    shapes = [(1, 1), (448, 448), (1000, 690), (690, 1000), (4032, 3024), (1, 10**6), (10**6, 1)]
    started = time.process_time()
    plans = [plan_tiles(width, height, max_tiles=10**6) for width, height in shapes]
    assert time.process_time() - started < 1.0  # about 50 ms on one slow core
    assert (plans[0].columns, plans[0].rows) == (1, 1)  # ties at 1:1 lose: a tiny image
    assert (plans[1].columns, plans[1].rows) == (1, 1)  # 448^2 is not above half of 2x2
    assert (plans[2].columns, plans[2].rows) == (100, 69)  # 1000:690 exactly, 6900 tiles
    assert (plans[3].columns, plans[3].rows) == (69, 100)
    assert (plans[4].columns, plans[4].rows) == (12, 9)  # 4:3; 16x12 needs more area
    assert (plans[5].columns, plans[5].rows) == (1, 10**6)


def _with_orientation(image: Image.Image, orientation: int, fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buffer = io.BytesIO()
    image.save(buffer, fmt, exif=exif)
    return buffer.getvalue()


def test_a_reservation_fits_the_rows_the_service_will_cut():
    """The language service reserves each image's rows from its header: exactly the tiles the
    vision service cuts (its own preprocessing is the oracle here, EXIF orientation
    included), instead of ``max_tiles`` plus a thumbnail for every image; an image whose
    header cannot be read gets the most."""
    from llm_server.vision.shm_sizing import image_tiles
    from protos.dvd.v1 import vision_pb2
    from vision_server.preprocess import ImageLimits, TilingOptions, prepare_image

    info = vision_pb2.ModelInfo(tokens_per_tile=256, tile_size=448, use_thumbnail=True)
    images = [
        encode_image(noise_image(896, 896, seed=1), "JPEG"),
        encode_image(noise_image(300, 300, seed=2)),
        encode_image(noise_image(900, 600, seed=3)),
        encode_image(noise_image(1400, 500, seed=4), "WEBP"),
        # 570 x 330 makes 7 tiles (3x2 and a thumbnail), shown as 330 x 570 it makes 3 (1x2)
        _with_orientation(noise_image(570, 330, seed=5), 6),  # shown as 330 x 570
        _with_orientation(noise_image(570, 330, seed=5), 3),  # upside down: 570 x 330
        # EXIF in a PNG's eXIf chunk before the pixels, a WebP's EXIF chunk, a TIFF's tags
        _with_orientation(noise_image(570, 330, seed=6), 8, "PNG"),
        _with_orientation(noise_image(570, 330, seed=7), 6, "WEBP"),
        _with_orientation(noise_image(570, 330, seed=8), 5, "TIFF"),
        _with_orientation(noise_image(570, 330, seed=8), 2, "TIFF"),  # a mirror: 570 x 330
    ]
    for max_tiles in (1, 6, 12):
        options = TilingOptions(max_tiles=max_tiles)
        for data in images:
            cut = prepare_image(data, ImageLimits(), options).num_tiles
            assert image_tiles(data, max_tiles, info) == cut, (max_tiles, len(data))
    assert image_tiles(b"not an image", 12, info) == 13
    assert image_tiles(b"", 1, info) == 1
