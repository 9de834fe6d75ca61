"""`dvd-vir-calibrate`: what the Visual Resolution Router's threshold costs on your own images.

Encodes a folder of images (each image one request) or a JSONL file of chat requests (each
line one request; its images are routed together, as the service routes them) with the vision
service's own pipeline, in this process: the same settings (``DVD_*`` environment variables
included), the same media workers cutting the same tiles, the same encoder. It keeps each
tile's router score p0 and applies the service's rule (``vision_server.routing``) at a range
of absolute thresholds, printing for each the share of tiles compressed and the visual tokens
per image (mean, p50, p90). ``--target-saving`` finds the threshold that saves that share of
visual tokens; ``--plot`` draws tokens per image against the threshold.

The vision service's gRPC contract does not carry p0 (only each tile's resulting token count),
so the scores are always computed in this process; on a GPU host it runs where the service
would (``--device``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import torch

from protos.messages import EncodeCall, EncodeOptions, ImageInput, RowSelection, too_many
from protos.options import VirMode
from vision_server.errors import TooManyItems, VisionError
from vision_server.pipeline import VisionPipeline
from vision_server.preprocess import PreparedImage
from vision_server.routing import resolve_mode, thresholds
from vision_server.settings import VisionSettings
from vision_server.vir_calibration import (
    THRESHOLD_DECIMALS,
    RequestScores,
    SavingTarget,
    ThresholdRow,
    TokenCosts,
    default_thresholds,
    sweep,
    threshold_for_saving,
)

logger = logging.getLogger("vision_server.calibrate")

# Files of a folder that are read as images (the service decides whether it accepts each).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
# Where the threshold is set: per request, or as the checkpoint's default.
REQUEST_FIELD = "vir_threshold"
CHECKPOINT_SETTING = "flash_absolute_threshold"
# Thresholds the plot is drawn at (the table's are coarser).
PLOT_STEPS = 200


class InputError(ValueError):
    """A request of the input cannot be calibrated (the reason is for people)."""


@dataclass(frozen=True)
class ImageSource:
    """One image of a request: a file, or bytes already in hand (a data: URL)."""

    label: str
    path: Path | None = None
    data: bytes | None = None
    max_tiles: int | None = None  # ``detail: low`` is one tile

    def read(self, max_bytes: int) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        size = self.path.stat().st_size
        if size > max_bytes:  # not read at all: the service refuses it by its size
            raise InputError(f"{self.label}: {size} bytes; the limit is {max_bytes} bytes")
        return self.path.read_bytes()


@dataclass(frozen=True)
class CalibrationRequest:
    """One request to route: its images, and the fields of it that change the tokens."""

    label: str
    images: tuple[ImageSource, ...]
    max_tiles: int | None = None
    vir: VirMode | None = None


@dataclass(frozen=True)
class Skipped:
    source: str
    reason: str


@dataclass
class Collected:
    """The router scores of every request that could be encoded, and what was skipped."""

    scores: list[RequestScores] = field(default_factory=list)
    image_labels: list[str] = field(default_factory=list)  # every image of ``scores``
    skipped: list[Skipped] = field(default_factory=list)


# ---- reading the input ----------------------------------------------------------------------


def folder_requests(folder: Path) -> list[CalibrationRequest]:
    """Each image file under ``folder`` (recursively, sorted by path) as a request of its own."""
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    )
    return [
        CalibrationRequest(
            str(p.relative_to(folder)), (ImageSource(str(p.relative_to(folder)), p),)
        )
        for p in files
    ]


def jsonl_requests(path: Path) -> tuple[list[CalibrationRequest], list[Skipped]]:
    """Each line of ``path`` a chat completion request body; its ``image_url`` parts are
    ``data:`` URLs, ``file://`` URLs or file paths (relative to the file's folder)."""
    requests: list[CalibrationRequest] = []
    skipped: list[Skipped] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            label = f"{path.name}:{number}"
            try:
                requests.append(chat_request(json.loads(line), label, path.parent))
            except json.JSONDecodeError as exc:
                skipped.append(Skipped(label, f"not JSON: {exc}"))
            except InputError as exc:
                skipped.append(Skipped(label, str(exc)))
    return requests, skipped


