"""Turning an ``image_url`` into encoded image bytes: ``data:`` URLs, and allow-listed http(s).

Decoding the image is the vision service's job; here we only fetch bytes, bounded in size and
time. Remote fetching is off unless hosts are allow-listed; addresses that resolve to private,
loopback, link-local or otherwise internal networks are refused, on every redirect too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from llm_server.errors import InvalidImage

MAX_REDIRECTS = 3


@dataclass(frozen=True)
class ImageFetchPolicy:
    max_bytes: int
    allowed_hosts: frozenset[str]
    timeout_s: float


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """Bytes of a ``data:image/...;base64,...`` URL."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise InvalidImage("malformed data URL: no ',' separator", param="image_url")
    media = header[len("data:") :]
    params = media.split(";")
    if not params[0].startswith("image/"):
        raise InvalidImage(
            f"data URL media type must be image/*, got {params[0] or 'none'}", param="image_url"
        )
    if "base64" not in params[1:]:
        raise InvalidImage("data URLs must be base64-encoded", param="image_url")
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise InvalidImage(
            f"image is larger than the {max_bytes}-byte limit",
            param="image_url",
            code="image_too_large",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage(f"invalid base64 in data URL: {exc}", param="image_url") from exc
    if not data:
        raise InvalidImage("image data URL is empty", param="image_url")
    return data


def _host_allowed(host: str, allowed: frozenset[str]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if host == entry or (entry.startswith(".") and host.endswith(entry)):
            return True
    return False


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


async def _check_url(url: str, policy: ImageFetchPolicy) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InvalidImage(
            f"image URL scheme {parts.scheme!r} is not accepted; use data: or http(s)",
            param="image_url",
        )
    host = parts.hostname or ""
    if not policy.allowed_hosts:
        raise InvalidImage(
            "remote image URLs are disabled on this server; send the image as a data: URL",
            param="image_url",
        )
    if not _host_allowed(host, policy.allowed_hosts):
        raise InvalidImage(f"image host {host!r} is not on the allow-list", param="image_url")
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise InvalidImage(f"cannot resolve image host {host!r}", param="image_url") from exc
    for info in infos:
        address = str(info[4][0])
        if not is_public_address(address):
            raise InvalidImage(
                f"image host {host!r} resolves to a non-public address; refused",
                param="image_url",
            )


async def fetch_remote_image(
    url: str, policy: ImageFetchPolicy, client: httpx.AsyncClient
) -> bytes:
    """Download an allow-listed image, re-checking every redirect, capped in size and time."""
    for _ in range(MAX_REDIRECTS + 1):
        await _check_url(url, policy)
        try:
            async with client.stream("GET", url, timeout=policy.timeout_s) as response:
                if response.is_redirect:
                    location = response.headers.get("location")
                    if not location:
                        raise InvalidImage(
                            "image URL redirected without a location", param="image_url"
                        )
                    url = urljoin(url, location)
                    continue
                if response.status_code != 200:
                    raise InvalidImage(
                        f"image URL answered HTTP {response.status_code}", param="image_url"
                    )
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                    raise InvalidImage(
                        f"image is larger than the {policy.max_bytes}-byte limit",
                        param="image_url",
                        code="image_too_large",
                    )
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > policy.max_bytes:
                        raise InvalidImage(
                            f"image is larger than the {policy.max_bytes}-byte limit",
                            param="image_url",
                            code="image_too_large",
                        )
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as exc:
            raise InvalidImage(
                f"cannot download image: {exc.__class__.__name__}", param="image_url"
            ) from exc
    raise InvalidImage(f"image URL redirected more than {MAX_REDIRECTS} times", param="image_url")


class ImageLoader:
    """Resolves ``image_url`` values to bytes for one server (shares one HTTP client)."""

    def __init__(self, policy: ImageFetchPolicy) -> None:
        self.policy = policy
        self._client: httpx.AsyncClient | None = None

    async def load(self, url: str) -> bytes:
        if url.startswith("data:"):
            return decode_data_url(url, self.policy.max_bytes)
        if self._client is None:
            # No automatic redirects (each hop is checked), no proxies from the environment.
            self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        return await fetch_remote_image(url, self.policy, self._client)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
