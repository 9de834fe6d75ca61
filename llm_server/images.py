"""Turning an ``image_url`` or a ``video_url`` into encoded bytes: ``data:`` URLs, and
allow-listed http(s).

Decoding images is the vision service's job; here we only fetch bytes, bounded in size and
time (a data: URL's base64 is decoded off the event loop). Remote fetching is off unless hosts
are allow-listed; names that resolve to anything but globally routable addresses (private,
shared, loopback, link-local or otherwise internal networks) are refused, on every redirect
too. Images and videos follow the same rules (one allow-list); only their size limits differ.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from dataclasses import dataclass
from typing import Literal, TypeAlias
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from llm_server.errors import BadRequest, InvalidImage, InvalidVideo

MAX_REDIRECTS = 3

MediaKind = Literal["image", "video"]


def _invalid(kind: MediaKind, message: str, code: str | None = None) -> BadRequest:
    """The 400 for a bad ``image_url`` or ``video_url``."""
    error = InvalidVideo if kind == "video" else InvalidImage
    return error(message, param=f"{kind}_url", code=code)


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


# Longest media-type header of a data: URL (``image/png;base64`` and the like): the ','
# that ends it is looked for this far only, so that a URL without one costs no full scan.
MAX_DATA_URL_HEADER = 1024


def decode_data_url(url: str, max_bytes: int, kind: MediaKind = "image") -> bytes:
    """Bytes of a ``data:image/...;base64,...`` URL (``data:video/...`` for a video)."""
    return _decode_payload(url, check_data_url(url, max_bytes, kind), kind)


def check_data_url(url: str, max_bytes: int, kind: MediaKind = "image") -> int:
    """Check a data URL's header and its payload's length (nothing decoded, nothing copied:
    cheap whatever its size); return where the payload starts."""
    comma = url.find(",", 0, MAX_DATA_URL_HEADER)
    if comma < 0:
        raise _invalid(kind, "malformed data URL: no ',' separator after its media type")
    params = url[len("data:") : comma].split(";")
    if not params[0].startswith(f"{kind}/"):
        raise _invalid(kind, f"data URL media type must be {kind}/*, got {params[0] or 'none'}")
    if "base64" not in params[1:]:
        raise _invalid(kind, "data URLs must be base64-encoded")
    if (len(url) - comma - 1) * 3 // 4 > max_bytes + 3:
        raise _invalid(
            kind, f"{kind} is larger than the {max_bytes}-byte limit", f"{kind}_too_large"
        )
    return comma + 1


def _decode_payload(url: str, start: int, kind: MediaKind) -> bytes:
    """The base64 payload of a checked data URL, decoded (tens of ms for 20 MB)."""
    try:
        data = base64.b64decode(url[start:], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _invalid(kind, f"invalid base64 in data URL: {exc}") from exc
    if not data:
        raise _invalid(kind, f"{kind} data URL is empty")
    return data


def _host_allowed(host: str, allowed: frozenset[str]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if host == entry or (entry.startswith(".") and host.endswith(entry)):
            return True
    return False


IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

# NAT64's well-known prefix (RFC 6052): the last 32 bits are the IPv4 address reached.
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")

# Special-purpose blocks that are not globally reachable (IANA's registries) but that
# ``is_global`` accepts in some Python versions (3.11's, for these).
NOT_GLOBAL = (
    ipaddress.IPv4Network("192.0.0.0/24"),  # IETF protocol assignments
    ipaddress.IPv6Network("64:ff9b:1::/48"),  # local-use NAT64 (RFC 8215)
    ipaddress.IPv6Network("3fff::/20"),  # documentation (RFC 9637)
)


def _ip(address: str) -> IPAddress:
    return ipaddress.ip_address(address.split("%")[0])


def _unwrapped(ip: IPAddress) -> IPAddress:
    """The IPv4 address that an IPv6 one delivers to, where it embeds one: IPv4-mapped
    (``::ffff:a.b.c.d``), NAT64 (``64:ff9b::a.b.c.d``) and 6to4 (``2002:aabb:ccdd::/48``);
    the address itself otherwise. Teredo (``2001::/32``) is not global: refused as it is."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return ip.sixtofour or ip


