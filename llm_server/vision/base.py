"""The one interface the language service uses to turn images and videos into embedding rows.

Two implementations: ``GrpcVisualEncoder`` (DvD: a remote vision service) and, for the
coupled baseline, an in-process encoder. The rest of the language service does not know which.
Both speak the vision contract's Python form (``protos.messages``): an ``EncodeCall`` in, an
``EncodeResult`` out.
"""

from __future__ import annotations

from typing import Protocol

from protos.messages import (
    EncodeCall,
    EncodeOptions,
    EncodeResult,
    ImageInput,
    VideoInput,
    VisualEmbedding,
)

__all__ = [
    "EncodeCall",
    "EncodeOptions",
    "EncodeResult",
    "ImageInput",
    "VideoInput",
    "VisualEmbedding",
    "VisualEncoder",
]


class VisualEncoder(Protocol):
    async def encode(self, call: EncodeCall) -> EncodeResult:
        """The embeddings of the call's images and of its videos (one item per video, all
        its frames); raises ``llm_server.errors.APIError`` types. All tiles of the call,
        images' and frames', are routed together."""
        ...

    async def ready(self) -> bool:
        """Whether the encoder can serve now (for health reporting)."""
        ...

    async def close(self) -> None: ...
