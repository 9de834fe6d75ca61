"""Where an Encode call goes in a fleet of vision replicas: near its cached rows, unless that
replica is already busier than its share.

Each vision replica keeps its own embedding cache (``vision_server.embedding_cache``), so a chat
that re-sends its images every turn only hits when the turns land on the same replica. A
consistent hash ring maps each call's *cache identity* to a replica: the same images, under the
same options, go to the same replica, and a replica joining or leaving moves only the keys of
its own arcs (about 1/N of them). Load is bounded as in consistent hashing with bounded loads
(Mirrokni, Thorup, Zadimoghaddam): load is the tiles a replica has in flight from this client,
and a replica accepts a call while its tiles plus the call's stay within ``c`` times the fleet's
mean with the call counted; otherwise the call walks the ring to the next replica that does.
Pure arithmetic here: the replicas, their health and their loads are
``llm_server.vision.replicas``.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from protos.messages import EncodeCall
from protos.options import VirMode

# Points per replica on the ring: enough that each replica's share of the keys stays within a
# few percent of 1/N for small fleets, few enough that rebuilding the ring on a change is cheap.
VIRTUAL_NODES = 160


def _position(text: bytes) -> int:
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big")


class HashRing:
    """A consistent hash ring over replica names, ``VIRTUAL_NODES`` points each."""

    def __init__(self, replicas: Collection[str], virtual_nodes: int = VIRTUAL_NODES) -> None:
        points = sorted(
            (_position(f"{name}#{index}".encode()), name)
            for name in replicas
            for index in range(virtual_nodes)
        )
        self._positions = [position for position, _ in points]
        self._names = [name for _, name in points]
        self.replicas = frozenset(replicas)

    def walk(self, key: bytes) -> list[str]:
        """Every replica once, in ring order from ``key``'s position: the first is the key's
        home, the next ones where it overflows to."""
        if not self._names:
            return []
        start = bisect.bisect(self._positions, _position(key))
        order: list[str] = []
        seen: set[str] = set()
        for offset in range(len(self._names)):
            name = self._names[(start + offset) % len(self._names)]
            if name not in seen:
                seen.add(name)
                order.append(name)
                if len(order) == len(self.replicas):
                    break
        return order


def within_bound(load: int, tiles: int, loads: Mapping[str, int], c: float) -> bool:
    """Whether a replica with ``load`` tiles in flight may take a call of ``tiles`` more: an
    idle replica always may (a call larger than every share must go somewhere), a busy one while
    its load with the call stays within ``c`` x the mean over ``loads`` with the call counted."""
    if load == 0:
        return True
    mean = (sum(loads.values()) + tiles) / max(len(loads), 1)
    return load + tiles <= c * mean


@dataclass(frozen=True)
class Placement:
    """Where a call goes, and why."""

    replica: str
    home: str | None  # the key's replica on the ring (None: the call has no key)
    overflowed: bool  # the home was healthy but over its bound
    # Sent where this key's last call succeeded: its rows are probably cached there, so the
    # call costs that replica a cache look-up, not an encode, and the bound does not apply.
    remembered: bool = False


def place(
    ring: HashRing,
    key: bytes | None,
    tiles: int,
    loads: Mapping[str, int],
    usable: Collection[str],
    c: float,
) -> Placement | None:
    """The replica for a call with cache identity ``key`` (None: nothing reusable) and
    ``tiles`` tiles: its home on the ring if usable and within the bound, else the next usable
    one on the ring within the bound, else the least loaded usable one. ``loads``: tiles in
    flight per replica (every replica of the ring); ``usable``: the replicas that may take
    calls (healthy, not excluded). None when no replica is usable."""
    candidates = [name for name in (ring.walk(key) if key is not None else []) if name in usable]
    if key is None or not candidates:
        pool = sorted(name for name in ring.replicas if name in usable)
        if not pool:
            return None
        return Placement(min(pool, key=lambda name: loads.get(name, 0)), None, False)
    home = ring.walk(key)[0]
    for name in candidates:
        if within_bound(loads.get(name, 0), tiles, loads, c):
            return Placement(name, home, name != home and home in usable)
    least = min(candidates, key=lambda name: loads.get(name, 0))
    return Placement(least, home, least != home and home in usable)


def cache_identity(call: EncodeCall) -> bytes | None:
    """The part of the vision service's embedding-cache key this client knows, as ring key
    bytes; None for a call whose rows are never reused (no images: videos are not cached).

    Routed rows (``vir`` auto, the default, or any visual-token budget) depend on every image
    of the request and on the budget, so the key is the request's image set with its options
    (in request order when a budget applies, as the cache orders it). Otherwise each image's
    rows stand alone, and the key is the first image's: a chat re-sends its history in order,
    so every turn of a conversation lands where its earlier images are cached."""
    if not call.images:
        return None
    options = call.options
    budgeted = options.max_visual_tokens is not None or any(
        image.max_visual_tokens is not None for image in call.images
    )
    routed = budgeted or options.vir in (None, VirMode.AUTO)
    images: Sequence[tuple[bytes, int, int]] = [
        (
            hashlib.sha256(image.data).digest(),
            image.max_tiles or 0,
            image.max_visual_tokens if image.max_visual_tokens is not None else -1,
        )
        for image in call.images
    ]
    if not routed:
        images = images[:1]
    elif not budgeted:
        images = sorted(images)
    identity = hashlib.sha256()
    identity.update(
        repr(
            (
                options.max_tiles or 0,
                str(options.vir) if options.vir is not None else "",
                options.vir_threshold,
                options.max_visual_tokens,
                routed,
            )
        ).encode()
    )
    for digest, max_tiles, budget in images:
        identity.update(digest)
        identity.update(f"{max_tiles}/{budget};".encode())
    return identity.digest()