def is_public_address(address: str) -> bool:
    """True only for a globally routable address (``is_global``, and neither multicast nor
    reserved, site-local or another special-purpose block); an IPv6 address that embeds an
    IPv4 one is judged by the IPv4 address. Private, shared (100.64.0.0/10, where some clouds
    keep their metadata service), loopback, link-local (169.254.169.254) and the rest fail."""
    ip = _unwrapped(_ip(address))
    site_local = isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local
    return (
        ip.is_global
        and not (ip.is_multicast or ip.is_reserved or site_local)
        and not any(ip in network for network in NOT_GLOBAL)
    )


def address_allowed(address: str, policy: ImageFetchPolicy) -> bool:
    """A public address, or one in the policy's allowed networks (as it is, or the IPv4
    address it embeds)."""
    if is_public_address(address):
        return True
    ip = _ip(address)
    candidates = {ip, _unwrapped(ip)}
    return any(
        candidate in network for candidate in candidates for network in policy.allowed_networks
    )


async def _resolve(
    url: str, policy: ImageFetchPolicy, kind: MediaKind = "image"
) -> tuple[str, int, str]:
    """Check ``url`` against the policy; return (host, port, the address to connect to)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise _invalid(
            kind, f"{kind} URL scheme {parts.scheme!r} is not accepted; use data: or http(s)"
        )
    host = parts.hostname or ""
    if not policy.allowed_hosts:
        raise _invalid(
            kind, f"remote {kind} URLs are disabled on this server; send the {kind} as a data: URL"
        )
    if not _host_allowed(host, policy.allowed_hosts):
        raise _invalid(kind, f"{kind} host {host!r} is not on the allow-list")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise _invalid(kind, f"cannot resolve {kind} host {host!r}") from exc
    addresses = [str(info[4][0]) for info in infos]
    # Every address must pass: a name must not be able to point at an internal service.
    if not addresses or not all(address_allowed(address, policy) for address in addresses):
        raise _invalid(
            kind, f"{kind} host {host!r} resolves to a private or internal address; refused"
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
    url: str,
    policy: ImageFetchPolicy,
    client: httpx.AsyncClient,
    kind: MediaKind = "image",
    max_bytes: int | None = None,
) -> bytes:
    """Download an allow-listed image (or video), re-checking every redirect, capped in size
    (``max_bytes``, default the policy's) and time."""
    for _ in range(MAX_REDIRECTS + 1):
        host, port, address = await _resolve(url, policy, kind)
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
                        raise _invalid(kind, f"{kind} URL redirected without a location")
                    url = urljoin(url, location)
                    continue
                if response.status_code != 200:
                    raise _invalid(kind, f"{kind} URL answered HTTP {response.status_code}")
                limit = policy.max_bytes if max_bytes is None else max_bytes
                return await _read_capped(response, limit, kind)
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise _invalid(kind, f"cannot download {kind}: {exc.__class__.__name__}") from exc
    raise _invalid(kind, f"{kind} URL redirected more than {MAX_REDIRECTS} times")


async def _read_capped(
    response: httpx.Response, max_bytes: int, kind: MediaKind = "image"
) -> bytes:
    too_large = _invalid(
        kind, f"{kind} is larger than the {max_bytes}-byte limit", f"{kind}_too_large"
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


class MediaLoader:
    """Resolves ``image_url`` and ``video_url`` values to bytes for one server (shares one
    HTTP client). Videos follow the images' policy, with their own size limit."""

    def __init__(self, policy: ImageFetchPolicy, max_video_bytes: int | None = None) -> None:
        self.policy = policy
        self.max_video_bytes = policy.max_bytes if max_video_bytes is None else max_video_bytes
        self._client: httpx.AsyncClient | None = None

    async def load(self, url: str, kind: MediaKind = "image") -> bytes:
        max_bytes = self.policy.max_bytes if kind == "image" else self.max_video_bytes
        if url.startswith("data:"):
            start = check_data_url(url, max_bytes, kind)
            # Decoding costs milliseconds per megabyte: off the event loop.
            return await asyncio.to_thread(_decode_payload, url, start, kind)
        if self._client is None:
            # No automatic redirects (each hop is checked), no proxies from the environment.
            self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        return await fetch_remote_image(url, self.policy, self._client, kind, max_bytes)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
