"""The visual-token budget (``max_visual_tokens``) on hand-worked cases.

Tiles are 256 tokens, 64 compressed: each compression saves 192. A budget compresses tiles in
decreasing p0 (ties: the earlier item, then the earlier tile) until the request fits, each
item's own cap first; under ``auto`` the published rule's decisions apply on top. Each case
states its arithmetic; the property test checks the choice against its definition (fewest
compressions, none skipped for a less compressible tile), not against the implementation.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from protos.messages import Field, RowSelection
from protos.options import VirMode
from protos.tiling import TilingOptions
from vision_server.embedding_cache import request_keys
from vision_server.errors import InvalidRequest
from vision_server.routing import (
    TokenBudget,
    check_budget,
    compress_to_fit,
    route_request,
    shaping_budget,
)

FULL, SMALL = 256, 64


def fit(p0: list[list[float]], request: int | None = None, per_item=()) -> list[list[bool]]:
    return compress_to_fit(p0, TokenBudget(request, tuple(per_item)), FULL, SMALL)


def tokens(compress: list[list[bool]]) -> int:
    return sum(SMALL if c else FULL for item in compress for c in item)


def test_one_image_compresses_the_most_compressible_tiles_first():
    p0 = [[0.2, 0.9, 0.5, 0.7]]  # 4 tiles: 1024 tokens uncompressed
    assert fit(p0, 1024) == [[False, False, False, False]]  # fits as it is
    # 1023: one compression (1024 - 192 = 832), the tile of p0 0.9.
    assert fit(p0, 1023) == [[False, True, False, False]]
    # 832 is exactly one compression: still one, the boundary fits.
    assert fit(p0, 832) == [[False, True, False, False]]
    # 831: two (640), 0.9 then 0.7.
    assert fit(p0, 831) == [[False, True, False, True]]
    # 256 = 4 x 64, every tile compressed: the smallest budget there is.
    assert fit(p0, 256) == [[True, True, True, True]]


def test_ties_go_to_the_earlier_tile_then_the_earlier_item():
    p0 = [[0.5, 0.7, 0.7, 0.5]]
    assert fit(p0, 832) == [[False, True, False, False]]  # tile 1 before tile 2
    assert fit(p0, 640) == [[False, True, True, False]]
    assert fit(p0, 448) == [[True, True, True, False]]  # then tile 0 before tile 3
    # Across images: 0.8 in image 0 (tile 1) and in image 1 (tile 0); image 0 goes first.
    two = [[0.3, 0.8], [0.8, 0.1, 0.6]]  # 5 tiles: 1280 tokens
    assert fit(two, 1088) == [[False, True], [False, False, False]]
    # 1000 needs ceil(280 / 192) = 2 compressions: both 0.8s (896 tokens).
    assert fit(two, 1000) == [[False, True], [True, False, False]]
    # 800 needs 3 (704): then 0.6.
    assert fit(two, 800) == [[False, True], [True, False, True]]


def test_an_images_own_cap_first_then_the_requests():
    two = [[0.3, 0.8], [0.8, 0.1, 0.6]]
    # Image 1 alone: 768 > 600, its 0.8 tile goes (576). The request: 512 + 576 = 1088 > 900,
    # the most compressible tile left is image 0's 0.8 (896).
    assert fit(two, 900, (None, 600)) == [[False, True], [True, False, False]]
    # Image 1 capped at 192 = 3 x 64: all its tiles; the request (512 + 192 = 704) fits 704.
    assert fit(two, 704, (None, 192)) == [[False, False], [True, True, True]]
    # Only image caps: image 0 at 320 (one compression: its 0.8), image 1 free.
    assert fit(two, None, (320, None)) == [[False, True], [False, False, False]]


def test_frames_and_images_share_the_requests_budget():
    # An image of one tile (p0 0.35) and a video of four frames, one tile each: 1280 tokens.
    p0 = [torch.tensor([0.35]), torch.tensor([0.1, 0.4, 0.3, 0.2])]
    budget = TokenBudget(900, (None, None))  # two compressions (896): 0.4, then 0.35
    decided = route_request(p0, VirMode.OFF, 0.5, 0.0, budget, FULL, SMALL)
    assert decided == [[True], [False, True, False, False]]


def test_auto_applies_the_rule_on_top_of_the_budget():
    # Sorted [0.1, 0.4, 0.6, 0.9]: the 0.5 quantile is 0.5; the rule compresses 0.9 and 0.6.
    p0 = [torch.tensor([0.9, 0.1, 0.6, 0.4])]

    def auto(budget: int | None, absolute: float = 0.0) -> list[list[bool]]:
        return route_request(p0, VirMode.AUTO, 0.5, absolute, TokenBudget(budget), FULL, SMALL)

    assert auto(None) == [[True, False, True, False]]  # the rule alone (no budget set)
    assert auto(832) == [[True, False, True, False]]  # the budget's 0.9 is the rule's too
    assert auto(448) == [[True, False, True, True]]  # three: 0.9, 0.6, 0.4
    # An absolute threshold above every p0: the rule compresses nothing, the budget one.
    assert auto(832, absolute=0.95) == [[True, False, False, False]]
    # off: the budget alone.
    off = route_request(p0, VirMode.OFF, 0.5, 0.0, TokenBudget(832), FULL, SMALL)
    assert off == [[True, False, False, False]]
    # max: every tile, whatever the budget.
    maxed = route_request(p0, VirMode.MAX, 0.5, 0.0, TokenBudget(4000), FULL, SMALL)
    assert maxed == [[True] * 4]


def test_the_budget_compares_p0_in_the_routers_dtype():
    # bfloat16 p0 widened exactly: 0.69921875 (0.7 in bfloat16) beats 0.6953125.
    p0 = [torch.tensor([0.6953125, 0.69921875], dtype=torch.bfloat16)]
    decided = route_request(p0, VirMode.OFF, 0.5, 0.0, TokenBudget(448), FULL, SMALL)
    assert decided == [[False, True]]


def test_a_budget_below_the_minimum_names_it():
    budget = TokenBudget(255, (None,))
    with pytest.raises(InvalidRequest, match="minimum of 256 visual tokens") as caught:
        check_budget(budget, [4], FULL, SMALL, ["image 0"])
    assert caught.value.field == Field.MAX_VISUAL_TOKENS
    check_budget(TokenBudget(256, (None,)), [4], FULL, SMALL, ["image 0"])  # the boundary
    # An image's own cap: 3 tiles make at least 192.
    with pytest.raises(InvalidRequest, match=r"image 1: .*minimum of 192") as caught:
        check_budget(TokenBudget(None, (None, 191)), [2, 3], FULL, SMALL, ["image 0", "image 1"])
    assert caught.value.field == Field.IMAGE_MAX_VISUAL_TOKENS
    # Without a router nothing is compressed: the minimum is every tile's 256.
    with pytest.raises(InvalidRequest, match="minimum of 1024 visual tokens") as caught:
        check_budget(TokenBudget(1023), [4], FULL, None, [])
    assert "no router" in str(caught.value)
    check_budget(TokenBudget(1024), [4], FULL, None, [])
    # Frames count like tiles: an image of 2 tiles and a video of 8 frames, 10 x 64.
    with pytest.raises(InvalidRequest, match="minimum of 640"):
        check_budget(TokenBudget(639, (None, None)), [2, 8], FULL, SMALL, ["image 0"])


def test_the_budget_that_shapes_rows():
    budget = TokenBudget(500, (None,))
    assert shaping_budget(budget, VirMode.AUTO) is budget
    assert shaping_budget(budget, VirMode.OFF) is budget
    assert shaping_budget(budget, VirMode.MAX) is None  # max ignores it
    assert shaping_budget(budget, None) is None  # no router: only checked
    assert shaping_budget(TokenBudget(None, (None, None)), VirMode.AUTO) is None  # none set
    assert RowSelection.for_mode(VirMode.OFF, budgeted=True) is RowSelection.ROUTED
    assert RowSelection.for_mode(VirMode.OFF) is RowSelection.FULL
    assert RowSelection.for_mode(VirMode.MAX, budgeted=True) is RowSelection.COMPRESSED


def test_budgeted_rows_have_keys_of_their_own():
    tiling = TilingOptions(min_tiles=1, max_tiles=12, use_thumbnail=True, tile_size=448)
    digests, tilings = [b"a" * 32, b"b" * 32], [tiling, tiling]
    router = (0.5, 0.1)

    def keys(applied, budget=None, order=(0, 1)):
        return request_keys(
            [digests[i] for i in order],
            [tilings[i] for i in order],
            applied,
            router,
            "ckpt",
            torch.float32,
            budget,
        )

    plain = keys(VirMode.AUTO)
    budgeted = keys(VirMode.AUTO, TokenBudget(900, (None, None)))
    other = keys(VirMode.AUTO, TokenBudget(901, (None, None)))
    per_image = keys(VirMode.AUTO, TokenBudget(900, (None, 600)))
    off = keys(VirMode.OFF, TokenBudget(900, (None, None)))
    all_keys = [*plain, *budgeted, *other, *per_image, *off, *keys(VirMode.OFF)]
    assert len(set(all_keys)) == len(all_keys)
    # Without a budget the order of the request's images does not matter (the quantile);
    # with one it does (ties by position).
    assert keys(VirMode.AUTO, order=(1, 0))[1] == plain[0]
    assert keys(VirMode.AUTO, TokenBudget(900, (None, None)), order=(1, 0))[1] != budgeted[0]


@given(
    st.lists(
        st.lists(st.sampled_from([0.1, 0.25, 0.5, 0.75, 0.9]), min_size=1, max_size=5),
        min_size=1,
        max_size=4,
    ),
    st.integers(min_value=0, max_value=20 * FULL),
)
def test_the_choice_is_its_definition(p0: list[list[float]], budget: int):
    """A request budget alone: the fewest compressions that fit, and no tile skipped for a
    less compressible one or, on a tie, for a later one."""
    tiles = sum(len(item) for item in p0)
    budget = max(budget, tiles * SMALL)
    decided = fit(p0, budget)
    assert tokens(decided) <= budget
    needed = max(0, math.ceil((tiles * FULL - budget) / (FULL - SMALL)))
    assert sum(c for item in decided for c in item) == needed
    flat = [(value, (i, t)) for i, item in enumerate(p0) for t, value in enumerate(item)]
    chosen = [(v, at) for v, at in flat if decided[at[0]][at[1]]]
    left = [(v, at) for v, at in flat if not decided[at[0]][at[1]]]
    for value, at in chosen:
        for other, other_at in left:
            assert value > other or (value == other and at < other_at)


def test_the_readme_example():
    """README's worked example: one 3x1 image (3 tiles and its thumbnail), p0 0.2, 0.9, 0.5,
    0.7; the rule's cut-off at relative 0.5 is 0.5 + 0.5 x (0.7 - 0.5) = 0.6."""
    p0 = [torch.tensor([0.2, 0.9, 0.5, 0.7])]

    def used(budget: int, mode: VirMode, absolute: float = 0.0) -> tuple[list[int], int]:
        (decided,) = route_request(p0, mode, 0.5, absolute, TokenBudget(budget), FULL, SMALL)
        return [i for i, c in enumerate(decided) if c], tokens([decided])

    assert used(1024, VirMode.OFF) == ([], 1024)
    assert used(832, VirMode.OFF) == ([1], 832)
    assert used(831, VirMode.OFF) == ([1, 3], 640)
    assert used(831, VirMode.AUTO) == ([1, 3], 640)
    assert used(700, VirMode.AUTO, absolute=0.95) == ([1, 3], 640)
    with pytest.raises(InvalidRequest, match="minimum of 256 visual tokens"):
        check_budget(TokenBudget(255), [4], FULL, SMALL, [])
