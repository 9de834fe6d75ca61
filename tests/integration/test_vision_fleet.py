"""A fleet of real vision servers behind one target, as the language service's gRPC client
places calls on it (--vision-balancing affinity): repeated images reach the replica that cached
them, a loaded replica's hot key spills to the next one, a replica killed mid-call costs the
call nothing, and a replica added behind the name gets calls.

The three replicas listen on one port at 127.0.0.1, .2 and .3, so that a DNS name can stand for
all of them (a small DNS server in the test answers for it, as a headless Service's would)."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import dns.exception
import dns.message
import dns.rcode
import dns.rrset
import grpc
import pytest
from helpers import (
    ServerProcess,
    encode_image,
    noise_image,
    process_fixture,
    scrape_metric,
    serving_vision,
    start_vision_server,
    vision_server_argv,
)
from prometheus_client import REGISTRY

from llm_server.errors import APIError
from llm_server.vision.grpc_client import GrpcVisualEncoder
from llm_server.vision.placement import cache_identity
from protos.dvd.v1 import vision_pb2
from protos.messages import EncodeCall, ImageInput

HIDDEN = 128  # the tiny checkpoint's language-model width
ADDRESSES = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
NAME = "vision.fleet.test"


class Replica:
    def __init__(self, process: ServerProcess, address: str) -> None:
        self.process = process
        self.address = address
        assert process.metrics_url is not None
        self.metrics = process.metrics_url.removesuffix("/metrics")

    def counter(self, name: str) -> float:
        return scrape_metric(self.metrics, name)

    def requests(self) -> float:
        return self.counter("dvd:vision_requests_total")


@process_fixture(scope="module")
def fleet(tiny_models, log_dir) -> Iterator[tuple[list[Replica], int]]:
    """Three vision replicas on one port at 127.0.0.1-3; yields them and the port."""
    started: list[ServerProcess] = []
    try:
        first, target = start_vision_server(
            "fleet-1", tiny_models["hf"], log_dir, ["--host", ADDRESSES[0]]
        )
        started.append(first)
        port = int(target.rsplit(":", 1)[1])
        replicas = [Replica(first, ADDRESSES[0])]
        for index, address in enumerate(ADDRESSES[1:], start=2):
            argv = vision_server_argv(tiny_models["hf"], ["--host", address], port=port)
            process = ServerProcess(f"fleet-{index}", argv, log_dir, report_ports=True)
            started.append(process)
            serving_vision(process)
            replicas.append(Replica(process, address))
        yield replicas, port
    finally:
        for process in started:
            process.stop()


def static_target(port: int, addresses: tuple[str, ...] = ADDRESSES) -> str:
    return "ipv4:" + ",".join(f"{address}:{port}" for address in addresses)


def encoder_for(target: str, balancing: str = "affinity") -> GrpcVisualEncoder:
    return GrpcVisualEncoder(
        target,
        timeout_s=60,
        expected_hidden_size=HIDDEN,
        transport="grpc",
        balancing=balancing,  # type: ignore[arg-type]
    )


def image_call(seed: int, size: int = 96) -> EncodeCall:
    data = encode_image(noise_image(size, size, seed))
    return EncodeCall([ImageInput(data)], request_id=f"fleet-{seed}")


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def home_of(encoder: GrpcVisualEncoder, call: EncodeCall) -> str:
    assert encoder.fleet is not None
    key = cache_identity(call)
    assert key is not None
    return encoder.fleet.ring.walk(key)[0]


def replica_named(replicas: list[Replica], name: str) -> Replica:
    return next(r for r in replicas if name.startswith(f"{r.address}:"))


async def wait_for(condition: Any) -> None:
    """Until ``condition()`` holds (state another task or process changes; 30 s at most)."""
    async with asyncio.timeout(30):
        while not condition():  # noqa: ASYNC110 (no event to wait on: polled state)
            await asyncio.sleep(0.02)


def test_a_resent_image_is_a_cache_hit_on_its_replica(fleet):
    """Six images, each sent three times: each is encoded once across the fleet (the replicas'
    own cache counters say so), and the re-sends hit; under round robin some re-sends miss."""
    replicas, port = fleet

    def totals() -> tuple[float, float]:
        hits = sum(r.counter("dvd:vision_embedding_cache_hits_total") for r in replicas)
        misses = sum(r.counter("dvd:vision_embedding_cache_misses_total") for r in replicas)
        return hits, misses

    async def scenario(balancing: str, seeds: range) -> tuple[float, float]:
        encoder = encoder_for(static_target(port), balancing)
        before = totals()
        try:
            for _ in range(3):
                for seed in seeds:
                    result = await encoder.encode(image_call(seed))
                    assert len(result.images) == 1
        finally:
            await encoder.close()
        after = totals()
        return after[0] - before[0], after[1] - before[1]

    affinity_hits_before = sample("dvd:fleet_affinity_hits_total")
    hits, misses = asyncio.run(scenario("affinity", range(1000, 1006)))
    assert (hits, misses) == (12, 6)
    assert sample("dvd:fleet_affinity_hits_total") - affinity_hits_before == 18
    # Like traffic, new images, gRPC's round robin over three replicas: each image meets a
    # replica that has not seen it on some of its sends (seven images: a multiple of three
    # would bring each image back to the same replica every round).
    hits, misses = asyncio.run(scenario("round_robin", range(2000, 2007)))
    assert misses > 7 and hits + misses == 21


def test_a_hot_key_spills_to_the_next_replica_when_its_own_is_loaded(fleet):
    """A call in flight on the hot image's replica (held there: the replica is stopped) puts it
    over the bound, so the same image's next call goes to the next replica on the ring."""
    replicas, port = fleet

    async def scenario() -> None:
        encoder = encoder_for(static_target(port))
        assert encoder.fleet is not None
        encoder.fleet.health_interval_s = 3600  # one check each: the stop must not hide it
        call = image_call(3000)
        try:
            await encoder.encode(image_call(2999))  # connected, checked, healthy
            await wait_for(lambda: all(r.healthy for r in encoder.fleet.replicas.values()))
            home, second = encoder.fleet.ring.walk(cache_identity(call) or b"")[:2]
            held = replica_named(replicas, home)
            spilled = replica_named(replicas, second)
            before = spilled.requests(), sample("dvd:fleet_overflow_redirects_total")
            held.process.signal(signal.SIGSTOP)
            try:
                first = asyncio.create_task(encoder.encode(call))
                await wait_for(lambda: encoder.fleet.replicas[home].tiles_in_flight > 0)
                result = await encoder.encode(call)
                assert len(result.images) == 1
                assert spilled.requests() == before[0] + 1
                assert sample("dvd:fleet_overflow_redirects_total") == before[1] + 1
            finally:
                held.process.signal(signal.SIGCONT)
            assert len((await first).images) == 1  # the held call completes where it was
        finally:
            await encoder.close()

    asyncio.run(scenario())