def chat_request(body: Any, label: str, base: Path) -> CalibrationRequest:
    """The images and routing fields of one chat completion request body."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise InputError("not a chat request: no 'messages' list")
    images: list[ImageSource] = []
    for message in body["messages"]:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "video_url":
                raise InputError("has a video: requests with videos are not calibrated")
            if part.get("type") != "image_url":
                continue
            image_url = part.get("image_url")
            image_url = {"url": image_url} if isinstance(image_url, str) else image_url
            if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str):
                raise InputError("an image_url part without a url")
            image_label = f"{label} image {len(images)}"
            max_tiles = 1 if image_url.get("detail") == "low" else None
            images.append(image_source(image_url["url"], image_label, base, max_tiles))
    if not images:
        raise InputError("no images")
    max_tiles = body.get("max_tiles")
    if max_tiles is not None and (not isinstance(max_tiles, int) or max_tiles < 1):
        raise InputError(f"max_tiles must be a positive integer, got {max_tiles!r}")
    vir = body.get("vir")
    try:
        mode = VirMode(vir) if vir is not None else None
    except ValueError:
        raise InputError(f"unknown vir {vir!r}") from None
    return CalibrationRequest(label, tuple(images), max_tiles, mode)


def image_source(url: str, label: str, base: Path, max_tiles: int | None) -> ImageSource:
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InputError(f"{label}: a data: URL must be base64 (data:image/...;base64,...)")
        try:
            return ImageSource(
                label, data=base64.b64decode(payload, validate=True), max_tiles=max_tiles
            )
        except binascii.Error as exc:
            raise InputError(f"{label}: bad base64 in its data: URL ({exc})") from None
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        raise InputError(f"{label}: remote URLs are not fetched; give a data: URL or a file path")
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:  # (a one-letter scheme is a drive)
        raise InputError(f"{label}: URL scheme {parsed.scheme!r} is not read")
    else:
        path = Path(url)
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise InputError(f"{label}: no file {path}")
    return ImageSource(label, path=path, max_tiles=max_tiles)


# ---- encoding -------------------------------------------------------------------------------


async def request_scores(
    pipeline: VisionPipeline, request: CalibrationRequest, request_id: str
) -> RequestScores:
    """p0 of every tile of ``request``, cut and encoded as the service does; a request over
    the service's limits (images, tiles) is refused as the service refuses it."""
    settings = pipeline.settings
    if len(request.images) > settings.max_images_per_request:
        count, limit = len(request.images), settings.max_images_per_request
        raise TooManyItems(too_many("images", count, limit))
    max_bytes = settings.max_image_bytes
    call = EncodeCall(
        images=[ImageInput(image.read(max_bytes), image.max_tiles) for image in request.images],
        options=EncodeOptions(max_tiles=request.max_tiles, vir=request.vir),
        request_id=request_id,
    )
    engine = pipeline.engine
    mode = resolve_mode(call.options.vir, engine.has_router)
    tiling = pipeline.image_tiling(call)
    prepared = await asyncio.gather(
        *(
            pipeline.media.prepare_image(image.data, options)
            for image, options in zip(call.images, tiling, strict=True)
        )
    )
    tiles = sum(_whole(image).num_tiles for image in prepared)
    if tiles > settings.max_tiles_per_request:
        raise TooManyItems(
            f"the images of this request make {tiles} tiles; the limit is "
            f"{settings.max_tiles_per_request}"
        )
    encoded = await asyncio.gather(
        *(
            engine.batcher.submit(_whole(image).tiles, RowSelection.ROUTED, request_id)
            for image in prepared
        )
    )
    p0 = [
        torch.cat([piece.compress_prob for piece in pieces if piece.compress_prob is not None])
        for pieces, _ in encoded
    ]
    return RequestScores(
        compress_prob=torch.cat(p0),  # [tiles], the router's dtype
        tiles_per_image=tuple(int(image.shape[0]) for image in p0),
        mode=mode,
    )


def _whole(image: object) -> PreparedImage:
    if not isinstance(image, PreparedImage):  # asked for whole, never in parts
        raise TypeError(f"expected a whole prepared image, got {type(image).__name__}")
    return image


