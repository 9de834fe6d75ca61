"""InternVL's dynamic high-resolution tiling, as arithmetic (no pixels here).

An image is resized to the grid of 448x448 tiles whose aspect ratio is closest to its own
(between ``min_tiles`` and ``max_tiles`` tiles), cut into those tiles row by row, and, when
there is more than one tile, followed by a 448x448 thumbnail of the whole image.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class TileGrid:
    """How one image is tiled."""

    columns: int
    rows: int
    thumbnail: bool
    tile_size: int = 448

    @property
    def grid_tiles(self) -> int:
        return self.columns * self.rows

    @property
    def num_tiles(self) -> int:
        """Tiles fed to the ViT, thumbnail included."""
        return self.grid_tiles + int(self.thumbnail)

    @property
    def resized_size(self) -> tuple[int, int]:
        """(width, height) the image is resized to before cutting."""
        return self.columns * self.tile_size, self.rows * self.tile_size

    def tile_boxes(self) -> list[tuple[int, int, int, int]]:
        """Crop boxes (left, top, right, bottom) in the resized image, row-major."""
        size = self.tile_size
        return [
            (col * size, row * size, (col + 1) * size, (row + 1) * size)
            for row in range(self.rows)
            for col in range(self.columns)
        ]


@lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (columns, rows) with ``min_tiles <= columns*rows <= max_tiles``, fewest tiles first.

    Within the same tile count the order is columns-major, as InternVL enumerates them; the
    sort is stable, so ties resolve the same way InternVL resolves them.
    """
    if min_tiles < 1 or max_tiles < min_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    grids = [
        (columns, rows)
        for columns in range(1, max_tiles + 1)
        for rows in range(1, max_tiles + 1)
        if min_tiles <= columns * rows <= max_tiles
    ]
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def closest_grid(
    width: int, height: int, min_tiles: int, max_tiles: int, tile_size: int = 448
) -> tuple[int, int]:
    """The (columns, rows) grid whose aspect ratio is closest to ``width / height``.

    On an exact tie of aspect-ratio distance, the later (larger) grid wins only while the
    image's area exceeds half the grid's pixel area, so small images are not blown up.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    area = width * height
    best = (1, 1)
    best_distance = float("inf")
    for columns, rows in candidate_grids(min_tiles, max_tiles):
        distance = abs(aspect - columns / rows)
        if distance < best_distance:
            best_distance = distance
            best = (columns, rows)
        elif distance == best_distance and area > 0.5 * tile_size * tile_size * columns * rows:
            best = (columns, rows)
    return best


def plan_tiles(
    width: int,
    height: int,
    *,
    min_tiles: int = 1,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
    tile_size: int = 448,
) -> TileGrid:
    """Tile plan for a ``width`` x ``height`` image."""
    columns, rows = closest_grid(width, height, min_tiles, max_tiles, tile_size)
    thumbnail = use_thumbnail and columns * rows != 1
    return TileGrid(columns=columns, rows=rows, thumbnail=thumbnail, tile_size=tile_size)
