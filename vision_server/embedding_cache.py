"""A content-addressed cache of the embedding rows the vision service sends.

Chat clients re-send the whole history at every turn, so the same image comes back again and
again. The cache keeps, per image, **the exact rows that were sent** for it, under a key made
of everything that changes them:

- the sha256 of the image's encoded bytes;
- its effective tiling (min and max tiles, thumbnail, tile size);
- which rows it sends: every tile's 256 rows (``vir`` off, or no router), every tile's 64 rows
  (``vir`` max), or the router's choice (``vir`` auto), with the router's thresholds;
- the served checkpoint (``checkpoints.identity.checkpoint_digest``) and the compute dtype.

The router decides over **all tiles of all images of a request** (the quantile of p0), so under
``vir`` auto an image's rows also depend on the other images of its request. The key of a routed
image therefore carries the request's *context*: the digests and tilings of all its images,
sorted (the quantile does not depend on their order). A one-image chat that re-sends its image
every turn hits; the same image next to a different one does not, and never gets rows that
were routed against other company. A hit is bit-identical to a miss by construction: it *is*
the miss's rows.

A visual-token budget (``max_visual_tokens``, the request's and each image's) also chooses
rows, under ``vir`` auto and off alike: a budgeted image's key carries the budget, and its
context in request order (ties in p0 are broken by position). A budgeted and an unbudgeted
request for the same image never share routed rows, nor do two different budgets.

Bound: least recently used entries are evicted once the rows held pass ``capacity_bytes``; an
image whose rows alone are larger is not kept.

Single flight: concurrent requests for the same key encode it once. A request first waits for
the keys other requests are encoding, then, without yielding to the event loop, takes its hits
and claims every key that is neither cached nor being encoded. A request that holds claims
never waits for another one, so no two requests can wait for each other. Claims end when the
rows are stored or, if the request fails or is cancelled, when it lets them go; the requests
waiting on them then look again (and one of them encodes). The waits are bounded (``rounds``).

Everything here runs on the event loop: no locks. Cached tensors are shared by every request
that hits them and are never written to.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from protos.messages import RowSelection
from protos.options import VirMode
from protos.tiling import TileGrid, TilingOptions
from vision_server import metrics
from vision_server.routing import TokenBudget


@dataclass(frozen=True)
class CacheKey:
    """Everything that determines the rows of one image of one request."""

    image_sha256: bytes
    tiling: TilingOptions
    rows: RowSelection
    checkpoint: str  # checkpoint digest
    dtype: str
    # Routed rows only: (relative, absolute) thresholds (``vir`` auto), and every image of
    # the request.
    router: tuple[float, float] | None = None
    context: tuple[tuple[bytes, TilingOptions], ...] = ()
    # Budgeted rows only: the request's visual-token budget (then ``context`` is in request
    # order); None: no budget chose these rows.
    budget: TokenBudget | None = None


def request_keys(
    digests: list[bytes],
    tilings: list[TilingOptions],
    applied: VirMode | None,
    thresholds: tuple[float, float] | None,
    checkpoint: str,
    dtype: torch.dtype,
    budget: TokenBudget | None = None,
) -> list[CacheKey]:
    """The keys of a request's images. ``applied``: the router mode applied (None: the
    checkpoint has no router); ``thresholds``: the router's (relative, absolute) ones;
    ``budget``: the visual-token budget that shapes the rows (``routing.shaping_budget``)."""
    kind = RowSelection.for_mode(applied, budget is not None)
    routed = kind is RowSelection.ROUTED
    context = tuple(zip(digests, tilings, strict=True)) if routed else ()
    if budget is None:
        context = tuple(sorted(context))  # the rule's quantile does not depend on the order
    return [
        CacheKey(
            image_sha256=digest,
            tiling=tiling,
            rows=kind,
            checkpoint=checkpoint,
            dtype=str(dtype).removeprefix("torch."),
            # Under ``off`` a budget alone routes: no thresholds, a key of its own.
            router=thresholds if routed and applied is VirMode.AUTO else None,
            context=context,
            budget=budget,
        )
        for digest, tiling in zip(digests, tilings, strict=True)
    ]


@dataclass(frozen=True)
class CachedImage:
    """The rows sent for one image, and what its header says about them."""

    embeddings: torch.Tensor  # [num_visual_tokens, llm_hidden], host memory of its own
    tokens_per_tile: tuple[int, ...]
    grid: TileGrid
    vir_mode: VirMode | None

    @property
    def num_bytes(self) -> int:
        return self.embeddings.numel() * self.embeddings.element_size()


def own_rows(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` in pageable host memory of their own: a view would keep its whole pass's
    output alive (and the byte count would lie), and pinned memory is too scarce to hold."""
    compact = (
        rows.is_contiguous()
        and rows.storage_offset() == 0
        and rows.untyped_storage().nbytes() == rows.numel() * rows.element_size()
    )
    if compact and not rows.is_pinned():
        return rows
    copy = torch.empty(tuple(rows.shape), dtype=rows.dtype)
    copy.copy_(rows)
    return copy


