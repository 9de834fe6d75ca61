"""The coupled deployment (``--vision inprocess``) traced: the vision pipeline runs inside the
language service's process, and its spans (preprocess, queue, passes) nest under that
service's ``vision`` span, in the same trace, named as the vision service names them.

Run in a fresh process: tracing is configured once per process, from the OTEL_* variables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import REPO_ROOT

PROBE = r"""
import asyncio, io, json, sys
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from PIL import Image

from llm_server import tracing
from llm_server.vision.inprocess import InProcessVisualEncoder
from protos.messages import EncodeCall, ImageInput

assert tracing.configure()  # from the variables, as the language service starts it
exporter = InMemorySpanExporter()  # next to the OTLP export: what was recorded, here
trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(exporter))


async def main():
    encoder = await InProcessVisualEncoder.start(Path(sys.argv[1]), Path(sys.argv[2]), "cpu", 8)
    image = io.BytesIO()
    Image.new("RGB", (900, 450), "teal").save(image, "PNG")
    try:
        tracing.begin_request()
        with tracing.stage("vision", client=True):
            result = await encoder.encode(EncodeCall([ImageInput(image.getvalue())]))
    finally:
        await encoder.close()
    return result


result = asyncio.run(main())
print(json.dumps({
    "tiles": sum(len(item.tokens_per_tile) for item in result.items),
    "spans": [
        {
            "name": s.name,
            "trace": s.context.trace_id,
            "id": s.context.span_id,
            "parent": s.parent.span_id if s.parent else None,
            "scope": s.instrumentation_scope.name,
            "attributes": dict(s.attributes),
        }
        for s in exporter.get_finished_spans()
    ],
}))
"""


def test_the_in_process_pipeline_traces_under_the_vision_stage(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces",
        "OTEL_BSP_SCHEDULE_DELAY": "600000",  # nothing is exported while the probe runs
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "1",  # the export at exit: nobody listens
    }
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(tiny_models["hf"]), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    spans = report["spans"]
    (vision,) = [s for s in spans if s["name"] == "vision"]
    assert vision["scope"] == "dvd.llm_server"
    pipeline = [s for s in spans if s["name"].startswith("vision.")]
    names = {s["name"] for s in pipeline}
    assert {"vision.preprocess", "vision.queue", "vision.pass"} <= names, names
    for span in pipeline:
        assert span["trace"] == vision["trace"], span
        assert span["parent"] == vision["id"], span
        assert span["scope"] == "dvd.vision_server", span
    # The spans say what the pipeline did: the image's tiles, preprocessed and passed.
    (preprocess,) = [s for s in pipeline if s["name"] == "vision.preprocess"]
    assert preprocess["attributes"]["dvd.tiles"] == report["tiles"] > 1
    passes = [s for s in pipeline if s["name"] == "vision.pass"]
    assert sum(s["attributes"]["dvd.pass.item_tiles"] for s in passes) == report["tiles"]
    # No gRPC hop in this deployment: no server-side request span, no delivery.
    assert not names & {"vision.request", "vision.deliver"}, names
