"""Model identity: the checkpoint digest both services compute, and the language service's
refusal (503) of rows from a vision service, or one replica behind a shared name, that serves
another checkpoint, at start-up and after a reconnect.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from helpers import encode_image, noise_image, wait_port_released

from checkpoints.identity import SAMPLE_BYTES, SAMPLES_PER_FILE, checkpoint_digest
from llm_server.errors import VisionModelMismatch
from llm_server.vision.grpc_client import GrpcVisualEncoder
from protos.dvd.v1 import vision_pb2
from protos.messages import EncodeCall, ImageInput

HIDDEN = 128

# ---- the digest ---------------------------------------------------------------------------


def test_the_digest_follows_the_bytes_not_the_folder(tiny_models, tiny_flash_models, tmp_path):
    original = tiny_models["hf"]
    copy = Path(shutil.copytree(original, tmp_path / "copy"))
    for file in copy.iterdir():  # another host's copy: other times, same bytes
        os.utime(file, (1_000_000_000, 1_000_000_000))
    digest = checkpoint_digest(original)
    assert len(digest) == 64
    assert checkpoint_digest(copy) == digest
    others = {
        checkpoint_digest(tiny_models["original"]),
        checkpoint_digest(tiny_flash_models["hf"]),
        checkpoint_digest(tiny_flash_models["original"]),
    }
    assert digest not in others and len(others) == 3

    # A config change alone is another checkpoint.
    config = json.loads((copy / "config.json").read_text())
    config["downsample_ratio"] = 0.25
    (copy / "config.json").write_text(json.dumps(config))
    assert checkpoint_digest(copy) != digest


def write_safetensors(path: Path, data: bytes, name: str = "w") -> None:
    header = json.dumps(
        {name: {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]}}
    ).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def test_large_weights_are_sampled_and_still_told_apart(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    data = bytearray(os.urandom(8 * 1024 * 1024))
    write_safetensors(folder / "model.safetensors", bytes(data))
    digest = checkpoint_digest(folder)
    # A fine-tune changes virtually every byte, so every sampled block: here the eighth block
    # and the last byte (in the last block) change alone.
    span = len(data) - SAMPLE_BYTES
    for offset in (span * 7 // (SAMPLES_PER_FILE - 1) + 100, len(data) - 1):
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        write_safetensors(folder / "model.safetensors", bytes(changed))
        assert checkpoint_digest(folder) != digest
    # Another tensor name (a header change) over the same bytes.
    write_safetensors(folder / "model.safetensors", bytes(data), name="v")
    assert checkpoint_digest(folder) != digest
    # A byte between two sampled blocks is not read: that is the price of not hashing
    # gigabytes at every start (see checkpoints/identity.py).
    changed = bytearray(data)
    changed[SAMPLE_BYTES + 10] ^= 0xFF
    write_safetensors(folder / "model.safetensors", bytes(changed))
    assert checkpoint_digest(folder) == digest


# ---- the language service's checks, against stand-in vision services -------------------------

GOOD = "a" * 64
OTHER = "b" * 64


class StandIn:
    """A vision service on 127.0.0.1: ``GetModelInfo`` reports ``info_digest``, ``Encode``
    answers one 4-row image whose header carries ``header_digest``."""

    def __init__(self, info_digest: str, header_digest: str, port: int = 0) -> None:
        self.info_digest = info_digest
        self.header_digest = header_digest
        self.port = port
        self.server: grpc.aio.Server | None = None
        self.model_info_calls = 0

    async def _encode(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        header = vision_pb2.ImageHeader(
            image_index=0,
            num_tiles=1,
            tokens_per_tile=[4],
            num_visual_tokens=4,
            hidden_size=HIDDEN,
            dtype=vision_pb2.DTYPE_FLOAT32,
            num_bytes=4 * HIDDEN * 4,
            checkpoint_digest=self.header_digest,
        )
        yield vision_pb2.EncodeResponse(header=header).SerializeToString()
        chunk = vision_pb2.EmbeddingChunk(image_index=0, offset=0, data=bytes(4 * HIDDEN * 4))
        yield vision_pb2.EncodeResponse(chunk=chunk).SerializeToString()

    async def _model_info(self, request: bytes, context: Any) -> bytes:
        self.model_info_calls += 1
        info = vision_pb2.ModelInfo(
            model_id="stand-in",
            hidden_size=HIDDEN,
            dtype=vision_pb2.DTYPE_FLOAT32,
            checkpoint_digest=self.info_digest,
        )
        return info.SerializeToString()

    async def __aenter__(self) -> StandIn:
        self.server = grpc.aio.server()
        handlers = {
            "Encode": grpc.unary_stream_rpc_method_handler(self._encode),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(self._model_info),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("dvd.v1.VisionService", handlers),)
        )
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        await self.server.stop(0)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def client(target: str, expected: str = GOOD) -> GrpcVisualEncoder:
    return GrpcVisualEncoder(
        target,
        timeout_s=10,
        expected_hidden_size=HIDDEN,
        expected_checkpoint_digest=expected,
        transport="grpc",
    )


async def encode(encoder: GrpcVisualEncoder) -> Any:
    return (await encoder.encode(EncodeCall([ImageInput(b"png")], request_id="identity"))).images


def test_a_vision_service_with_another_checkpoint_is_a_503(caplog):
    async def scenario() -> None:
        async with StandIn(info_digest=OTHER, header_digest=OTHER) as vision:
            encoder = client(vision.target)
            try:
                for _ in range(2):  # refused every time, and asked again every time
                    with pytest.raises(VisionModelMismatch) as caught:
                        await encode(encoder)
                    assert caught.value.status_code == 503
                    assert "another checkpoint" in caught.value.message
                    assert "bbbbbbbbbbbb" in caught.value.message
                assert vision.model_info_calls == 2
            finally:
                await encoder.close()

    with caplog.at_level(logging.ERROR, logger="llm_server.vision.model_identity"):
        asyncio.run(scenario())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # once per checkpoint seen, not once per request
    assert "serves checkpoint" in errors[0].getMessage()


def test_replicas_that_disagree_are_refused_and_logged_loudly(caplog):
    """GetModelInfo reached a replica with the right checkpoint; the Encode call reached one
    with another (its header says so)."""

    async def scenario() -> None:
        async with StandIn(info_digest=GOOD, header_digest=OTHER) as vision:
            encoder = client(vision.target)
            try:
                with pytest.raises(VisionModelMismatch):
                    await encode(encoder)
            finally:
                await encoder.close()
        async with StandIn(info_digest=GOOD, header_digest=GOOD) as vision:
            encoder = client(vision.target)
            try:
                (visual,) = await encode(encoder)
                assert visual.num_visual_tokens == 4
            finally:
                await encoder.close()

    with caplog.at_level(logging.ERROR, logger="llm_server.vision.model_identity"):
        asyncio.run(scenario())
    assert any("VISION REPLICAS DISAGREE" in r.getMessage() for r in caplog.records)


def test_the_model_is_checked_again_after_a_reconnect():
    """The same address comes back serving another checkpoint (whose headers carry no digest,
    as from an older service): the check that follows the reconnect refuses it."""

    async def scenario() -> None:
        encoder = None
        try:
            async with StandIn(GOOD, GOOD) as first:  # on a port it binds
                encoder = client(first.target)
                encoder.start()
                await encode(encoder)
                assert first.model_info_calls >= 1
            # The same address again, once the first stand-in has released it.
            await asyncio.to_thread(wait_port_released, "127.0.0.1", first.port)
            async with StandIn(OTHER, "", first.port) as second:
                for _ in range(200):  # the connection comes back and is checked again
                    if second.model_info_calls:
                        break
                    await asyncio.sleep(0.05)
                assert second.model_info_calls >= 1
                with pytest.raises(VisionModelMismatch):
                    await encode(encoder)
        finally:
            if encoder is not None:
                await encoder.close()

    asyncio.run(scenario())


def test_a_service_without_a_digest_is_checked_by_width_only():
    async def scenario() -> None:
        async with StandIn(info_digest="", header_digest="") as vision:
            encoder = client(vision.target)
            try:
                (visual,) = await encode(encoder)
                assert visual.num_visual_tokens == 4
            finally:
                await encoder.close()

    asyncio.run(scenario())


# ---- against the real vision service ---------------------------------------------------------


def test_the_real_vision_service_reports_its_checkpoint(
    flash_vision, tiny_models, tiny_flash_models
):
    target = flash_vision["hf"][0]
    image = [ImageInput(encode_image(noise_image(500, 300, seed=91)))]

    async def scenario() -> None:
        right = client(target, expected=checkpoint_digest(tiny_flash_models["hf"]))
        wrong = client(target, expected=checkpoint_digest(tiny_models["hf"]))  # same width
        try:
            first = (await right.encode(EncodeCall(image, request_id="identity-1"))).images
            again = (await right.encode(EncodeCall(image, request_id="identity-2"))).images
            assert [v.from_cache for v in first + again] == [False, True]
            assert right.info is not None
            assert right.info.checkpoint_digest == checkpoint_digest(tiny_flash_models["hf"])
            assert right.info.embedding_cache_bytes > 0
            with pytest.raises(VisionModelMismatch) as caught:
                await wrong.encode(EncodeCall(image, request_id="identity-3"))
            assert caught.value.status_code == 503
        finally:
            await right.close()
            await wrong.close()

    asyncio.run(scenario())
