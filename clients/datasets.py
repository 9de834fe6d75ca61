"""Benchmark workloads: chat requests with images or videos, as a user would send them.

- ``synthetic``: images of 1 to 12 tiles (448x448 each) whose regions are either dense
  text-like content or flat colour, in a chosen mix, so a Visual Resolution Router has
  something to decide; prompts of a chosen length; deterministic for a seed.
- ``synthetic-video``: one H.264 MP4 video per request (448x448 frames, each dense text-like
  content or flat colour in the same mix, ``video_frames`` long at 8 fps, made with PyAV); how
  many frames the server samples is the request's ``num_frames`` (``--extra-body``).
- ``folder:PATH``: the images of a folder (PNG, JPEG, WebP), cycled.
- ``jsonl:PATH``: one request per line: ``{"prompt": str, "images": [path or URL, ...],
  "max_tokens": int, "follow_ups": [str, ...]}`` (all but ``prompt`` optional).
- ``multi-turn``: synthetic conversations, one image each, ``turns`` user turns (4 unless
  said otherwise); every turn re-sends the whole history (image, earlier questions and the
  model's answers), as chat UIs do.

Any dataset becomes conversations with ``turns`` > 1: each request then opens a chat and is
followed by ``turns - 1`` questions about the same image.
"""

from __future__ import annotations

import base64
import io
import json
import mimetypes
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TILE = 448
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
_WORDS = (
    "the image shows a chart with several lines labels and numbers describe what you see in "
    "detail count the objects read the text compare the regions explain the colours and the "
    "layout of the page"
).split()


@dataclass
class BenchRequest:
    """One chat request of the workload."""

    messages: list[dict[str, Any]]
    max_tokens: int
    num_images: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    # Questions asked after the answer to ``messages``, one per turn, each with the whole
    # history before it (empty: a single-turn request).
    follow_ups: list[str] = field(default_factory=list)


@dataclass
class SyntheticOptions:
    num_requests: int = 64
    images_per_request: int = 1
    min_tiles: int = 1
    max_tiles: int = 12
    dense_fraction: float = 0.5  # share of image regions with text-like content
    prompt_words: int = 32
    output_len: int = 64
    image_format: str = "JPEG"
    seed: int = 0
    turns: int = 1  # user turns per conversation (1: independent requests)
    video_frames: int = 64  # frames of each synthetic video