@dataclass
class Lookup:
    """One request's view of the cache: its keys, its hits, and the keys it must encode."""

    cache: EmbeddingCache
    keys: list[CacheKey]
    hits: dict[int, CachedImage]  # image index -> rows
    claimed: set[CacheKey] = field(default_factory=set)

    def store(self, index: int, image: CachedImage) -> None:
        """Keep the rows encoded for image ``index`` (and end its claim, if this request
        held it)."""
        key = self.keys[index]
        self.cache.put(key, image)
        if key in self.claimed:
            self.claimed.discard(key)
            self.cache.end_claim(key)

    def release(self) -> None:
        """End the claims this request did not fill (it failed or was cancelled)."""
        for key in self.claimed:
            self.cache.end_claim(key)
        self.claimed.clear()


class EmbeddingCache:
    """LRU by bytes, with single flight per key."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.num_bytes = 0
        self._entries: OrderedDict[CacheKey, CachedImage] = OrderedDict()
        self._claims: dict[CacheKey, asyncio.Future[None]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def put(self, key: CacheKey, image: CachedImage) -> None:
        """Keep ``image`` under ``key``, evicting the least recently used entries to stay
        within the bound. Rows larger than the whole bound are not kept."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        size = image.num_bytes
        if size > self.capacity_bytes:
            return
        image = dataclasses.replace(image, embeddings=own_rows(image.embeddings))
        self._entries[key] = image
        self.num_bytes += size
        metrics.embedding_cache_bytes.inc(size)
        metrics.embedding_cache_entries.inc()
        while self.num_bytes > self.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.num_bytes -= evicted.num_bytes
            metrics.embedding_cache_bytes.dec(evicted.num_bytes)
            metrics.embedding_cache_entries.dec()
            metrics.embedding_cache_evictions.inc()

    def end_claim(self, key: CacheKey) -> None:
        """Wake the requests waiting for ``key`` (they look again)."""
        claim = self._claims.pop(key, None)
        if claim is not None and not claim.done():
            claim.set_result(None)

    async def lookup(self, keys: list[CacheKey], rounds: int = 4) -> Lookup:
        """Hits and claims for ``keys``, after waiting (at most ``rounds`` times) for the keys
        that other requests are encoding. Keys still being encoded after that are neither
        hits nor claimed: the caller encodes them too, without waiting any longer."""
        for _ in range(rounds):
            pending = {
                claim
                for key in keys
                if key not in self._entries and (claim := self._claims.get(key)) is not None
            }
            if not pending:
                break
            await asyncio.wait(pending)
        # From here to the return nothing awaits: looking and claiming is one atomic step.
        hits: dict[int, CachedImage] = {}
        for index, key in enumerate(keys):
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                hits[index] = entry
        lookup = Lookup(self, keys, hits)
        loop = asyncio.get_running_loop()
        for key in keys:
            if key not in self._entries and key not in self._claims:
                self._claims[key] = loop.create_future()
                lookup.claimed.add(key)
        return lookup
