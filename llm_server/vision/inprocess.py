"""The coupled baseline: the same vision pipeline, inside the language service's process.

No gRPC hop and no separate device: images are encoded in this process before prefill, with
the exact code the vision service runs. It is what DvD is measured against, and the simplest
single-process deployment.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from llm_server import metrics
from llm_server.errors import APIError, InvalidImage, Overloaded, VisionUnavailable
from llm_server.vision.base import EncodeOptions, ImageInput, VisualEmbedding
from vision_server.errors import InvalidRequest, ShuttingDown, VisionError
from vision_server.errors import Overloaded as VisionOverloaded
from vision_server.pipeline import EncodeCall, ImagePayload, VisionPipeline
from vision_server.routing import VirMode
from vision_server.server import build_pipeline
from vision_server.settings import VisionSettings


def _to_api_error(error: VisionError) -> APIError:
    if isinstance(error, InvalidRequest):
        return InvalidImage(str(error), param="messages")
    if isinstance(error, VisionOverloaded):
        return Overloaded(f"vision encoder is overloaded: {error}")
    if isinstance(error, ShuttingDown):
        return VisionUnavailable(str(error))
    return APIError(f"vision encoder error: {error}")


class InProcessImageEncoder:
    """``ImageEncoder`` that runs the vision pipeline in this process."""

    def __init__(self, pipeline: VisionPipeline) -> None:
        self.pipeline = pipeline

    @classmethod
    async def start(cls, settings: VisionSettings) -> InProcessImageEncoder:
        pipeline, _ = await asyncio.to_thread(build_pipeline, settings)
        pipeline.engine.start()
        return cls(pipeline)

    async def encode(
        self, images: Sequence[ImageInput], options: EncodeOptions, request_id: str
    ) -> list[VisualEmbedding]:
        call = EncodeCall(
            images=[ImagePayload(image.data, image.max_tiles or 0) for image in images],
            max_tiles=options.max_tiles or 0,
            vir_mode=VirMode(options.vir) if options.vir else None,
            vir_threshold=options.vir_threshold,
            request_id=request_id,
        )
        results = []
        try:
            async for encoded in self.pipeline.encode(call):
                metrics.vision_queue_wait.observe(encoded.stats.queue_ms / 1000)
                metrics.vision_encode.observe(encoded.stats.encode_ms / 1000)
                results.append(
                    VisualEmbedding(
                        encoded.embeddings,
                        encoded.tokens_per_tile,
                        self.pipeline.spec.tokens_per_tile,
                        encoded.vir_mode.value if encoded.vir_mode else None,
                    )
                )
        except VisionError as exc:
            raise _to_api_error(exc) from exc
        return results

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        await self.pipeline.engine.stop()
        self.pipeline.close()
