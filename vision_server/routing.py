"""The Visual Resolution Router's decision rule, per request (pure arithmetic).

A tile is compressed (256 -> 64 tokens) when its compress probability p0 is above the
``relative_threshold`` quantile of p0 over **all tiles of all images of the request** and at
least the ``absolute_threshold``, exactly as InternVL3.5-Flash's published ``generate_flash``
decides over the tiles of one call. The request is the unit, so the decision never depends on
what else shares the server's forward passes.

Precision follows the published code too: the quantile is taken in float32, but both
comparisons run in the dtype the router ran in (bfloat16 on a GPU), so p0, the cut-off and the
absolute threshold are all rounded to that dtype before ``>`` and ``>=``.

A call may also cap its visual tokens (``max_visual_tokens``, ``TokenBudget``): tiles are then
compressed in decreasing p0 until the call fits (``compress_to_fit``), and under ``auto`` the
rule's decisions apply on top (``route_request``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from checkpoints.spec import FlashSpec
from protos.messages import Field
from protos.options import VirMode
from vision_server.errors import InvalidRequest


def resolve_mode(requested: VirMode | None, has_router: bool) -> VirMode:
    """The router mode a call asks for, its default (``auto``) filled in; refuses ``max``
    where the checkpoint has no router to compress with."""
    if requested is VirMode.MAX and not has_router:
        raise InvalidRequest(
            "vir='max' needs a Visual Resolution Router, and this checkpoint has none "
            "(not an InternVL3.5-Flash checkpoint); use 'auto' or 'off'",
            field=Field.VIR_MODE,
        )
    return requested or VirMode.AUTO


def applied_mode(mode: VirMode, has_router: bool) -> VirMode | None:
    """The mode that shapes a call's rows: none without a router (every tile keeps its
    rows, whatever was asked)."""
    return mode if has_router else None


def thresholds(flash: FlashSpec, absolute: float | None = None) -> tuple[float, float]:
    """The (relative, absolute) thresholds a call is routed with: the checkpoint's, the
    absolute one overridden by the call's ``vir_threshold`` when it sets one."""
    return flash.relative_threshold, flash.absolute_threshold if absolute is None else absolute


def route_tiles(
    compress_prob: torch.Tensor,
    mode: VirMode,
    relative_threshold: float,
    absolute_threshold: float,
) -> list[bool]:
    """Which tiles of one request to compress.

    ``compress_prob``: ``[tiles]`` p0 of every tile of the request, images in request order,
    in the router's own dtype (not upcast: the comparisons happen in that dtype).
    """
    count = int(compress_prob.shape[0])
    if mode is VirMode.OFF:
        return [False] * count
    if mode is VirMode.MAX:
        return [True] * count
    p0 = compress_prob
    cutoff = torch.quantile(p0.to(torch.float32), relative_threshold)  # 0-dim float32
    # A 0-dim tensor and a Python float do not widen a dimensioned tensor's dtype: torch
    # rounds the cut-off and the threshold to p0's dtype and compares there.
    return ((p0 > cutoff) & (p0 >= absolute_threshold)).tolist()


# ---- the visual-token budget (max_visual_tokens) --------------------------------------------


@dataclass(frozen=True)
class TokenBudget:
    """A call's caps on visual tokens (``max_visual_tokens``): the request's, over all its
    items (images and video frames alike), and each item's own, in item order (the images,
    then the videos; None where an item has none)."""

    request: int | None = None
    per_item: tuple[int | None, ...] = ()

    @property
    def is_set(self) -> bool:
        return self.request is not None or any(cap is not None for cap in self.per_item)


def shaping_budget(budget: TokenBudget, applied: VirMode | None) -> TokenBudget | None:
    """The budget that chooses rows under the router mode ``applied``: none under ``max``
    (every tile is compressed whatever the budget) or without a router (every tile keeps its
    rows; the budget is only checked, ``check_budget``), nor when the call sets none."""
    if not budget.is_set or applied not in (VirMode.AUTO, VirMode.OFF):
        return None
    return budget


