"""The vision engine on a CUDA device: bf16 against transformers in bf16, the asynchronous data
path (pinned buffers, side streams, uint8 tiles normalised on the device), routing under
batching, a lone image taken in parts, and the in-process encoder's hold on its peak memory.
Only the vision half's packages are imported (no vLLM, no FastAPI), so these run on a GPU host
that has nothing else. Skipped without CUDA; `docs/benchmarks/gpu.sh` runs them with the GPU
benchmarks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from helpers import encode_image, noise_image

from protos.options import VirMode

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SIZES = [(448, 448), (700, 300), (896, 896), (333, 777)]


def relative_l2(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.float().cpu(), expected.float().cpu()
    return float((got - expected).norm() / expected.norm())


def gpu_pipeline(model: Path, **overrides):
    from vision_server.server import build_pipeline
    from vision_server.settings import VisionSettings

    # No embedding cache: these tests encode the same images again on purpose.
    overrides.setdefault("embedding_cache_mb", 0)
    settings = VisionSettings(model=str(model), device="cuda", **overrides)  # type: ignore[call-arg]
    pipeline, _ = build_pipeline(settings)
    assert pipeline.engine.dtype == torch.bfloat16
    return pipeline


def encode_all(pipeline, requests: list[list[bytes]], vir: VirMode = VirMode.AUTO):
    """Run ``requests`` concurrently through the pipeline (a fresh event loop)."""
    from protos.messages import EncodeCall, EncodeOptions, ImageInput
    from vision_server.batching import TileBatcher

    engine = pipeline.engine
    engine.batcher = TileBatcher(
        engine.run_pass,
        max_batch_tiles=pipeline.settings.max_batch_tiles,
        max_wait_ms=20,
        max_queued_tiles=4096,
        max_queued_bytes=1 << 32,
    )

    async def one(images: list[bytes]):
        call = EncodeCall([ImageInput(data) for data in images], (), EncodeOptions(vir=vir))
        return [encoded async for encoded in pipeline.encode(call)]

    async def run():
        engine.start()
        try:
            return await asyncio.gather(*(one(images) for images in requests))
        finally:
            await engine.batcher.stop()

    return asyncio.run(run())


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_bf16_embeddings_match_transformers_in_bf16(tiny_models, size):
    from transformers import InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil,
    )

    path = tiny_models["hf"]
    image = noise_image(*size, seed=size[0] * 3 + size[1])
    processor = GotOcr2ImageProcessorPil.from_pretrained(str(path))
    pixel_values = processor(image, crop_to_patches=True, return_tensors="pt")["pixel_values"]
    reference = InternVLForConditionalGeneration.from_pretrained(str(path), dtype=torch.bfloat16)
    reference = reference.to("cuda").eval()
    with torch.no_grad():
        expected = reference.model.get_image_features(
            pixel_values=pixel_values.to("cuda", torch.bfloat16)
        ).pooler_output
    expected = expected.reshape(-1, expected.shape[-1])  # [tiles * 256, hidden]

    pipeline = gpu_pipeline(path)
    try:
        ((encoded,),) = encode_all(pipeline, [[encode_image(image)]])
    finally:
        pipeline.close()
    assert encoded.embeddings.dtype == torch.bfloat16
    assert encoded.embeddings.device.type == "cpu"
    assert encoded.embeddings.shape == expected.shape
    assert relative_l2(encoded.embeddings, expected) <= 2e-2
    assert expected.float().std() > 0.1


def test_async_data_path_equals_a_plain_forward(tiny_flash_models):
    """Pinned staging, the copy-in/compute/copy-out streams and the row selection give what a
    plain synchronous forward of the same tiles gives, bit for bit."""
    from protos.messages import RowSelection
    from vision_server.batching import PassSlice
    from vision_server.preprocess import ImageLimits, TilingOptions, prepare_image

    pipeline = gpu_pipeline(tiny_flash_models["hf"])
    engine = pipeline.engine
    images = [
        prepare_image(encode_image(noise_image(w, h, seed=i)), ImageLimits(), TilingOptions())
        for i, (w, h) in enumerate(SIZES)
    ]
    wants = [RowSelection.FULL, RowSelection.COMPRESSED, RowSelection.ROUTED, RowSelection.FULL]
    slices = [PassSlice(image.tiles, want) for image, want in zip(images, wants, strict=True)]
    try:
        # Two passes launched back to back (the second is copied in while the first runs).
        first = engine.run_pass(slices)
        second = engine.run_pass(slices[::-1])
        outputs, reversed_outputs = first.wait(), second.wait()
        assert engine.cuda_graphs  # the service's default on CUDA
        with torch.inference_mode():
            tiles = torch.cat([image.tiles for image in images]).to("cuda")
            plain = engine.data_path.graphs(tiles)  # the same graph replay, on the default stream
        torch.cuda.synchronize()
    finally:
        pipeline.close()
    start = 0
    for image, want, out in zip(images, wants, outputs, strict=True):
        end = start + image.grid.num_tiles
        if want is RowSelection.FULL:
            assert out.rows is not None and out.rows.is_pinned()
            assert torch.equal(out.rows, plain.full[start:end].cpu())
        elif want is RowSelection.COMPRESSED:
            assert out.rows is not None
            assert torch.equal(out.rows, plain.compressed[start:end].cpu())
        else:
            assert out.compress_prob is not None and out.compress_prob.dtype == torch.bfloat16
            assert torch.equal(out.compress_prob, plain.compress_prob[start:end].cpu())
            assert out.full is not None and out.full.device.type == "cuda"
        start = end
    for out, back in zip(outputs, reversed_outputs[::-1], strict=True):
        if out.rows is not None:
            assert back.rows is not None and back.rows.shape == out.rows.shape


def test_cuda_graphs_give_the_eager_forward(tiny_flash_models):
    """A replayed graph (padded to its captured size) gives what the eager forward of the same
    tiles gives, to bf16 rounding; a pass over the largest size runs eagerly."""
    from vision_server.cuda_graphs import graph_batch_sizes

    pipeline = gpu_pipeline(tiny_flash_models["hf"], max_batch_tiles=16)
    engine = pipeline.engine
    graphs = engine.data_path.graphs
    assert graphs is not None and graphs.batch_sizes == graph_batch_sizes(16)
    assert graphs.batch_sizes == [1, 2, 3, 4, 5, 6, 7, 8, 12, 16]
    size = pipeline.spec.vision.image_size
    generator = torch.Generator().manual_seed(5)
    try:
        with torch.inference_mode():
            for count in (1, 3, 5, 9, 16, 20):
                tiles = torch.randint(0, 256, (count, 3, size, size), generator=generator)
                tiles = tiles.to(torch.uint8).to("cuda")
                graphed, eager = graphs(tiles), engine.data_path.eager_forward(tiles)
                for got, expected in (
                    (graphed.full, eager.full),
                    (graphed.compressed, eager.compressed),
                    (graphed.compress_prob, eager.compress_prob),
                ):
                    assert got is not None and expected is not None
                    assert got.shape == expected.shape and got.shape[0] == count
                    assert relative_l2(got, expected) <= 1e-2
                if count > graphs.max_batch:
                    assert graphs.graph_size(count) is None
    finally:
        pipeline.close()


def test_concurrent_requests_get_their_own_rows(tiny_flash_models):
    """Many requests at once through the asynchronous path: every image's rows are its own
    (batching may change bf16 rounding, never which rows an image gets)."""
    pipeline = gpu_pipeline(tiny_flash_models["hf"], max_batch_tiles=16)
    payloads = [encode_image(noise_image(300 + 97 * i, 200 + 61 * i, seed=i)) for i in range(12)]
    try:
        alone = [encode_all(pipeline, [[p]], VirMode.OFF)[0][0] for p in payloads]
        together = encode_all(pipeline, [[p] for p in payloads] * 3, VirMode.OFF)
    finally:
        pipeline.close()
    for index, (encoded,) in enumerate(together):
        solo = alone[index % len(payloads)]
        assert encoded.embeddings.shape == solo.embeddings.shape
        assert relative_l2(encoded.embeddings, solo.embeddings) <= 1e-2


def test_routing_decisions_are_stable_under_batching(tiny_flash_models):
    pipeline = gpu_pipeline(tiny_flash_models["hf"], max_batch_tiles=32)
    probes = [
        [encode_image(noise_image(1344, 448, seed=71))],
        [encode_image(noise_image(900, 600, seed=72)), encode_image(noise_image(448, 448, 73))],
    ]
    others = [[encode_image(noise_image(448 * (1 + i % 3), 448, seed=400 + i))] for i in range(10)]
    try:
        alone = [encode_all(pipeline, [probe])[0] for probe in probes]
        busy = encode_all(pipeline, [*others[:5], probes[0], *others[5:], probes[1]])
    finally:
        pipeline.close()
    busy_probes = [busy[5], busy[-1]]
    for solo, shared in zip(alone, busy_probes, strict=True):
        assert [e.tokens_per_tile for e in solo] == [e.tokens_per_tile for e in shared]
    decisions = [t for request in alone for e in request for t in e.tokens_per_tile]
    assert 64 in decisions and 256 in decisions  # the router really decided something


def test_a_lone_image_in_parts_gets_its_rows(tiny_flash_models):
    """On CUDA an idle encoder takes each image in parts (grid, then thumbnail: two passes, two
    graphs): the same router decisions and rows as in one piece, to bf16 rounding."""
    pipeline = gpu_pipeline(tiny_flash_models["hf"], max_batch_tiles=32)
    assert pipeline.overlap_preparation  # auto: on with CUDA
    images = [[encode_image(noise_image(w, h, seed=80 + i))] for i, (w, h) in enumerate(SIZES)]
    try:
        in_parts = [encode_all(pipeline, [image])[0][0] for image in images]
        pipeline.overlap_preparation = False
        in_one = [encode_all(pipeline, [image])[0][0] for image in images]
    finally:
        pipeline.close()
    for parts, one in zip(in_parts, in_one, strict=True):
        assert parts.tokens_per_tile == one.tokens_per_tile
        assert relative_l2(parts.embeddings, one.embeddings) <= 1e-2


def test_in_process_encoder_holds_its_peak_on_the_gpu(tiny_models, tmp_path):
    """On CUDA the encoder runs its largest batch at start-up and keeps that memory: a second
    full batch allocates nothing new, so vLLM cannot take memory the ViT will need."""
    from llm_server.vision.inprocess import InProcessVisualEncoder

    async def scenario() -> None:
        encoder = await InProcessVisualEncoder.start(tiny_models["hf"], tmp_path, "cuda", 16)
        try:
            assert encoder.gpu_bytes is not None
            device = encoder.pipeline.engine.device
            weights = sum(
                p.numel() * p.element_size() for p in encoder.pipeline.engine.encoder.parameters()
            )
            assert encoder.gpu_bytes > weights
            size = encoder.pipeline.spec.vision.image_size
            with torch.inference_mode():
                tiles = torch.zeros(16, 3, size, size, device=device)
                encoder.pipeline.engine.encoder(tiles.to(encoder.pipeline.engine.dtype))
            torch.cuda.synchronize(device)
            assert torch.cuda.memory_reserved(device) <= encoder.gpu_bytes + 16 * 3 * size**2 * 4
            share = encoder.gpu_share(tiny_models["hf"], 0.5)
            assert 0 < share.llm_utilization() < 0.5
        finally:
            await encoder.close()

    asyncio.run(scenario())