async def collect_scores(
    pipeline: VisionPipeline,
    requests: Sequence[CalibrationRequest],
    concurrency: int,
    progress: bool,
) -> Collected:
    """The router scores of ``requests``, in order; a request the service would refuse is
    skipped, with its reason."""
    from tqdm import tqdm

    gate = asyncio.Semaphore(concurrency)
    images = sum(len(request.images) for request in requests)
    bar = tqdm(total=images, unit="image", disable=not progress, file=sys.stderr)

    async def one(index: int, request: CalibrationRequest) -> RequestScores | Skipped:
        async with gate:
            try:
                return await request_scores(pipeline, request, f"calibrate-{index}")
            except (VisionError, InputError, OSError) as exc:
                return Skipped(request.label, str(exc))
            finally:
                bar.update(len(request.images))

    try:
        results = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    finally:
        bar.close()
    collected = Collected()
    for request, result in zip(requests, results, strict=True):
        if isinstance(result, Skipped):
            collected.skipped.append(result)
        else:
            collected.scores.append(result)
            collected.image_labels.extend(image.label for image in request.images)
    return collected


def vision_settings(args: argparse.Namespace) -> VisionSettings:
    """The vision service's settings (its ``DVD_*`` environment included), with this tool's
    flags on top; no embedding cache (nothing is served)."""
    overrides: dict[str, Any] = {"embedding_cache_mb": 0, "metrics": False}
    for name in ("model", "revision", "device", "dtype", "cache_dir"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    return VisionSettings(**overrides)


async def run_encoder(args: argparse.Namespace, requests: Sequence[CalibrationRequest]) -> Report:
    from vision_server.server import build_pipeline

    settings = vision_settings(args)
    pipeline, model_id = await asyncio.to_thread(build_pipeline, settings)
    try:
        flash = pipeline.spec.flash
        if flash is None:
            raise SystemExit(
                f"dvd-vir-calibrate: {model_id} has no Visual Resolution Router (not an "
                "InternVL3.5-Flash checkpoint): every tile keeps its tokens at any threshold"
            )
        pipeline.engine.start()
        try:
            collected = await collect_scores(pipeline, requests, args.concurrency, args.progress)
        finally:
            await pipeline.engine.stop()
    finally:
        pipeline.close()
    relative, absolute = thresholds(flash)
    costs = TokenCosts(pipeline.spec.tokens_per_tile, pipeline.spec.compressed_tokens_per_tile)
    return Report(
        model=model_id,
        device=str(pipeline.engine.device),
        dtype=str(pipeline.engine.dtype).removeprefix("torch."),
        relative_threshold=relative,
        checkpoint_threshold=absolute,
        costs=costs,
        collected=collected,
        # The checkpoint's own threshold is always a row of the table.
        thresholds=sorted({*args.thresholds, round(absolute, THRESHOLD_DECIMALS)})
        if args.thresholds
        else default_thresholds(absolute),
        target=args.target_saving,
    )


# ---- the report -----------------------------------------------------------------------------


@dataclass
class Report:
    model: str
    device: str
    dtype: str
    relative_threshold: float
    checkpoint_threshold: float
    costs: TokenCosts
    collected: Collected
    thresholds: Sequence[float]
    target: float | None

    def __post_init__(self) -> None:
        scores = self.collected.scores
        self.rows = sweep(scores, self.thresholds, self.relative_threshold, self.costs)
        self.checkpoint_row = sweep(
            scores, [self.checkpoint_threshold], self.relative_threshold, self.costs
        )[0]
        self.found: SavingTarget | None = None
        if self.target is not None:
            self.found = threshold_for_saving(
                scores, self.target, self.relative_threshold, self.costs
            )

    def is_checkpoints(self, threshold: float) -> bool:
        return round(threshold, THRESHOLD_DECIMALS) == round(
            self.checkpoint_threshold, THRESHOLD_DECIMALS
        )

    def as_json(self) -> dict[str, Any]:
        collected = self.collected
        labels = iter(collected.image_labels)
        items = []
        for index, request in enumerate(collected.scores):
            start = 0
            for count in request.tiles_per_image:
                p0 = request.compress_prob[start : start + count].to(torch.float32).tolist()
                items.append(
                    {"image": next(labels), "request": index, "tiles": count, "compress_prob": p0}
                )
                start += count
        found = self.found
        return {
            "model": self.model,
            "device": self.device,
            "dtype": self.dtype,
            "requests": len(collected.scores),
            "images": len(collected.image_labels),
            "tiles": sum(request.num_tiles for request in collected.scores),
            "relative_threshold": self.relative_threshold,
            "checkpoint_threshold": self.checkpoint_threshold,
            "full_tokens_per_tile": self.costs.full,
            "compressed_tokens_per_tile": self.costs.compressed,
            "skipped": [{"source": s.source, "reason": s.reason} for s in collected.skipped],
            "thresholds": [self._row_json(row) for row in self.rows],
            "checkpoint": self._row_json(self.checkpoint_row),
            "target": None
            if found is None
            else {
                "saving": found.target,
                "threshold": found.threshold,
                "achieved_saving": found.saving,
                "next_threshold": found.next_threshold,
                "next_saving": found.next_saving,
                "request_field": REQUEST_FIELD,
                "checkpoint_setting": CHECKPOINT_SETTING,
            },
            "items": items,
        }

    def _row_json(self, row: ThresholdRow) -> dict[str, Any]:
        return {
            "threshold": row.threshold,
            "checkpoint": self.is_checkpoints(row.threshold),
            "compressed_tiles": row.compressed_tiles,
            "compressed_share": row.compressed_share,
            "tokens_per_image": {name: row.tokens_stat(name) for name in ("mean", "p50", "p90")},
            "total_tokens": row.total_tokens,
            "saving": row.saving,
            "tokens": list(row.tokens_per_image),
        }

    def as_text(self) -> str:
        collected = self.collected
        tiles = sum(request.num_tiles for request in collected.scores)
        lines = [
            f"{self.model} on {self.device} ({self.dtype}): {len(collected.image_labels)} images "
            f"in {len(collected.scores)} requests, {tiles} tiles; a tile is {self.costs.full} "
            f"visual tokens, {self.costs.compressed} compressed",
            f"relative threshold {self.relative_threshold} (the quantile of p0 over each "
            f"request's tiles a tile must be above), checkpoint's absolute threshold "
            f"{self.checkpoint_threshold}",
        ]
        for skipped in collected.skipped:
            lines.append(f"skipped {skipped.source}: {skipped.reason}")
        lines += [
            "",
            f"{REQUEST_FIELD:>13}  compressed  tokens/image: mean      p50      p90   saving",
        ]
        for row in self.rows:
            mark = "  <- checkpoint" if self.is_checkpoints(row.threshold) else ""
            lines.append(
                f"{row.threshold:>13.{THRESHOLD_DECIMALS}f}  {row.compressed_share:>9.1%}  "
                f"{row.tokens_stat('mean'):>18.1f} {row.tokens_stat('p50'):>8.0f} "
                f"{row.tokens_stat('p90'):>8.0f}  {row.saving:>6.1%}{mark}"
            )
        if self.found is not None:
            lines += ["", *self._target_text(self.found)]
        return "\n".join(lines)

    def _target_text(self, found: SavingTarget) -> list[str]:
        if found.threshold is None:
            return [
                f"no {REQUEST_FIELD} saves {found.target:.1%} on these images: the most is "
                f"{found.saving:.1%}, at 0 (the relative threshold {self.relative_threshold} "
                "leaves the lower-p0 tiles of each request alone); vir=max compresses every tile"
            ]
        value = f"{found.threshold:.{THRESHOLD_DECIMALS}f}"
        lines = [
            f"target saving {found.target:.1%}: {REQUEST_FIELD}={value} saves {found.saving:.1%}"
        ]
        if found.next_threshold is not None and found.next_saving is not None:
            lines[0] += (
                f" ({found.next_threshold:.{THRESHOLD_DECIMALS}f} would save "
                f"{found.next_saving:.1%})"
            )
        lines += [
            f'  per request: "{REQUEST_FIELD}": {value} in the request body '
            "(chat completions, responses, tokenize)",
            f"  as the default: {CHECKPOINT_SETTING}: {value} in the checkpoint's config.json",
        ]
        return lines


def write_plot(report: Report, path: Path) -> None:
    """Visual tokens per image (mean, p50, p90) against the threshold, as a PNG."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "dvd-vir-calibrate: --plot needs matplotlib (pip install 'dvd-serve[calibrate]')"
        ) from None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    grid = [step / PLOT_STEPS for step in range(PLOT_STEPS + 1)]
    rows = sweep(report.collected.scores, grid, report.relative_threshold, report.costs)
    figure, axes = pyplot.subplots(figsize=(8, 5))
    for name, style in (("mean", "-"), ("p50", "--"), ("p90", ":")):
        axes.plot(grid, [row.tokens_stat(name) for row in rows], style, label=name)
    uncompressed = rows[-1].uncompressed_tokens / max(len(rows[-1].tokens_per_image), 1)
    axes.axhline(uncompressed, color="black", linewidth=0.8, label="every tile kept (mean)")
    axes.axvline(
        report.checkpoint_threshold,
        color="grey",
        linestyle="-.",
        label=f"checkpoint ({report.checkpoint_threshold})",
    )
    if report.found is not None and report.found.threshold is not None:
        axes.axvline(
            report.found.threshold,
            color="red",
            linestyle="-.",
            label=f"{report.found.target:.0%} saving ({report.found.threshold})",
        )
    axes.set_xlabel(f"{REQUEST_FIELD} (absolute threshold)")
    axes.set_ylabel("visual tokens per image")
    axes.set_title(f"{report.model}: {len(report.collected.image_labels)} images")
    axes.set_xlim(0, 1)
    axes.set_ylim(bottom=0)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")
    pyplot.close(figure)


# ---- command line ---------------------------------------------------------------------------


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def _threshold_list(text: str) -> list[float]:
    return sorted({_fraction(part) for part in text.split(",") if part.strip()})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvd-vir-calibrate",
        description=(__doc__ or "").splitlines()[0].split(": ", 1)[1],
    )
    parser.add_argument(
        "inputs",
        type=Path,
        help="a folder of images (each one request) or a .jsonl file of chat requests",
    )
    parser.add_argument("--model", help="checkpoint: folder or hub id (default: the tiny model)")
    parser.add_argument("--revision", help="hub revision of --model")
    parser.add_argument("--cache-dir", help="where hub checkpoints and the tiny model are kept")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: the service's)")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="the ViT's compute dtype (default: the service's)",
    )
    parser.add_argument(
        "--thresholds",
        type=_threshold_list,
        help="comma-separated absolute thresholds to tabulate (default: 0 to 1 by 0.05 and "
        "the checkpoint's)",
    )
    parser.add_argument(
        "--target-saving",
        type=_fraction,
        help="find the highest threshold that saves this share of visual tokens (0.4: 40%%)",
    )
    parser.add_argument("--plot", type=Path, help="write tokens per image vs threshold here (PNG)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--concurrency", type=int, default=8, help="requests encoded at once (default: 8)"
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    return parser


def read_requests(inputs: Path) -> tuple[list[CalibrationRequest], list[Skipped]]:
    if inputs.is_dir():
        return folder_requests(inputs), []
    if inputs.is_file():
        return jsonl_requests(inputs)
    raise SystemExit(f"dvd-vir-calibrate: {inputs} is neither a folder nor a file")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.concurrency < 1:
        raise SystemExit("dvd-vir-calibrate: --concurrency must be at least 1")
    if args.progress is None:
        args.progress = sys.stderr.isatty()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    requests, skipped = read_requests(args.inputs)
    if not requests:
        reasons = "".join(f"\n  {s.source}: {s.reason}" for s in skipped)
        raise SystemExit(f"dvd-vir-calibrate: no images to calibrate in {args.inputs}{reasons}")
    report = asyncio.run(run_encoder(args, requests))
    report.collected.skipped[:0] = skipped
    if args.plot is not None:
        write_plot(report, args.plot)
    print(json.dumps(report.as_json()) if args.json else report.as_text())
    if not report.collected.scores:
        sys.exit(1)


if __name__ == "__main__":
    main()
