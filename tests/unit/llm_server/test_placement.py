"""Placement of Encode calls on vision replicas: the hash ring, the load bound, the calls'
cache identity and how targets name replicas."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import cast

import pytest

from llm_server.vision.placement import HashRing, cache_identity, place, within_bound
from llm_server.vision.replicas import Replica, ReplicaFleet, parse_target
from protos.messages import EncodeCall, EncodeOptions, ImageInput, VideoInput
from protos.options import VirMode

REPLICAS = [f"10.0.0.{i}:50051" for i in range(1, 5)]
KEYS = [hashlib.sha256(str(i).encode()).digest() for i in range(20_000)]


def homes(ring: HashRing) -> list[str]:
    return [ring.walk(key)[0] for key in KEYS]


def test_each_replica_homes_about_its_share():
    counts = {name: 0 for name in REPLICAS}
    for home in homes(HashRing(REPLICAS)):
        counts[home] += 1
    share = len(KEYS) / len(REPLICAS)
    assert all(0.75 * share < count < 1.25 * share for count in counts.values()), counts


@pytest.mark.parametrize("before", [1, 2, 3, 4])
def test_a_joining_replica_moves_about_one_nth_of_the_keys_all_to_itself(before):
    """Consistent hashing: keys move only to the new replica, and about 1/N of them."""
    old = homes(HashRing(REPLICAS[:before]))
    joined = "10.0.0.9:50051"
    new = homes(HashRing([*REPLICAS[:before], joined]))
    moved = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
    assert all(b == joined for _, b in moved)
    fraction = len(moved) / len(KEYS)
    expected = 1 / (before + 1)
    assert 0.75 * expected < fraction < 1.25 * expected, fraction


def test_a_leaving_replica_moves_only_its_own_keys():
    old = homes(HashRing(REPLICAS))
    new = homes(HashRing(REPLICAS[1:]))
    assert all(a == REPLICAS[0] for a, b in zip(old, new, strict=True) if a != b)


def test_the_walk_visits_every_replica_once_from_the_home():
    ring = HashRing(REPLICAS)
    walk = ring.walk(KEYS[0])
    assert sorted(walk) == sorted(REPLICAS) and walk[0] == homes(ring)[0]
    assert HashRing([]).walk(KEYS[0]) == []


def test_the_bound_counts_the_call_and_always_admits_an_idle_replica():
    loads = {"a": 10, "b": 0, "c": 2}
    # mean with a call of 3: (12 + 3) / 3 = 5; bound 1.25 x 5 = 6.25
    assert not within_bound(10, 3, loads, 1.25)
    assert within_bound(2, 3, loads, 1.25)  # 5 <= 6.25
    assert not within_bound(4, 3, {"a": 4, "b": 0, "c": 2}, 1.25)  # 7 > 1.25 x 3
    assert within_bound(0, 1000, loads, 1.25)  # larger than any share: an idle replica takes it
    # c = 1: up to exactly the mean with the call counted ((2 + 4 + 2) / 2 = 4).
    assert within_bound(2, 2, {"a": 2, "b": 4}, 1.0)
    assert not within_bound(2, 2, {"a": 2, "b": 2}, 1.0)


def test_a_hot_key_stays_home_until_its_replica_is_over_the_bound():
    ring = HashRing(REPLICAS)
    key = KEYS[7]
    home, next_one = ring.walk(key)[:2]
    loads = dict.fromkeys(REPLICAS, 0)
    usable = set(REPLICAS)
    placed = place(ring, key, 1, loads, usable, 1.25)
    assert placed is not None and placed.replica == home and not placed.overflowed
    loads[home] = 13  # a 13-tile call in flight there
    placed = place(ring, key, 1, loads, usable, 1.25)
    assert placed is not None and placed.replica == next_one and placed.overflowed
    assert placed.home == home


def test_unusable_replicas_are_skipped_without_counting_as_overflow():
    ring = HashRing(REPLICAS)
    key = KEYS[3]
    home, next_one = ring.walk(key)[:2]
    loads = dict.fromkeys(REPLICAS, 0)
    placed = place(ring, key, 1, loads, set(REPLICAS) - {home}, 1.25)
    assert placed is not None and placed.replica == next_one and not placed.overflowed
    assert place(ring, key, 1, loads, set(), 1.25) is None


def test_a_call_without_identity_goes_to_the_least_loaded():
    ring = HashRing(REPLICAS)
    loads = {REPLICAS[0]: 5, REPLICAS[1]: 1, REPLICAS[2]: 3, REPLICAS[3]: 2}
    placed = place(ring, None, 4, loads, set(REPLICAS), 1.25)
    assert placed is not None and placed.replica == REPLICAS[1] and placed.home is None


def test_when_every_replica_is_over_the_bound_the_least_loaded_takes_it():
    ring = HashRing(REPLICAS[:2])
    loads = {REPLICAS[0]: 9, REPLICAS[1]: 8}
    placed = place(ring, KEYS[0], 20, loads, set(REPLICAS[:2]), 1.0)
    assert placed is not None and placed.replica == REPLICAS[1]


def image(seed: int, **fields: int) -> ImageInput:
    return ImageInput(f"image {seed}".encode(), **fields)  # type: ignore[arg-type]


def test_cache_identity_follows_what_the_vision_cache_keys_on():
    a, b = image(1), image(2)
    routed = EncodeOptions()  # vir auto by default: rows depend on the whole image set
    key = cache_identity(EncodeCall([a, b], (), routed))
    assert key is not None
    assert cache_identity(EncodeCall([b, a], (), routed)) == key  # the set, not its order
    assert cache_identity(EncodeCall([a], (), routed)) != key
    # A budget chooses rows: its own key, in request order.
    budgeted = EncodeOptions(max_visual_tokens=512)
    assert cache_identity(EncodeCall([a, b], (), budgeted)) != key
    assert cache_identity(EncodeCall([a, b], (), budgeted)) != cache_identity(
        EncodeCall([b, a], (), budgeted)
    )
    assert cache_identity(EncodeCall([a, image(2, max_visual_tokens=64)], (), routed)) != key
    assert cache_identity(EncodeCall([a, image(2, max_tiles=2)], (), routed)) != key
    # Unrouted rows stand alone per image: a conversation keys on its first image.
    off = EncodeOptions(vir=VirMode.OFF)
    assert cache_identity(EncodeCall([a, b], (), off)) == cache_identity(EncodeCall([a], (), off))
    assert cache_identity(EncodeCall([a], (), off)) != cache_identity(EncodeCall([a], (), routed))
    # The mode given as its plain string names the same rows.
    as_text = EncodeOptions(vir="off")  # type: ignore[arg-type]
    assert cache_identity(EncodeCall([a], (), as_text)) == cache_identity(EncodeCall([a], (), off))
    # Videos are not cached: nothing to be near.
    assert cache_identity(EncodeCall([], [VideoInput(b"video")], routed)) is None


def test_targets_name_their_replicas():
    static = parse_target("ipv4:10.0.0.1:50051,10.0.0.2:50052")
    assert not static.resolves
    assert static.fixed == (
        ("10.0.0.1:50051", "ipv4:10.0.0.1:50051"),
        ("10.0.0.2:50052", "ipv4:10.0.0.2:50052"),
    )
    assert parse_target("ipv6:[::1]:50051").fixed == (("[::1]:50051", "ipv6:[::1]:50051"),)
    dns = parse_target("dns:///vision:50051")
    assert dns.names == (("vision", 50051),) and dns.nameserver is None
    pointed = parse_target("dns://127.0.0.1:5353/vision.ns.svc:50051")
    assert pointed.names == (("vision.ns.svc", 50051),)
    assert pointed.nameserver == ("127.0.0.1", 5353)
    assert parse_target("a:1,b:2").names == (("a", 1), ("b", 2))
    assert parse_target("127.0.0.1:50051").names == (("127.0.0.1", 50051),)
    assert parse_target("unix:/run/vision.sock").fixed == (
        ("unix:/run/vision.sock", "unix:/run/vision.sock"),
    )


def test_a_key_goes_back_where_it_last_succeeded_whatever_the_load():
    """A key served before is probably cached on its replica: it goes there even when that
    replica is over the bound (a hit costs a look-up; elsewhere it would cost an encode), and
    to the ring again once that replica is not usable."""
    fleet = ReplicaFleet("ipv4:" + ",".join(REPLICAS), channels=1, load_bound=1.25)
    fleet.replicas = {
        name: cast(Replica, SimpleNamespace(healthy=True, tiles_in_flight=0)) for name in REPLICAS
    }
    fleet.ring = HashRing(REPLICAS)
    key = KEYS[11]
    home, next_one = fleet.ring.walk(key)[:2]
    fleet.replicas[home].tiles_in_flight = 13
    placed = fleet.place(key, 1)
    assert placed is not None and placed.replica == next_one and placed.overflowed
    fleet.served(key, next_one)  # encoded there: its rows are cached there now
    fleet.replicas[next_one].tiles_in_flight = 40
    placed = fleet.place(key, 1)
    assert placed is not None and placed.replica == next_one and placed.remembered
    fleet.replicas[next_one].healthy = False
    placed = fleet.place(key, 1)
    assert placed is not None and placed.replica != next_one and not placed.remembered
