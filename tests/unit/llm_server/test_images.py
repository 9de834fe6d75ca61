"""Image URL handling in the language service: data URLs and the remote-fetch guard."""

from __future__ import annotations

import asyncio
import base64
import threading

import pytest

from llm_server import images
from llm_server.errors import InvalidImage
from llm_server.images import (
    ImageFetchPolicy,
    MediaLoader,
    address_allowed,
    decode_data_url,
    is_public_address,
)


def test_data_url_round_trip():
    payload = b"\x89PNG fake bytes"
    url = "data:image/png;base64," + base64.b64encode(payload).decode()
    assert decode_data_url(url, max_bytes=1000) == payload


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("data:image/png;base64", "no ','"),
        ("data:text/plain;base64,aGVsbG8=", "must be image/*"),
        ("data:image/png,rawtext", "base64-encoded"),
        ("data:image/png;base64,@@@", "invalid base64"),
        ("data:image/png;base64,", "empty"),
    ],
)
def test_bad_data_urls(url, fragment):
    with pytest.raises(InvalidImage, match=fragment):
        decode_data_url(url, max_bytes=1000)


def test_data_url_size_cap_is_checked_before_decoding():
    url = "data:image/png;base64," + base64.b64encode(b"x" * 5000).decode()
    with pytest.raises(InvalidImage, match="limit"):
        decode_data_url(url, max_bytes=1000)


def test_a_data_url_is_decoded_off_the_event_loop(monkeypatch):
    threads: list[threading.Thread] = []
    decode = images._decode_payload

    def spy(url: str, start: int, kind: images.MediaKind) -> bytes:
        threads.append(threading.current_thread())
        return decode(url, start, kind)

    monkeypatch.setattr(images, "_decode_payload", spy)
    loader = MediaLoader(ImageFetchPolicy(max_bytes=1000, allowed_hosts=frozenset(), timeout_s=1))
    payload = b"\x89PNG fake bytes"
    url = "data:image/png;base64," + base64.b64encode(payload).decode()
    assert asyncio.run(loader.load(url)) == payload
    assert len(threads) == 1 and threads[0] is not threading.main_thread()
    # Too large: refused from its length alone, before any thread is asked to decode it.
    too_large = "data:image/png;base64," + base64.b64encode(b"x" * 5000).decode()
    with pytest.raises(InvalidImage, match="limit"):
        asyncio.run(loader.load(too_large))
    assert len(threads) == 1


def test_a_data_url_header_is_looked_for_at_its_start_only():
    url = "data:image/png;" + "x" * 2000 + ";base64," + base64.b64encode(b"abc").decode()
    with pytest.raises(InvalidImage, match="no ','"):
        decode_data_url(url, max_bytes=1000)
    url = "data:image/png;name=cat.png;base64," + base64.b64encode(b"abc").decode()
    assert decode_data_url(url, max_bytes=1000) == b"abc"


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("1.1.1.1", True),
        ("2001:4860:4860::8888", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),  # IPv4-mapped: the IPv4 address decides
        ("64:ff9b::808:808", True),  # NAT64 to 8.8.8.8
        ("2002:808:808::1", True),  # 6to4 from 8.8.8.8
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.0.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # shared address space (carrier-grade NAT)
        ("100.100.100.200", False),  # a cloud's metadata service there
        ("100.127.255.254", False),
        ("198.18.0.1", False),  # benchmarking
        ("198.19.255.255", False),
        ("192.0.0.1", False),  # IETF protocol assignments, all of 192.0.0.0/24
        ("192.0.0.100", False),
        ("192.0.0.255", False),
        ("192.0.2.1", False),  # documentation
        ("0.0.0.0", False),  # "this network", all of 0.0.0.0/8
        ("0.1.2.3", False),
        ("224.0.0.1", False),  # multicast
        ("239.255.255.250", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:169.254.169.254", False),
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 to 169.254.169.254
        ("64:ff9b::7f00:1", False),  # NAT64 to 127.0.0.1
        ("64:ff9b:1::808:808", False),  # local-use NAT64
        ("2002:7f00:1::1", False),  # 6to4 from 127.0.0.1
        ("2002:a9fe:a9fe::1", False),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
        ("::7f00:1", False),  # IPv4-compatible (deprecated)
        ("fc00::1", False),  # unique local, all of fc00::/7
        ("fd00:ec2::254", False),  # a cloud's metadata service there
        ("fe80::1", False),  # link-local, all of fe80::/10
        ("febf::1", False),
        ("fe80::1%eth0", False),
        ("fec0::1", False),  # site-local (deprecated)
        ("ff02::1", False),  # multicast
        ("2001:db8::1", False),  # documentation
        ("3fff::1", False),
    ],
)
def test_only_globally_routable_addresses_are_public(address, public):
    assert is_public_address(address) is public


def _policy(*networks: str) -> ImageFetchPolicy:
    return ImageFetchPolicy(
        max_bytes=1000,
        allowed_hosts=frozenset({"images.example.com"}),
        timeout_s=1,
        allowed_networks=ImageFetchPolicy.networks(list(networks)),
    )


@pytest.mark.parametrize(
    ("networks", "address", "allowed"),
    [
        ((), "8.8.8.8", True),
        ((), "10.20.1.2", False),
        (("10.20.0.0/16",), "10.20.1.2", True),
        (("10.20.0.0/16",), "10.21.1.2", False),
        (("10.20.0.0/16",), "::ffff:10.20.1.2", True),  # the IPv4 address it embeds
        (("100.64.0.0/10",), "100.64.0.1", True),
        (("fd00::/8",), "fd00::1", True),
        (("fd00::/8",), "fe80::1", False),
        (("64:ff9b::/96",), "64:ff9b::a00:1", True),  # the address as it is
    ],
)
def test_allowed_networks_override_the_rule(networks, address, allowed):
    assert address_allowed(address, _policy(*networks)) is allowed


def test_remote_urls_are_off_without_an_allow_list():
    loader = MediaLoader(ImageFetchPolicy(max_bytes=1000, allowed_hosts=frozenset(), timeout_s=1))
    with pytest.raises(InvalidImage, match="disabled"):
        asyncio.run(loader.load("https://example.com/cat.png"))


def test_hosts_outside_the_allow_list_are_refused():
    loader = MediaLoader(
        ImageFetchPolicy(
            max_bytes=1000, allowed_hosts=frozenset({"images.example.com"}), timeout_s=1
        )
    )
    with pytest.raises(InvalidImage, match="not on the allow-list"):
        asyncio.run(loader.load("https://evil.example.net/cat.png"))
    with pytest.raises(InvalidImage, match="scheme"):
        asyncio.run(loader.load("ftp://images.example.com/cat.png"))
