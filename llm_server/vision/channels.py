"""The gRPC channels to the vision service, and, under ``--vision-balancing round_robin``,
which one carries each Encode call.

A ``dns:///name:port`` target with round-robin load balancing spreads calls over every
address the name resolves to (several vision replicas behind one Compose/Kubernetes name).
Several channels (``--vision-channels``) give each replica several HTTP/2 connections, so that
large transfers do not queue behind each other on one connection; ``ChannelBalancer.pick``
takes them in turn. Under ``--vision-balancing affinity`` (the default)
``llm_server.vision.replicas`` opens channels to each replica instead, with the same options.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health_pb2_grpc

from protos import codec
from protos.dvd.v1 import vision_pb2

# Encode is idempotent: a call that fails with UNAVAILABLE before its first reply (a replica
# that just went away) is retried on another replica, twice at most, with a short backoff.
# CANCELLED too: a replica that stops drops, as CANCELLED, a call grpcio had accepted but not
# yet handed to the servicer. Calls this process cancels itself are never retried.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "dvd.v1.VisionService"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 3,
                    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                },
            }
        ],
    }
)


# Shortest time between two DNS look-ups of a dns:/// target (each triggered by a connection
# that ended). Bounds how soon a new vision replica gets calls, with the server's connection age.
DNS_RERESOLUTION_INTERVAL_MS = 5_000

# Encode as the channel calls it: an EncodeRequest in, its raw response messages out.
EncodeMethod: TypeAlias = grpc.aio.UnaryStreamMultiCallable


class ChannelBalancer:
    """The channels to one target: ``pick`` chooses the one for the next Encode call; the
    first channel also carries health checks and model checks."""

    def __init__(self, target: str, count: int) -> None:
        self.target = target
        self.channels = [open_channel(target, index) for index in range(count)]
        self._encode = encode_methods(self.channels)
        self._next = 0
        self.health, self.model_info = control_stubs(self.channels[0])
        self._watchers: list[asyncio.Task[None]] = []

    def pick(self) -> EncodeMethod:
        """The Encode method of the channel for the next call: each channel in turn (gRPC's
        round robin then picks the replica among the addresses the name resolves to)."""
        encode = self._encode[self._next]
        self._next = (self._next + 1) % len(self._encode)
        return encode

    def watch(self, on_ready: Callable[[], Awaitable[None]]) -> None:
        """Connect now, and await ``on_ready`` whenever a channel's connection becomes ready
        (at start-up and after every reconnect). Call on the event loop."""
        for index, channel in enumerate(self.channels):
            self._watchers.append(
                asyncio.get_running_loop().create_task(
                    watch_connection(channel, on_ready), name=f"vision-connection-{index}"
                )
            )

    async def close(self) -> None:
        for watcher in self._watchers:
            watcher.cancel()
        for channel in self.channels:
            await channel.close()


async def watch_connection(
    channel: grpc.aio.Channel, on_ready: Callable[[], Awaitable[None]]
) -> None:
    ready = grpc.ChannelConnectivity.READY
    state = channel.get_state(try_to_connect=True)
    while True:
        await channel.wait_for_state_change(state)
        previous, state = state, channel.get_state(try_to_connect=False)
        if state is ready and previous is not ready:
            await on_ready()


def open_channel(target: str, index: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.lb_policy_name", "round_robin"),
            *channel_options(index, retries=True),
        ],
    )


def encode_methods(channels: Sequence[grpc.aio.Channel]) -> list[EncodeMethod]:
    """One Encode method per channel. Its messages arrive as raw bytes: codec.parse_response
    reads chunks without copying them through protobuf objects."""
    return [
        channel.unary_stream(
            "/dvd.v1.VisionService/Encode",
            request_serializer=vision_pb2.EncodeRequest.SerializeToString,
            response_deserializer=None,
        )
        for channel in channels
    ]


def control_stubs(channel: grpc.aio.Channel) -> tuple[health_pb2_grpc.HealthStub, Any]:
    """The health check and GetModelInfo on ``channel``."""
    model_info = channel.unary_unary(
        "/dvd.v1.VisionService/GetModelInfo",
        request_serializer=vision_pb2.GetModelInfoRequest.SerializeToString,
        response_deserializer=vision_pb2.ModelInfo.FromString,
    )
    return health_pb2_grpc.HealthStub(channel), model_info


def channel_options(index: int, *, retries: bool) -> list[tuple[str, str | int]]:
    """The options of every channel to the vision service. ``retries``: gRPC retries Encode
    (round robin, where the next attempt may reach another replica); a channel to one replica
    leaves the retry to the fleet, which sends it to another."""
    return [
        ("grpc.enable_retries", 1 if retries else 0),
        *([("grpc.service_config", _SERVICE_CONFIG)] if retries else []),
        ("grpc.max_receive_message_length", 2 * codec.MAX_CHUNK_BYTES),
        ("grpc.max_send_message_length", 256 * 1024 * 1024),
        # Notice a dead replica quickly, and come back quickly when it returns.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        # Channels with equal arguments share connections; these must not.
        ("grpc.use_local_subchannel_pool", 1),
        # A replica ending an aged connection (the vision service's --max-connection-age-ms)
        # makes the channel resolve the name again; gRPC allows that once per 30 s by
        # default, too slow to pick up new replicas.
        ("grpc.dns_min_time_between_resolutions_ms", DNS_RERESOLUTION_INTERVAL_MS),
        ("dvd.channel_index", index),
    ]