class StandInDNS:
    """A DNS server on 127.0.0.1 that answers A queries for one name with the addresses it was
    given (NXDOMAIN for anything else)."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.address = f"127.0.0.1:{self._socket.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fleet-dns", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, client = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            try:
                query = dns.message.from_wire(wire)
                question = query.question[0]
            except (dns.exception.DNSException, IndexError):
                continue
            reply = dns.message.make_response(query)
            addresses = list(self.addresses)
            if question.name.to_text().lower() != f"{NAME}." or not addresses:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            else:
                reply.answer.append(dns.rrset.from_text(question.name, 1, "IN", "A", *addresses))
            self._socket.sendto(reply.to_wire(), client)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close()


def test_a_replica_added_behind_the_name_gets_calls(fleet):
    replicas, port = fleet
    resolver = StandInDNS()
    resolver.addresses = list(ADDRESSES[:2])
    target = f"dns://{resolver.address}/{NAME}:{port}"

    async def scenario() -> None:
        encoder = encoder_for(target)
        assert encoder.fleet is not None
        try:
            await encoder.encode(image_call(3999))
            assert sorted(encoder.fleet.replicas) == [f"{a}:{port}" for a in ADDRESSES[:2]]
            resolver.addresses = list(ADDRESSES)
            joined = f"{ADDRESSES[2]}:{port}"
            await wait_for(lambda: joined in encoder.fleet.replicas)  # within one look-up
            # An image whose place on the new ring is the new replica.
            call = next(
                c
                for c in (image_call(s) for s in range(4000, 4100))
                if home_of(encoder, c) == joined
            )
            newcomer = replica_named(replicas, joined)
            before = newcomer.requests()
            assert len((await encoder.encode(call)).images) == 1
            assert newcomer.requests() == before + 1
        finally:
            await encoder.close()

    try:
        asyncio.run(scenario())
    finally:
        resolver.close()


def test_a_replica_killed_mid_call_costs_the_call_nothing(fleet):
    """The call's replica is SIGKILLed while the call waits on it (stopped, so that it has sent
    nothing): the call is sent once more, to the next replica, and succeeds."""
    replicas, port = fleet

    async def scenario() -> None:
        encoder = encoder_for(static_target(port))
        assert encoder.fleet is not None
        encoder.fleet.health_interval_s = 3600
        call = image_call(5000)
        try:
            await encoder.encode(image_call(4999))
            await wait_for(lambda: all(r.healthy for r in encoder.fleet.replicas.values()))
            home, second = encoder.fleet.ring.walk(cache_identity(call) or b"")[:2]
            victim = replica_named(replicas, home)
            survivor = replica_named(replicas, second)
            before = survivor.requests(), sample("dvd:fleet_failovers_total")
            victim.process.signal(signal.SIGSTOP)
            pending = asyncio.create_task(encoder.encode(call))
            await wait_for(lambda: encoder.fleet.replicas[home].tiles_in_flight > 0)
            victim.process.signal(signal.SIGKILL)
            result = await pending
            assert len(result.images) == 1 and result.images[0].num_visual_tokens > 0
            assert survivor.requests() == before[0] + 1
            assert sample("dvd:fleet_failovers_total") == before[1] + 1
            # The dead replica is skipped from now on: its calls go to the next one.
            assert len((await encoder.encode(call)).images) == 1
            assert survivor.requests() == before[0] + 2
        finally:
            await encoder.close()

    asyncio.run(scenario())


# ---- never sent twice once a reply began: stand-in replicas ----------------------------------


class Dropping:
    """A stand-in replica whose Encode sends an image header and then fails UNAVAILABLE (or,
    with ``header=False``, fails before sending anything); counts its Encode calls."""

    def __init__(self, header: bool) -> None:
        self.header = header
        self.calls = 0
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def _encode(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        self.calls += 1
        if self.header:
            header = vision_pb2.ImageHeader(
                image_index=0,
                num_tiles=1,
                tokens_per_tile=[4],
                num_visual_tokens=4,
                hidden_size=HIDDEN,
                dtype=vision_pb2.DTYPE_FLOAT32,
                num_bytes=4 * HIDDEN * 4,
            )
            yield vision_pb2.EncodeResponse(header=header).SerializeToString()
        await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")

    async def _model_info(self, request: bytes, context: Any) -> bytes:
        info = vision_pb2.ModelInfo(
            model_id="stand-in", hidden_size=HIDDEN, dtype=vision_pb2.DTYPE_FLOAT32
        )
        return info.SerializeToString()

    async def start(self) -> str:
        self.server = grpc.aio.server()
        handlers = {
            "Encode": grpc.unary_stream_rpc_method_handler(self._encode),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(self._model_info),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("dvd.v1.VisionService", handlers),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{self.port}"


@pytest.mark.parametrize("header", [True, False])
def test_a_call_is_sent_again_only_if_nothing_came_back(header):
    """Two stand-in replicas that both fail UNAVAILABLE: a call whose replica failed before
    replying is sent to the other (two calls in all); one whose replica had sent a header is
    not (one call), and fails."""

    async def scenario() -> int:
        stand_ins = [Dropping(header), Dropping(header)]
        targets = [await stand_in.start() for stand_in in stand_ins]
        encoder = encoder_for("ipv4:" + ",".join(targets))
        try:
            with pytest.raises(APIError) as caught:
                await encoder.encode(image_call(6000, size=32))
            assert caught.value.status_code in (502, 503)
            return sum(stand_in.calls for stand_in in stand_ins)
        finally:
            await encoder.close()
            for stand_in in stand_ins:
                assert stand_in.server is not None
                await stand_in.server.stop(0)

    assert asyncio.run(scenario()) == (1 if header else 2)
