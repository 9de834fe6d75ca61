"""The committed gRPC stubs are exactly what `python -m protos.generate` produces."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO_ROOT


def test_generated_stubs_are_fresh():
    result = subprocess.run(
        [sys.executable, "-m", "protos.generate", "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_hand_registered_handlers_match_the_proto():
    """The vision service registers its RPCs by hand (to send pre-serialized chunks); every RPC
    of vision.proto must be there, with the streaming shape and message types it declares."""
    from protos.dvd.v1 import vision_pb2
    from vision_server.service import vision_service_handlers

    class AnyServicer:
        def __getattr__(self, name):
            return lambda *args: None

    service = vision_pb2.DESCRIPTOR.services_by_name["VisionService"]
    handlers = vision_service_handlers(AnyServicer())  # type: ignore[arg-type]
    assert set(handlers) == set(service.methods_by_name)
    for name, method in service.methods_by_name.items():
        handler = handlers[name]
        assert handler.request_streaming == method.client_streaming, name
        assert handler.response_streaming == method.server_streaming, name
        request_type = getattr(vision_pb2, method.input_type.name)
        assert handler.request_deserializer == request_type.FromString, name