def _grid_for(tiles: int, rng: random.Random) -> tuple[int, int]:
    """A (columns, rows) grid with exactly ``tiles`` tiles (so InternVL tiles it that way)."""
    pairs = [(c, tiles // c) for c in range(1, tiles + 1) if tiles % c == 0]
    return rng.choice(pairs)


def _dense_region(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Dark glyph-like marks in lines on a light background, like a page of text."""
    region = np.full((height, width, 3), 245, dtype=np.uint8)
    line_height = int(rng.integers(14, 28))
    for top in range(8, height - line_height, line_height + int(rng.integers(4, 12))):
        left = 8
        while left < width - 16:
            glyph_width = int(rng.integers(4, 12))
            if rng.random() < 0.85:
                shade = int(rng.integers(0, 90))
                region[top : top + line_height - 4, left : left + glyph_width] = shade
            left += glyph_width + int(rng.integers(2, 6))
    return region


def _flat_region(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    colour = rng.integers(30, 225, size=3)
    ramp = np.linspace(-12, 12, width)[None, :, None]
    return np.clip(colour[None, None, :] + ramp, 0, 255).astype(np.uint8).repeat(height, axis=0)


def synthetic_image(tiles: int, dense_fraction: float, seed: int) -> Image.Image:
    """An image that InternVL tiles into exactly ``tiles`` tiles, each region dense or flat."""
    rng = random.Random(seed)
    columns, rows = _grid_for(tiles, rng)
    pixels = np.zeros((rows * TILE, columns * TILE, 3), dtype=np.uint8)
    np_rng = np.random.default_rng(seed)
    for row in range(rows):
        for column in range(columns):
            fill = _dense_region if np_rng.random() < dense_fraction else _flat_region
            pixels[row * TILE : (row + 1) * TILE, column * TILE : (column + 1) * TILE] = fill(
                np_rng, TILE, TILE
            )
    return Image.fromarray(pixels)


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _encode(image: Image.Image, fmt: str) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=90) if fmt == "JPEG" else image.save(buffer, fmt)
    return buffer.getvalue(), f"image/{fmt.lower()}"


def _prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + "?"


def _file_url(path: Path) -> str:
    return data_url(path.read_bytes(), mimetypes.guess_type(path.name)[0] or "image/png")


def _request(prompt: str, urls: list[str], max_tokens: int, meta: dict[str, Any]) -> BenchRequest:
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": url}} for url in urls
    ]
    content.append({"type": "text", "text": prompt})
    return BenchRequest(
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        num_images=len(urls),
        meta=meta,
    )


def synthetic(options: SyntheticOptions) -> list[BenchRequest]:
    rng = random.Random(options.seed)
    requests = []
    for index in range(options.num_requests):
        urls, tiles = [], []
        for _ in range(options.images_per_request):
            count = rng.randint(options.min_tiles, options.max_tiles)
            data, mime = _encode(
                synthetic_image(count, options.dense_fraction, rng.randrange(2**31)),
                options.image_format,
            )
            urls.append(data_url(data, mime))
            tiles.append(count)
        requests.append(
            _request(
                _prompt(rng, options.prompt_words),
                urls,
                options.output_len,
                {"tiles": tiles, "index": index},
            )
        )
    return requests


def synthetic_video(frames: int, dense_fraction: float, seed: int, fps: int = 8) -> bytes:
    """An H.264 MP4 of ``frames`` 448x448 frames, each dense (text-like) or flat."""
    import av  # only the video workload needs it

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = TILE
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            fill = _dense_region if rng.random() < dense_fraction else _flat_region
            frame = av.VideoFrame.from_ndarray(fill(rng, TILE, TILE), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def synthetic_videos(options: SyntheticOptions) -> list[BenchRequest]:
    rng = random.Random(options.seed)
    requests = []
    for index in range(options.num_requests):
        data = synthetic_video(options.video_frames, options.dense_fraction, rng.randrange(2**31))
        content: list[dict[str, Any]] = [
            {"type": "video_url", "video_url": {"url": data_url(data, "video/mp4")}},
            {"type": "text", "text": _prompt(rng, options.prompt_words)},
        ]
        requests.append(
            BenchRequest(
                messages=[{"role": "user", "content": content}],
                max_tokens=options.output_len,
                meta={"video_frames": options.video_frames, "index": index},
            )
        )
    return requests


def from_folder(folder: Path, options: SyntheticOptions) -> list[BenchRequest]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    rng = random.Random(options.seed)
    requests = []
    for index in range(options.num_requests):
        chosen = [
            files[(index * options.images_per_request + k) % len(files)]
            for k in range(options.images_per_request)
        ]
        urls = [_file_url(p) for p in chosen]
        requests.append(
            _request(
                _prompt(rng, options.prompt_words),
                urls,
                options.output_len,
                {"files": [p.name for p in chosen]},
            )
        )
    return requests


def from_jsonl(path: Path, options: SyntheticOptions) -> list[BenchRequest]:
    requests = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        urls = []
        for image in record.get("images", []):
            if image.startswith(("http://", "https://", "data:")):
                urls.append(image)
            else:
                file = (path.parent / image) if not Path(image).is_absolute() else Path(image)
                urls.append(_file_url(file))
        request = _request(
            record["prompt"],
            urls,
            int(record.get("max_tokens", options.output_len)),
            {"line": line_number},
        )
        request.follow_ups = [str(question) for question in record.get("follow_ups", [])]
        requests.append(request)
        if len(requests) == options.num_requests:
            break
    if not requests:
        raise ValueError(f"{path} holds no requests")
    base = list(requests)
    while len(requests) < options.num_requests:  # cycle short files
        requests.append(base[len(requests) % len(base)])
    return requests


def with_follow_ups(requests: list[BenchRequest], options: SyntheticOptions) -> list[BenchRequest]:
    """Each request opens a conversation of ``options.turns`` user turns: the follow-up
    questions (deterministic for the seed) are added to the ones that have none."""
    rng = random.Random(options.seed + 1)
    for request in requests:
        if options.turns > 1 and not request.follow_ups:
            request.follow_ups = [
                _prompt(rng, options.prompt_words) for _ in range(options.turns - 1)
            ]
    return requests


def load(spec: str, options: SyntheticOptions) -> list[BenchRequest]:
    """``synthetic``, ``synthetic-video``, ``multi-turn``, ``folder:PATH`` or ``jsonl:PATH``."""
    if spec in ("synthetic", "multi-turn"):
        return with_follow_ups(synthetic(options), options)
    if spec == "synthetic-video":
        return with_follow_ups(synthetic_videos(options), options)
    kind, _, location = spec.partition(":")
    if kind == "folder" and location:
        return with_follow_ups(from_folder(Path(location), options), options)
    if kind == "jsonl" and location:
        return with_follow_ups(from_jsonl(Path(location), options), options)
    raise ValueError(
        f"unknown dataset {spec!r}; use synthetic, synthetic-video, multi-turn, folder:PATH or "
        "jsonl:PATH"
    )
