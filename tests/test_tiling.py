"""InternVL dynamic tiling, checked against cases worked out by hand; the language service's
count of an image's tiles, checked against the vision service's own preprocessing."""

from __future__ import annotations

import io

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


@pytest.mark.parametrize(("min_tiles", "max_tiles"), [(0, 4), (3, 2)])
def test_invalid_tile_bounds(min_tiles, max_tiles):
    with pytest.raises(ValueError):
        candidate_grids(min_tiles, max_tiles)


def test_invalid_image_size():
    with pytest.raises(ValueError):
        closest_grid(0, 10, 1, 12)


def _with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def test_a_reservation_fits_the_rows_the_service_will_cut():
    """The language service reserves each image's rows from its header: exactly the tiles the
    vision service cuts (its own preprocessing is the oracle here, EXIF orientation
    included), instead of ``max_tiles`` plus a thumbnail for every image; an image whose
    header cannot be read gets the most."""
    from llm_server.vision.grpc_client import image_tiles
    from protos.dvd.v1 import vision_pb2
    from vision_server.preprocess import ImageLimits, TilingOptions, prepare_image

    info = vision_pb2.ModelInfo(tokens_per_tile=256, tile_size=448, use_thumbnail=True)
    images = [
        encode_image(noise_image(896, 896, seed=1), "JPEG"),
        encode_image(noise_image(300, 300, seed=2)),
        encode_image(noise_image(900, 600, seed=3)),
        encode_image(noise_image(1400, 500, seed=4), "WEBP"),
        _with_orientation(noise_image(1000, 690, seed=5), 6),  # shown as 690 x 1000
        _with_orientation(noise_image(1000, 690, seed=5), 3),  # upside down: 1000 x 690
    ]
    for max_tiles in (1, 6, 12):
        options = TilingOptions(max_tiles=max_tiles)
        for data in images:
            cut = prepare_image(data, ImageLimits(), options).num_tiles
            assert image_tiles(data, max_tiles, info) == cut, (max_tiles, len(data))
    assert image_tiles(b"not an image", 12, info) == 13
    assert image_tiles(b"", 1, info) == 1
