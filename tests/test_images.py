"""Image URL handling in the language service: data URLs and the remote-fetch guard."""

from __future__ import annotations

import asyncio
import base64

import pytest

from llm_server.errors import InvalidImage
from llm_server.images import ImageFetchPolicy, ImageLoader, decode_data_url, is_public_address


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


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("192.168.0.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("0.0.0.0", False),
        ("2606:4700:4700::1111", True),
    ],
)
def test_public_address_classification(address, public):
    assert is_public_address(address) is public


def test_remote_urls_are_off_without_an_allow_list():
    loader = ImageLoader(ImageFetchPolicy(max_bytes=1000, allowed_hosts=frozenset(), timeout_s=1))
    with pytest.raises(InvalidImage, match="disabled"):
        asyncio.run(loader.load("https://example.com/cat.png"))


def test_hosts_outside_the_allow_list_are_refused():
    loader = ImageLoader(
        ImageFetchPolicy(
            max_bytes=1000, allowed_hosts=frozenset({"images.example.com"}), timeout_s=1
        )
    )
    with pytest.raises(InvalidImage, match="not on the allow-list"):
        asyncio.run(loader.load("https://evil.example.net/cat.png"))
    with pytest.raises(InvalidImage, match="scheme"):
        asyncio.run(loader.load("ftp://images.example.com/cat.png"))
