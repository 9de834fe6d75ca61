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
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from llm_server.errors import InvalidImage

MAX_REDIRECTS = 3


@dataclass(frozen=True)
class ImageFetchPolicy:
    max_bytes: int
    allowed_hosts: frozenset[str]
    timeout_s: float
    # Private networks that allow-listed hosts may still resolve to (an internal image store).
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @staticmethod
    def networks(cidrs: list[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


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


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_public_address(address: str) -> bool:
    """False for private, loopback, link-local (cloud metadata), multicast, reserved and
    unspecified addresses, IPv4-mapped IPv6 included."""
    ip = _ip(address)
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def address_allowed(address: str, policy: ImageFetchPolicy) -> bool:
    ip = _ip(address)
    return is_public_address(address) or any(ip in network for network in policy.allowed_networks)


async def _resolve(url: str, policy: ImageFetchPolicy) -> tuple[str, int, str]:
    """Check ``url`` against the policy; return (host, port, the address to connect to)."""
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
    port = parts.port or (443 if parts.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise InvalidImage(f"cannot resolve image host {host!r}", param="image_url") from exc
    addresses = [str(info[4][0]) for info in infos]
    # Every address must pass: a name must not be able to point at an internal service.
    if not addresses or not all(address_allowed(address, policy) for address in addresses):
        raise InvalidImage(
            f"image host {host!r} resolves to a private or internal address; refused",
            param="image_url",
        )
    return host, port, addresses[0]


def _pinned(
    url: str, host: str, port: int, address: str
) -> tuple[str, dict[str, str], dict[str, str]]:
    """The URL to request from the checked address, with the original Host header and TLS name:
    the connection cannot be re-resolved (DNS rebinding) between check and use."""
    parts = urlsplit(url)
    literal = f"[{address}]" if ":" in address else address
    pinned = urlunsplit(parts._replace(netloc=f"{literal}:{port}"))
    headers = {"Host": parts.netloc.rpartition("@")[2]}
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    return pinned, headers, extensions


async def fetch_remote_image(
    url: str, policy: ImageFetchPolicy, client: httpx.AsyncClient
) -> bytes:
    """Download an allow-listed image, re-checking every redirect, capped in size and time."""
    for _ in range(MAX_REDIRECTS + 1):
        host, port, address = await _resolve(url, policy)
        target, headers, extensions = _pinned(url, host, port, address)
        try:
            request = client.build_request(
                "GET", target, headers=headers, extensions=extensions, timeout=policy.timeout_s
            )
            response = await client.send(request, stream=True)
            try:
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
                return await _read_capped(response, policy.max_bytes)
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise InvalidImage(
                f"cannot download image: {exc.__class__.__name__}", param="image_url"
            ) from exc
    raise InvalidImage(f"image URL redirected more than {MAX_REDIRECTS} times", param="image_url")


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    too_large = InvalidImage(
        f"image is larger than the {max_bytes}-byte limit",
        param="image_url",
        code="image_too_large",
    )
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


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
