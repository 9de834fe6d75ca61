"""The Visual Resolution Router's decision rule, per request (pure arithmetic).

A tile is compressed (256 -> 64 tokens) when its compress probability p0 is above the
``relative_threshold`` quantile of p0 over **all tiles of all images of the request** and at
least the ``absolute_threshold``, exactly as InternVL3.5-Flash's published ``generate_flash``
decides over the tiles of one call. The request is the unit, so the decision never depends on
what else shares the server's forward passes.

Precision follows the published code too: the quantile is taken in float32, but both
comparisons run in the dtype the router ran in (bfloat16 on a GPU), so p0, the cut-off and the
absolute threshold are all rounded to that dtype before ``>`` and ``>=``.
"""

from __future__ import annotations

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
