"""The one interface the language service uses to turn images and videos into embedding rows.

Two implementations: ``GrpcImageEncoder`` (DvD: a remote vision service) and, for the
coupled baseline, an in-process encoder. The rest of the language service does not know which.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from protos.options import VirMode


@dataclass(frozen=True)
class ImageInput:
    """One image of a request: its encoded bytes and optional per-image tile cap."""

    data: bytes
    max_tiles: int | None = None


@dataclass(frozen=True)
class VideoInput:
    """One video of a request: its encoded bytes and how many frames to sample from it."""

    data: bytes
    num_frames: int


@dataclass(frozen=True)
class EncodeOptions:
    max_tiles: int | None = None
    vir: VirMode | None = None
    vir_threshold: float | None = None


@dataclass(frozen=True)
class VisualEmbedding:
    """The rows that replace one image's placeholders in the prompt, or one video's: then
    each tile is a frame, and ``frame_numbers`` says which frames of the video they are."""

    embeddings: torch.Tensor  # [num_visual_tokens, llm_hidden]
    tokens_per_tile: list[int]
    full_tokens_per_tile: int  # tokens of an uncompressed tile (256)
    vir: VirMode | None = None  # router mode applied; None: the checkpoint has no router
    from_cache: bool = False  # the vision service's embedding cache served it
    frame_numbers: list[int] | None = None  # a video's sampled frames; None for an image

    @property
    def is_video(self) -> bool:
        return self.frame_numbers is not None

    def frame_rows(self) -> list[torch.Tensor]:
        """A video's rows split per frame (each frame is one tile): ``[tokens, hidden]`` each."""
        return list(torch.split(self.embeddings, self.tokens_per_tile))

    @property
    def num_visual_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def num_compressed_tiles(self) -> int:
        return sum(1 for tokens in self.tokens_per_tile if tokens < self.full_tokens_per_tile)

    @property
    def tokens_saved(self) -> int:
        """Rows the router removed from this image."""
        return len(self.tokens_per_tile) * self.full_tokens_per_tile - self.num_visual_tokens


class ImageEncoder(Protocol):
    async def encode(
        self,
        images: Sequence[ImageInput],
        options: EncodeOptions,
        request_id: str,
        videos: Sequence[VideoInput] = (),
    ) -> list[VisualEmbedding]:
        """Embeddings of ``images``, in order, then of ``videos`` (one per video, all its
        frames); raises ``llm_server.errors.APIError`` types. All tiles of the call, images'
        and frames', are routed together."""
        ...

    async def ready(self) -> bool:
        """Whether the encoder can serve now (for health reporting)."""
        ...

    async def close(self) -> None: ...
