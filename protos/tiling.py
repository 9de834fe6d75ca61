"""InternVL's dynamic high-resolution tiling, as arithmetic (no pixels here).

An image is resized to the grid of 448x448 tiles whose aspect ratio is closest to its own
(between ``min_tiles`` and ``max_tiles`` tiles), cut into those tiles row by row, and, when
there is more than one tile, followed by a 448x448 thumbnail of the whole image.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass


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


@dataclass(frozen=True, order=True)
class TilingOptions:
    """How an image may be tiled: the one description of it, from the request's validation to
    the embedding cache's key (ordered, so that keys sort)."""

    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    tile_size: int = 448

    @property
    def most_tiles(self) -> int:
        """The most tiles an image tiled this way can make, thumbnail included."""
        return most_tiles(self.max_tiles, self.use_thumbnail)

    def plan(self, width: int, height: int) -> TileGrid:
        """How a ``width`` x ``height`` image is tiled under these options."""
        return plan_tiles(
            width,
            height,
            min_tiles=self.min_tiles,
            max_tiles=self.max_tiles,
            use_thumbnail=self.use_thumbnail,
            tile_size=self.tile_size,
        )


def most_tiles(max_tiles: int, use_thumbnail: bool) -> int:
    """The most tiles an image can make with at most ``max_tiles`` grid tiles: a grid of more
    than one tile is followed by its thumbnail."""
    return max_tiles + int(use_thumbnail and max_tiles > 1)


def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (columns, rows) with ``min_tiles <= columns*rows <= max_tiles``, fewest tiles first.

    Within the same tile count the order is columns-major, as InternVL enumerates them; the
    sort is stable, so ties resolve the same way InternVL resolves them. There are about
    ``max_tiles * ln(max_tiles)`` of them; ``closest_grid`` finds its grid without listing them.
    """
    _check_tile_bounds(min_tiles, max_tiles)
    # Each column count c has its rows in [ceil(min/c), floor(max/c)]: no pair is tested.
    grids = [
        (columns, rows)
        for columns in range(1, max_tiles + 1)
        for rows in range(-(-min_tiles // columns), max_tiles // columns + 1)
    ]
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def closest_grid(
    width: int, height: int, min_tiles: int, max_tiles: int, tile_size: int = 448
) -> tuple[int, int]:
    """The (columns, rows) grid whose aspect ratio is closest to ``width / height``.

    On an exact tie of aspect-ratio distance, the later (larger) grid wins only while the
    image's area exceeds half the grid's pixel area, so small images are not blown up.

    The answer is the one a scan of ``candidate_grids`` in order gives (the same float
    arithmetic, the same ties), found in about ``sqrt(max_tiles)`` binary searches (at most
    ``max_tiles``, when a large ``min_tiles`` leaves few grids): ``max_tiles`` may come from
    a request.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    _check_tile_bounds(min_tiles, max_tiles)
    area = width * height
    nearest = _nearest_grids(width / height, min_tiles, max_tiles)
    best = nearest[0]
    for columns, rows in nearest[1:]:
        if area > 0.5 * tile_size * tile_size * columns * rows:
            best = (columns, rows)
    return best


def _check_tile_bounds(min_tiles: int, max_tiles: int) -> None:
    if min_tiles < 1 or max_tiles < min_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")


@dataclass(frozen=True)
class _Line:
    """The grids that share one side: ``fixed`` columns (rows free) or ``fixed`` rows."""

    aspect: float
    fixed: int
    fixed_columns: bool

    def grid(self, free: int) -> tuple[int, int]:
        return (self.fixed, free) if self.fixed_columns else (free, self.fixed)

    def distance(self, free: int) -> float:
        columns, rows = self.grid(free)
        return abs(self.aspect - columns / rows)

    def past_aspect(self, free: int) -> bool:
        """Whether the line, walked from its first grid, has reached the image's ratio here:
        more rows make a grid narrower, more columns wider. False, then True (float division
        is monotonic)."""
        columns, rows = self.grid(free)
        ratio = columns / rows
        return ratio <= self.aspect if self.fixed_columns else ratio >= self.aspect


def _nearest_grids(aspect: float, min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """Every grid at the least distance from ``aspect``, in ``candidate_grids``' order.

    The grids are walked in lines: one per column count for a tall or square image, one per
    row count for a wide one. Along a line the distance falls until the grid's ratio reaches
    the image's, then rises (float rounding keeps that shape), so a binary search finds the
    line's nearest grids. Past about ``sqrt(max_tiles)`` lines, a line stops short of the
    image's ratio, and each later line stops further short of it: the walk ends there.
    """
    fixed_columns = aspect <= 1
    least = math.inf
    nearest: list[tuple[int, int]] = []
    for fixed in range(1, max_tiles + 1):
        line = _Line(aspect, fixed, fixed_columns)
        first, last = -(-min_tiles // fixed), max_tiles // fixed
        if first <= last:
            distance, run = _line_nearest(line, first, last, least)
            if distance < least:
                least, nearest = distance, []
            nearest.extend(line.grid(free) for free in run)
        # This line stops short of the image's ratio (its largest grid is its nearest), and
        # every later line's largest grid stops further short: none comes within ``least``.
        if not line.past_aspect(last) and line.distance(last) > least:
            break
    return sorted(nearest, key=lambda grid: (grid[0] * grid[1], grid[0]))


def _line_nearest(line: _Line, first: int, last: int, least: float) -> tuple[float, range]:
    """The least distance among the line's grids ``first..last`` and the run of them at it
    (empty when that distance is above ``least``: nothing to list)."""
    frees = range(first, last + 1)
    turn = first + bisect_left(frees, True, key=line.past_aspect)
    distance = min(line.distance(free) for free in (turn - 1, turn) if first <= free <= last)
    if distance > least:
        return distance, range(0)
    # Grids at the same distance sit together at the bottom of the valley: one on each side
    # of the image's ratio, or a plateau of float rounding.
    start = first + bisect_left(
        range(first, turn), True, key=lambda f: line.distance(f) <= distance
    )
    stop = turn + bisect_left(
        range(turn, last + 1), True, key=lambda f: line.distance(f) > distance
    )
    return distance, range(start, stop)


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
