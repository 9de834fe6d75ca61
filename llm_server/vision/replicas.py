"""The vision replicas behind one target, each with its own channels, health and load, for
``--vision-balancing affinity`` (``llm_server.vision.placement`` decides which one takes a call).

Targets:

- ``dns:///name:port`` (or ``name:port``, or ``dns://server:53/name:port`` to ask that DNS
  server): every address the name resolves to is a replica; the name is looked up again every
  ``DNS_RERESOLUTION_INTERVAL_MS``, so Compose ``--scale`` and a Kubernetes headless Service add
  and remove replicas;
- ``ipv4:10.0.0.1:50051,10.0.0.2:50051`` (or ``ipv6:[..]:port,...``): a fixed list;
- ``a:50051,b:50051``: several names, each resolved (and re-resolved) as above;
- anything else gRPC accepts (``unix:...``): one replica.

A replica is skipped while its health check (``grpc.health.v1``, every
``HEALTH_CHECK_INTERVAL_S``) does not answer SERVING, and from the moment a call to it fails
as unreachable until a check passes again. A replica that leaves the name's answer takes no new
calls; its channels close when its last call ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2

from llm_server import metrics
from llm_server.vision.channels import (
    DNS_RERESOLUTION_INTERVAL_MS,
    EncodeMethod,
    channel_options,
    control_stubs,
    encode_methods,
    watch_connection,
)
from llm_server.vision.placement import HashRing, Placement, place

logger = logging.getLogger(__name__)

# How often each replica's health is asked, and how long an answer may take.
HEALTH_CHECK_INTERVAL_S = 1.0
HEALTH_CHECK_TIMEOUT_S = 2.0
_DEFAULT_PORT = 443  # gRPC's, for a name given without one
# Cache identities remembered with the replica that last served them (about 100 bytes each).
REMEMBERED_KEYS = 65_536


@dataclass(frozen=True)
class FleetTarget:
    """What a target names: names to resolve (host, port) and the DNS server to ask (None:
    the system's), or fixed channel targets by replica name."""

    names: tuple[tuple[str, int], ...] = ()
    nameserver: tuple[str, int] | None = None
    fixed: tuple[tuple[str, str], ...] = ()  # (replica name, channel target)

    @property
    def resolves(self) -> bool:
        return bool(self.names)


def _split_host_port(text: str, default_port: int = _DEFAULT_PORT) -> tuple[str, int]:
    if text.startswith("["):  # [v6]:port
        host, _, rest = text[1:].partition("]")
        return host, int(rest.removeprefix(":") or default_port)
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, default_port


def _address_name(host: str, port: int) -> tuple[str, str]:
    """(replica name, channel target) of one IP address."""
    if ipaddress.ip_address(host).version == 6:
        return f"[{host}]:{port}", f"ipv6:[{host}]:{port}"
    return f"{host}:{port}", f"ipv4:{host}:{port}"


def parse_target(target: str) -> FleetTarget:
    """The replicas ``target`` names (see the module docstring); ``ValueError`` for one that
    cannot be read."""
    if target.startswith("dns:"):
        rest = target.removeprefix("dns:")
        nameserver = None
        if rest.startswith("//"):
            authority, _, rest = rest[2:].partition("/")
            if authority:
                nameserver = _split_host_port(authority, 53)
        return FleetTarget(names=(_split_host_port(rest),), nameserver=nameserver)
    if target.startswith(("ipv4:", "ipv6:")):
        addresses = target.partition(":")[2].split(",")
        return FleetTarget(
            fixed=tuple(_address_name(*_split_host_port(a.strip())) for a in addresses if a)
        )
    if target.startswith(("unix:", "unix-abstract:", "vsock:")):
        return FleetTarget(fixed=((target, target),))
    return FleetTarget(names=tuple(_split_host_port(part.strip()) for part in target.split(",")))


async def resolve(target: FleetTarget) -> dict[str, str] | None:
    """Replica name -> channel target for every address ``target`` names now; None when a
    look-up failed (keep what was known)."""
    if not target.resolves:
        return dict(target.fixed)
    found: dict[str, str] = {}
    for host, port in target.names:
        try:
            hosts = await _lookup(host, port, target.nameserver)
        except (OSError, ValueError) as exc:
            logger.warning("vision target: looking up %s failed: %s", host, exc)
            return None
        for address in hosts:
            name, channel_target = _address_name(address, port)
            found[name] = channel_target
    return found


async def _lookup(host: str, port: int, nameserver: tuple[str, int] | None) -> list[str]:
    with contextlib.suppress(ValueError):
        return [str(ipaddress.ip_address(host))]
    if nameserver is None:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(str(info[4][0]) for info in infos))
    # A DNS server named in the target (as gRPC's resolver takes it): asked directly.
    import dns.asyncresolver
    import dns.exception

    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [nameserver[0]]
    resolver.port = nameserver[1]
    try:
        answer = await resolver.resolve(host, "A", lifetime=2.0)
    except dns.exception.DNSException as exc:
        raise OSError(str(exc)) from exc
    return [record.to_text() for record in answer]


