"""The coupled baseline: the same vision pipeline, inside the language service's process.

No gRPC hop and no separate device: images are encoded in this process before prefill, with
the exact code the vision service runs. It is what DvD is measured against, and the simplest
single-process deployment.

This is the only module of the language service that uses the vision service's code, and it
imports it when the encoder starts, so the gRPC deployment never loads the ViT code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from llm_server import metrics
from llm_server.vision.base import EncodeOptions, ImageInput, VisualEmbedding
from llm_server.vision.errors import vision_error

if TYPE_CHECKING:
    from vision_server.pipeline import VisionPipeline


class InProcessImageEncoder:
    """``ImageEncoder`` that runs the vision pipeline in this process."""

    def __init__(self, pipeline: VisionPipeline) -> None:
        self.pipeline = pipeline

    @classmethod
    async def start(cls, checkpoint: Path, cache_dir: Path, device: str) -> InProcessImageEncoder:
        """Load the checkpoint's vision half on ``device`` and start its tile batcher."""
        from vision_server.server import build_pipeline
        from vision_server.settings import VisionSettings

        settings = VisionSettings(  # type: ignore[call-arg]
            model=str(checkpoint), cache_dir=str(cache_dir), device=device
        )
        pipeline, _ = await asyncio.to_thread(build_pipeline, settings)
        pipeline.engine.start()
        return cls(pipeline)

    async def encode(
        self, images: Sequence[ImageInput], options: EncodeOptions, request_id: str
    ) -> list[VisualEmbedding]:
        from vision_server.errors import VisionError
        from vision_server.pipeline import EncodeCall, ImagePayload

        call = EncodeCall(
            images=[ImagePayload(image.data, image.max_tiles or 0) for image in images],
            max_tiles=options.max_tiles or 0,
            vir_mode=options.vir,
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
                        encoded.vir_mode,
                    )
                )
        except VisionError as exc:
            raise vision_error(exc.status, str(exc)) from exc
        return results

    async def ready(self) -> bool:
        return self.pipeline.engine.failure is None

    async def close(self) -> None:
        await self.pipeline.engine.stop()
        self.pipeline.close()
