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


def test_stubs_import_as_a_package():
    from protos.dvd.v1 import vision_pb2, vision_pb2_grpc

    assert vision_pb2.DESCRIPTOR.package == "dvd.v1"
    assert hasattr(vision_pb2_grpc, "VisionServiceStub")