class Replica:
    """One vision replica: its channels, whether it answers its health checks, and the tiles
    this client has in flight on it."""

    def __init__(self, name: str, channel_target: str, count: int) -> None:
        self.name = name
        self.channels = [
            grpc.aio.insecure_channel(channel_target, options=channel_options(index, retries=False))
            for index in range(count)
        ]
        self._encode = encode_methods(self.channels)
        self._next = 0
        self.health, self.model_info = control_stubs(self.channels[0])
        self.healthy: bool | None = None  # None: not checked yet
        self.tiles_in_flight = 0
        self.calls_in_flight = 0
        self.retired = False  # left the name's answer: no new calls
        self.tasks: list[asyncio.Task[None]] = []

    def encode_method(self) -> EncodeMethod:
        """The Encode method of this replica's next channel (each in turn)."""
        encode = self._encode[self._next]
        self._next = (self._next + 1) % len(self._encode)
        return encode

    async def check_health(self) -> bool:
        try:
            reply = await self.health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_CHECK_TIMEOUT_S
            )
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for channel in self.channels:
            await channel.close()


class ReplicaFleet:
    """The replicas behind one target, kept up to date, and ``place`` for each call."""

    def __init__(self, target: str, channels: int, load_bound: float) -> None:
        self.target = target
        self.spec = parse_target(target)
        self.channels_per_replica = channels
        self.load_bound = load_bound
        self.health_interval_s = HEALTH_CHECK_INTERVAL_S
        self.replicas: dict[str, Replica] = {}
        self.ring = HashRing(())
        # Cache identity -> the replica whose last call for it succeeded (least recent first).
        self._served: OrderedDict[bytes, str] = OrderedDict()
        self._retired: list[Replica] = []
        self._resolved = asyncio.Event()
        self._on_ready: Callable[[], Awaitable[None]] | None = None
        self._task: asyncio.Task[None] | None = None

    def watch(self, on_ready: Callable[[], Awaitable[None]]) -> None:
        """Resolve the target now and keep it resolved; await ``on_ready`` whenever a replica's
        connection becomes ready. Call on the event loop."""
        self._on_ready = on_ready
        self.start()

    def start(self) -> None:
        """Resolve the target now and keep it resolved (once; later calls do nothing)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._maintain(), name="vision-fleet-resolver"
            )

    async def _maintain(self) -> None:
        while True:
            found = await resolve(self.spec)
            if found is not None:
                self._update(found)
                self._resolved.set()
            if not self.spec.resolves:
                return
            await asyncio.sleep(DNS_RERESOLUTION_INTERVAL_MS / 1000)

    def _update(self, found: dict[str, str]) -> None:
        for name in set(self.replicas) - set(found):
            replica = self.replicas.pop(name)
            replica.retired = True
            logger.info("vision replica %s left %s", name, self.target)
            self._retire(replica)
        for name, channel_target in found.items():
            if name in self.replicas:
                continue
            replica = Replica(name, channel_target, self.channels_per_replica)
            logger.info("vision replica %s joined %s", name, self.target)
            self.replicas[name] = replica
            loop = asyncio.get_running_loop()
            replica.tasks.append(
                loop.create_task(self._check_health(replica), name=f"vision-health-{name}")
            )
            if self._on_ready is not None:
                for channel in replica.channels:
                    replica.tasks.append(
                        loop.create_task(
                            watch_connection(channel, self._on_ready),
                            name=f"vision-connection-{name}",
                        )
                    )
        if set(self.replicas) != self.ring.replicas:
            self.ring = HashRing(self.replicas)

    def _retire(self, replica: Replica) -> None:
        if replica.calls_in_flight == 0:
            asyncio.get_running_loop().create_task(replica.close())
        else:
            self._retired.append(replica)

    async def _check_health(self, replica: Replica) -> None:
        while True:
            healthy = await replica.check_health()
            if healthy != replica.healthy:
                logger.info(
                    "vision replica %s is %s", replica.name, "serving" if healthy else "not serving"
                )
            replica.healthy = healthy
            await asyncio.sleep(self.health_interval_s)

    async def wait_resolved(self, timeout_s: float) -> None:
        """Until the target was resolved once (``TimeoutError`` after ``timeout_s``)."""
        async with asyncio.timeout(timeout_s):
            await self._resolved.wait()

    def usable(self, exclude: frozenset[str] = frozenset()) -> set[str]:
        """The replicas that may take a call: those not known unhealthy (all of them, when every
        one is: the call's error then says why)."""
        names = {name for name in self.replicas if name not in exclude}
        healthy = {name for name in names if self.replicas[name].healthy is not False}
        return healthy or names

    def place(
        self, key: bytes | None, tiles: int, exclude: frozenset[str] = frozenset()
    ) -> Placement | None:
        """Where a call with cache identity ``key`` and ``tiles`` tiles goes; None when no
        replica is left to try. A key whose last call succeeded on a replica still usable goes
        there whatever its load: its rows are probably in that replica's cache, and a hit
        costs a look-up there, while sending it elsewhere would cost a whole encode (a replica
        that evicted them since encodes them again, unbounded by its load)."""
        usable = self.usable(exclude)
        if key is not None and (served := self._served.get(key)) in usable:
            assert served is not None
            self._served.move_to_end(key)
            home = self.ring.walk(key)[0]
            return Placement(served, home, False, remembered=True)
        loads = {name: replica.tiles_in_flight for name, replica in self.replicas.items()}
        return place(self.ring, key, tiles, loads, usable, self.load_bound)

    def served(self, key: bytes, name: str) -> None:
        """The call with cache identity ``key`` succeeded on replica ``name``."""
        self._served[key] = name
        self._served.move_to_end(key)
        while len(self._served) > REMEMBERED_KEYS:
            self._served.popitem(last=False)

    def begin(self, name: str, tiles: int) -> Replica:
        """Count a call of ``tiles`` tiles in flight on replica ``name``."""
        replica = self.replicas[name]
        replica.tiles_in_flight += tiles
        replica.calls_in_flight += 1
        metrics.fleet_calls.labels(replica=name).inc()
        metrics.fleet_tiles_in_flight.labels(replica=name).set(replica.tiles_in_flight)
        return replica

    def end(self, replica: Replica, tiles: int) -> None:
        """The call ``begin`` counted has ended."""
        replica.tiles_in_flight -= tiles
        replica.calls_in_flight -= 1
        metrics.fleet_tiles_in_flight.labels(replica=replica.name).set(replica.tiles_in_flight)
        if replica.retired and replica.calls_in_flight == 0 and replica in self._retired:
            self._retired.remove(replica)
            asyncio.get_running_loop().create_task(replica.close())

    def unreachable(self, replica: Replica) -> None:
        """A call found ``replica`` unreachable: skip it until its health check passes."""
        replica.healthy = False

    async def any_serving(self) -> bool:
        """Whether some replica answers SERVING (asked now when none is known to)."""
        if any(replica.healthy for replica in self.replicas.values()):
            return True
        replicas = list(self.replicas.values())
        answers = await asyncio.gather(*(replica.check_health() for replica in replicas))
        return any(answers)

    def any_replica(self) -> Replica | None:
        """A replica for a model check: a healthy one if any."""
        usable = sorted(self.usable())
        return self.replicas[usable[0]] if usable else None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for replica in [*self.replicas.values(), *self._retired]:
            await replica.close()
