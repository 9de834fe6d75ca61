"""`dvd-vir-calibrate` on the tiny Flash checkpoint, against a brute-force count.

The tool encodes each request once and derives every threshold's tokens from the router's
scores. The brute force asks a real vision service to encode every request again at each
threshold (``vir_threshold``) and counts the visual tokens it sends back: the two must agree
image by image, and the threshold the tool suggests for a target saving must reach it on the
service while the next looser one does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from helpers import (
    REPO_ROOT,
    data_url,
    encode_image,
    gradient_image,
    noise_image,
    process_fixture,
    start_vision_server,
)
from PIL import Image

from checkpoints.tiny import TINY_FLASH_ABSOLUTE_THRESHOLD
from protos.dvd.v1 import vision_pb2, vision_pb2_grpc

# Every test runs the tool, which starts the vision pipeline's media worker processes.
pytestmark = pytest.mark.processes

THRESHOLDS = [0.3, 0.45, 0.6]
TARGET_SAVING = 0.2


def striped(width: int, height: int, seed: int) -> Image.Image:
    """A flat image with a band of dense stripes somewhere: some tiles rich, some plain."""
    rng = np.random.default_rng(seed)
    pixels = np.full((height, width, 3), int(rng.integers(0, 256)), dtype=np.uint8)
    start = int(rng.integers(0, width // 2))
    columns = np.arange(start, min(width, start + width // 3))
    pixels[:, columns] = np.where((columns // 2) % 2 == 0, 255, 0)[None, :, None]
    return Image.fromarray(pixels)


def generated_images(count: int) -> list[Image.Image]:
    """Sizes from one tile to about a dozen, noise, stripes and gradients."""
    rng = np.random.default_rng(7)
    makers = (noise_image, striped, gradient_image)
    images = []
    for index in range(count):
        width, height = int(rng.integers(200, 1800)), int(rng.integers(200, 1400))
        images.append(makers[index % 3](width, height, seed=index))
    return images


def run_calibrate(
    model: Path, inputs: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, float]:
    """The command as a user runs it (``env``: variables added to this one's); its result
    and wall time."""
    argv = [sys.executable, "-m", "vision_server.calibrate", str(inputs), "--model", str(model)]
    started = time.perf_counter()
    done = subprocess.run(
        [*argv, "--device", "cpu", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, **(env or {})},
    )
    return done, time.perf_counter() - started


def served_tiles(
    stub: vision_pb2_grpc.VisionServiceStub,
    images: Sequence[tuple[bytes, int]],
    threshold: float | None,
    max_tiles: int = 0,
) -> list[list[int]]:
    """One request to the vision service (``images``: bytes and per-image max_tiles): the
    visual tokens of each tile of each image, as sent (the rows received match them)."""
    request = vision_pb2.EncodeRequest(
        request_id="brute-force",
        images=[vision_pb2.Image(data=data, max_tiles=tiles) for data, tiles in images],
        options=vision_pb2.EncodeOptions(
            max_tiles=max_tiles, vir_mode=vision_pb2.VIR_MODE_AUTO, vir_threshold=threshold
        ),
    )
    tiles: list[list[int]] = []
    expected_bytes: list[int] = []
    received: list[int] = []
    for message in stub.Encode(request, timeout=120):
        if message.HasField("header"):
            header = message.header
            assert sum(header.tokens_per_tile) == header.num_visual_tokens
            assert set(header.tokens_per_tile) <= {64, 256}
            tiles.append(list(header.tokens_per_tile))
            expected_bytes.append(header.num_visual_tokens * header.hidden_size * 4)  # float32
            received.append(0)
        else:
            received[-1] += len(message.chunk.data)
    assert received == expected_bytes
    return tiles


def served_tokens(
    stub: vision_pb2_grpc.VisionServiceStub,
    images: Sequence[tuple[bytes, int]],
    threshold: float | None,
    max_tiles: int = 0,
) -> list[int]:
    """The visual tokens the vision service sent for each image of one request."""
    return [sum(tiles) for tiles in served_tiles(stub, images, threshold, max_tiles)]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("calibration-images")
    for index, image in enumerate(generated_images(16)):
        image.save(folder / f"image-{index:02d}.png")
    return folder


@process_fixture(scope="module")
def vision_stub(tiny_flash_models, log_dir) -> Iterator[vision_pb2_grpc.VisionServiceStub]:
    server, target = start_vision_server("calibrate-vision", tiny_flash_models["hf"], log_dir)
    try:
        channel = grpc.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
        with channel:
            yield vision_pb2_grpc.VisionServiceStub(channel)
    finally:
        server.stop()


@process_fixture(scope="module")
def folder_report(
    tiny_flash_models, image_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    plot = tmp_path_factory.mktemp("calibration-plot") / "tokens.png"
    done, wall_s = run_calibrate(
        tiny_flash_models["original"],
        image_folder,
        "--json",
        "--thresholds",
        ",".join(map(str, THRESHOLDS)),
        "--target-saving",
        str(TARGET_SAVING),
        "--plot",
        str(plot),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"dvd-vir-calibrate on {len(list(image_folder.iterdir()))} images: {wall_s:.1f} s")
    report = json.loads(done.stdout)
    report["plot_path"] = str(plot)
    return report


def folder_images(folder: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted(folder.iterdir())]


def test_counts_equal_the_service(folder_report, vision_stub, image_folder):
    images = folder_images(image_folder)
    assert folder_report["images"] == len(images) and not folder_report["skipped"]
    rows = folder_report["thresholds"]
    # The checkpoint's own threshold is a row of the table, marked.
    checkpoint = folder_report["checkpoint_threshold"]
    assert [row["threshold"] for row in rows] == sorted({*THRESHOLDS, checkpoint})
    assert [row["checkpoint"] for row in rows] == [r["threshold"] == checkpoint for r in rows]
    # The thresholds make a difference on these images (or the comparison would prove little).
    assert len({tuple(row["tokens"]) for row in rows}) >= 4
    tiles = folder_report["tiles"]
    for row in rows:
        per_tile = [served_tiles(vision_stub, [(data, 0)], row["threshold"])[0] for data in images]
        served = [sum(image) for image in per_tile]
        assert row["tokens"] == served, row["threshold"]
        assert [len(image) for image in per_tile] == [i["tiles"] for i in folder_report["items"]]
        compressed = sum(image.count(64) for image in per_tile)
        assert row["compressed_tiles"] == compressed
        assert row["compressed_share"] == pytest.approx(compressed / tiles)
        assert row["saving"] == pytest.approx(1 - sum(served) / (256 * tiles))
        stats = row["tokens_per_image"]
        assert stats["mean"] == pytest.approx(np.mean(served))
        assert stats["p50"] == pytest.approx(np.percentile(served, 50))
        assert stats["p90"] == pytest.approx(np.percentile(served, 90))
    # Without vir_threshold the service uses the checkpoint's: the marked row.
    default = [served_tokens(vision_stub, [(data, 0)], None)[0] for data in images]
    assert folder_report["checkpoint"]["tokens"] == default


def test_target_saving_is_reached_and_the_next_threshold_misses_it(
    folder_report, vision_stub, image_folder
):
    target = folder_report["target"]
    assert target["saving"] == TARGET_SAVING
    assert target["request_field"] == "vir_threshold"
    assert target["checkpoint_setting"] == "flash_absolute_threshold"
    threshold, looser = target["threshold"], target["next_threshold"]
    assert threshold is not None and looser == pytest.approx(threshold + 1e-4)
    images = folder_images(image_folder)
    full = 256 * folder_report["tiles"]

    def saving(at: float) -> float:
        return 1 - sum(served_tokens(vision_stub, [(data, 0)], at)[0] for data in images) / full

    reached, missed = saving(threshold), saving(looser)
    assert reached >= TARGET_SAVING > missed
    assert (reached, missed) == pytest.approx((target["achieved_saving"], target["next_saving"]))


def test_plot_is_a_png(folder_report):
    image = Image.open(folder_report["plot_path"])
    assert image.format == "PNG" and image.width > 200 and image.height > 200


def test_jsonl_requests_are_routed_as_the_service_routes_them(
    tiny_flash_models, vision_stub, tmp_path: Path
):
    images = generated_images(6)
    (tmp_path / "local.png").write_bytes(encode_image(images[2]))

    def user(*parts: dict[str, Any], **fields: Any) -> str:
        return json.dumps({"messages": [{"role": "user", "content": list(parts)}], **fields})

    def image_part(url: str, **extra: Any) -> dict[str, Any]:
        return {"type": "image_url", "image_url": {"url": url, **extra}}

    lines = [
        # Two images in one request: routed over the tiles of both.
        user(image_part(data_url(images[0])), image_part(data_url(images[1]))),
        # A file path, a one-tile image (detail low), and the request's max_tiles.
        user(
            image_part("local.png"),
            image_part(data_url(images[3]), detail="low"),
            image_part(data_url(images[4])),
            max_tiles=2,
        ),
        user({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}),
        user(image_part("https://example.com/a.png")),
        user(image_part(data_url(images[5])), {"type": "text", "text": "what is it?"}),
    ]
    (tmp_path / "requests.jsonl").write_text("\n".join(lines) + "\n")
    done, _ = run_calibrate(
        tiny_flash_models["hf"], tmp_path / "requests.jsonl", "--json", "--thresholds", "0.3,0.6"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert [s["source"] for s in report["skipped"]] == ["requests.jsonl:3", "requests.jsonl:4"]
    assert (report["requests"], report["images"]) == (3, 6)
    data = [encode_image(image) for image in images]
    requests = [
        ([(data[0], 0), (data[1], 0)], 0),
        ([(data[2], 0), (data[3], 1), (data[4], 0)], 2),
        ([(data[5], 0)], 0),
    ]
    for row in report["thresholds"]:
        served = [
            tokens
            for request, max_tiles in requests
            for tokens in served_tokens(vision_stub, request, row["threshold"], max_tiles)
        ]
        assert row["tokens"] == served, row["threshold"]
    # Routed together, not one by one: the first request's tiles, alone per image, would
    # give other counts at some threshold (else this test could not tell the two apart).
    alone = [
        served_tokens(vision_stub, [(data[i], 0)], row["threshold"])[0]
        for row in report["thresholds"]
        for i in (0, 1)
    ]
    together = [tokens for row in report["thresholds"] for tokens in row["tokens"][:2]]
    assert alone != together


def test_a_checkpoint_without_a_router_is_refused(tiny_models, image_folder):
    done, _ = run_calibrate(tiny_models["hf"], image_folder, "--json")
    assert done.returncode != 0
    assert "no Visual Resolution Router" in done.stderr
    assert not done.stdout


def test_text_report(tiny_flash_models, tmp_path: Path):
    for index, image in enumerate(generated_images(3)):
        image.save(tmp_path / f"{index}.png")
    done, _ = run_calibrate(tiny_flash_models["hf"], tmp_path, "--target-saving", "0.05")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    marked = [line for line in lines if line.endswith("<- checkpoint")]
    assert len(marked) == 1
    assert float(marked[0].split()[0]) == TINY_FLASH_ABSOLUTE_THRESHOLD
    assert len([line for line in lines if line.split()[:1] and _is_number(line.split()[0])]) == 21
    assert any(line.startswith("target saving 5.0%: vir_threshold=") for line in lines)
    assert any('"vir_threshold":' in line for line in lines)
    assert any("flash_absolute_threshold:" in line for line in lines)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
