"""Calibrating the Visual Resolution Router's absolute threshold on a set of requests (pure
arithmetic over router scores; ``dvd-vir-calibrate`` collects the scores and prints these).

Given p0 of every tile of every request, the tokens each image would cost at any absolute
threshold (``vir_threshold``) follow from the service's own rule, ``routing.route_tiles``,
applied per request exactly as the service applies it: over all tiles of the request, with the
checkpoint's relative threshold, in the dtype the router ran in. Nothing is re-encoded per
threshold.

A lower threshold compresses more tiles, never fewer: the saving is monotone in the
threshold, so the threshold that reaches a target saving is found by bisection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from protos.options import VirMode
from vision_server.routing import route_tiles

# Thresholds are printed, searched and suggested to this many decimals.
THRESHOLD_DECIMALS = 4


@dataclass(frozen=True)
class TokenCosts:
    """Visual tokens of one tile: kept (256) and compressed (64)."""

    full: int
    compressed: int


@dataclass(frozen=True)
class RequestScores:
    """One request's router scores, as the service routes it: p0 of all its tiles, image after
    image in request order."""

    compress_prob: torch.Tensor  # [tiles], in the router's dtype (not upcast)
    tiles_per_image: tuple[int, ...]
    mode: VirMode = VirMode.AUTO  # the request's ``vir``: off and max do not depend on p0

    @property
    def num_tiles(self) -> int:
        return int(self.compress_prob.shape[0])


@dataclass(frozen=True)
class ThresholdRow:
    """What one absolute threshold costs over all requests."""

    threshold: float
    tiles: int
    compressed_tiles: int
    tokens_per_image: tuple[int, ...]  # every image of every request, in order
    uncompressed_tokens: int  # every tile kept (vir off)

    @property
    def compressed_share(self) -> float:
        return self.compressed_tiles / self.tiles if self.tiles else 0.0

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens_per_image)

    @property
    def saving(self) -> float:
        """The share of visual tokens saved against every tile kept."""
        if not self.uncompressed_tokens:
            return 0.0
        return 1.0 - self.total_tokens / self.uncompressed_tokens

    def tokens_stat(self, name: str) -> float:
        """``mean``, ``p50`` or ``p90`` of the visual tokens per image."""
        tokens = np.asarray(self.tokens_per_image, dtype=np.float64)
        if tokens.size == 0:
            return 0.0
        if name == "mean":
            return float(tokens.mean())
        return float(np.percentile(tokens, {"p50": 50, "p90": 90}[name]))


@dataclass(frozen=True)
class SavingTarget:
    """The loosest threshold (to ``THRESHOLD_DECIMALS``) that saves at least ``target``."""

    target: float
    threshold: float | None  # None: no threshold in [0, 1] reaches it
    saving: float  # at ``threshold`` (at 0 when unreachable: the most any threshold saves)
    next_threshold: float | None  # one step looser (None past 1)
    next_saving: float | None


def request_decisions(
    request: RequestScores, relative_threshold: float, absolute_threshold: float
) -> list[bool]:
    """Which tiles of ``request`` the service compresses at ``absolute_threshold``."""
    return route_tiles(request.compress_prob, request.mode, relative_threshold, absolute_threshold)


def evaluate(
    requests: Sequence[RequestScores],
    threshold: float,
    relative_threshold: float,
    costs: TokenCosts,
) -> ThresholdRow:
    """Every image's visual tokens at ``threshold``."""
    tokens: list[int] = []
    compressed = tiles = 0
    for request in requests:
        decisions = request_decisions(request, relative_threshold, threshold)
        compressed += sum(decisions)
        tiles += len(decisions)
        start = 0
        for count in request.tiles_per_image:
            image = decisions[start : start + count]
            tokens.append(sum(costs.compressed if squeeze else costs.full for squeeze in image))
            start += count
    return ThresholdRow(threshold, tiles, compressed, tuple(tokens), tiles * costs.full)


def sweep(
    requests: Sequence[RequestScores],
    thresholds: Sequence[float],
    relative_threshold: float,
    costs: TokenCosts,
) -> list[ThresholdRow]:
    """``evaluate`` at each of ``thresholds``, in the order given."""
    return [evaluate(requests, t, relative_threshold, costs) for t in thresholds]


def default_thresholds(checkpoint_threshold: float, step: float = 0.05) -> list[float]:
    """0 to 1 in ``step``s, with the checkpoint's own threshold among them, ascending."""
    count = round(1 / step)
    grid = {round(i * step, THRESHOLD_DECIMALS) for i in range(count + 1)}
    grid.add(round(checkpoint_threshold, THRESHOLD_DECIMALS))
    return sorted(grid)


def threshold_for_saving(
    requests: Sequence[RequestScores],
    target: float,
    relative_threshold: float,
    costs: TokenCosts,
) -> SavingTarget:
    """The highest threshold on the ``THRESHOLD_DECIMALS`` grid whose saving is at least
    ``target``: the one that reaches it while compressing the fewest tiles."""
    scale = 10**THRESHOLD_DECIMALS

    def saving_at(step: int) -> float:
        return evaluate(requests, step / scale, relative_threshold, costs).saving

    lowest = saving_at(0)
    if lowest < target:
        return SavingTarget(target, None, lowest, None, None)
    # Invariant: step ``reached`` reaches the target, step ``missed`` (past 1 at first) does
    # not; the saving falls as the threshold rises.
    reached, missed = 0, scale + 1
    while missed - reached > 1:
        middle = (reached + missed) // 2
        if saving_at(middle) >= target:
            reached = middle
        else:
            missed = middle
    saving = saving_at(reached)
    if missed > scale:
        return SavingTarget(target, reached / scale, saving, None, None)
    return SavingTarget(target, reached / scale, saving, missed / scale, saving_at(missed))