def check_budget(
    budget: TokenBudget,
    tiles_per_item: Sequence[int],
    full_tokens: int,
    compressed_tokens: int | None,
    labels: Sequence[str],
) -> None:
    """Refuse a budget no choice of rows can meet: below every tile compressed
    (``compressed_tokens`` each) or, without a router (``compressed_tokens`` None), below
    every tile's ``full_tokens``. ``labels`` name the items in messages ("image 0")."""
    fewest = full_tokens if compressed_tokens is None else compressed_tokens
    if compressed_tokens is None:
        how = "uncompressed (this checkpoint has no router)"
    else:
        how = f"each compressed to {compressed_tokens}"
    for cap, tiles, label in zip(budget.per_item, tiles_per_item, labels, strict=False):
        if cap is not None and cap < tiles * fewest:
            raise InvalidRequest(
                f"{label}: max_visual_tokens={cap} is below its minimum of {tiles * fewest} "
                f"visual tokens ({tiles} tiles, {how})",
                field=Field.IMAGE_MAX_VISUAL_TOKENS,
            )
    tiles = sum(tiles_per_item)
    if budget.request is not None and budget.request < tiles * fewest:
        raise InvalidRequest(
            f"max_visual_tokens={budget.request} is below this request's minimum of "
            f"{tiles * fewest} visual tokens ({tiles} tiles, {how})",
            field=Field.MAX_VISUAL_TOKENS,
        )


def compress_to_fit(
    compress_prob: Sequence[Sequence[float]],
    budget: TokenBudget,
    full_tokens: int,
    compressed_tokens: int,
) -> list[list[bool]]:
    """Which tiles the budget compresses, per item (``compress_prob``: each item's p0 per
    tile, in item order).

    First each item with its own cap: its tiles in decreasing p0, the earlier tile first on a
    tie, until the item fits. Then the request's cap: the tiles still uncompressed, over all
    items, in decreasing p0, the earlier item and tile first on a tie, until the request
    fits. Each step compresses as few tiles as it can (every compression saves the same
    ``full_tokens - compressed_tokens``), and the most compressible first. The caps are
    assumed checked (``check_budget``): all tiles compressed always fit."""
    compress = [[False] * len(item) for item in compress_prob]
    tokens = [len(item) * full_tokens for item in compress_prob]
    saving = full_tokens - compressed_tokens

    def most_compressible_first(indexes: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return sorted(indexes, key=lambda at: (-compress_prob[at[0]][at[1]], at))

    for item, cap in enumerate(budget.per_item[: len(compress_prob)]):
        if cap is None:
            continue
        for _, tile in most_compressible_first(
            [(item, t) for t in range(len(compress_prob[item]))]
        ):
            if tokens[item] <= cap:
                break
            compress[item][tile] = True
            tokens[item] -= saving
    if budget.request is not None:
        left = [
            (i, t) for i, item in enumerate(compress) for t, done in enumerate(item) if not done
        ]
        total = sum(tokens)
        for item, tile in most_compressible_first(left):
            if total <= budget.request:
                break
            compress[item][tile] = True
            total -= saving
    return compress


def route_request(
    compress_prob: Sequence[torch.Tensor],
    mode: VirMode,
    relative_threshold: float,
    absolute_threshold: float,
    budget: TokenBudget | None,
    full_tokens: int,
    compressed_tokens: int,
) -> list[list[bool]]:
    """Which tiles of one request to compress, per item (``compress_prob``: each item's
    ``[tiles]`` p0, in the router's dtype): the budget's choice (``compress_to_fit``) and,
    under ``auto``, the published rule's decisions over all tiles of the request on top (a
    tile either compresses is compressed). ``off`` is the budget alone; ``max`` is every
    tile."""
    counts = [int(p0.shape[0]) for p0 in compress_prob]
    if mode is VirMode.MAX:
        return [[True] * count for count in counts]
    chosen = [[False] * count for count in counts]
    if budget is not None:
        values = [p0.to(torch.float32).tolist() for p0 in compress_prob]  # exact widening
        chosen = compress_to_fit(values, budget, full_tokens, compressed_tokens)
    if mode is VirMode.AUTO:
        rule = route_tiles(
            torch.cat(list(compress_prob)), mode, relative_threshold, absolute_threshold
        )
        start = 0
        for item, count in enumerate(counts):
            chosen[item] = [
                a or b for a, b in zip(chosen[item], rule[start : start + count], strict=True)
            ]
            start += count
    return chosen
