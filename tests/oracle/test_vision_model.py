"""Our InternViT + projector against transformers' InternVL for other InternViT variants.

The served tiny model is InternViT-300M-shaped (LayerNorm, qkv bias, last layer). These
in-process checks cover the other switches InternVL checkpoints use: InternViT-6B's RMSNorm
and q/k normalisation without qkv bias, and a feature layer other than the last.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from checkpoints.spec import Layout, load_checkpoint_spec
from checkpoints.tiny import (
    _reinitialise,
    hf_config_to_original,
    hf_state_dict_to_original,
)
from vision_server.model.encoder import VisionEncoder

VARIANTS = {
    "internvit-6b-style": dict(norm_type="rms_norm", use_qk_norm=True, attention_bias=False),
    "penultimate-layer": dict(norm_type="layer_norm", use_qk_norm=False, attention_bias=True),
}


def build_reference(variant: str, feature_layer: int):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = InternVLConfig(
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=448,
            patch_size=14,
            layer_norm_eps=1e-6,
            use_mean_pooling=True,
            **VARIANTS[variant],
        ),
        text_config=dict(
            model_type="qwen3",
            vocab_size=64,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=24,
            tie_word_embeddings=False,
        ),
        image_token_id=63,
        vision_feature_layer=feature_layer,
        tie_word_embeddings=False,
    )
    model = InternVLForConditionalGeneration(config).eval()
    _reinitialise(model, seed=7)
    return model


@pytest.mark.parametrize(
    ("variant", "feature_layer"), [("internvit-6b-style", -1), ("penultimate-layer", -2)]
)
@pytest.mark.parametrize("layout", [Layout.HF, Layout.ORIGINAL])
def test_variant_matches_transformers(tmp_path, variant, feature_layer, layout):
    reference = build_reference(variant, feature_layer)
    if layout is Layout.HF:
        reference.save_pretrained(str(tmp_path))
    else:
        state = {k: v.contiguous() for k, v in reference.state_dict().items()}
        save_file(hf_state_dict_to_original(state), str(tmp_path / "model.safetensors"))
        config = hf_config_to_original(json.loads(reference.config.to_json_string()))
        (tmp_path / "config.json").write_text(json.dumps(config))

    spec = load_checkpoint_spec(tmp_path)
    assert spec.layout is layout
    assert spec.vision.layers_to_run == (3 if feature_layer == -1 else 2)
    encoder = VisionEncoder.from_checkpoint(spec, "cpu", torch.float32)
    tiles = torch.randn(3, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.model.get_image_features(pixel_values=tiles).pooler_output
        got = encoder(tiles).full
    assert got.shape == expected.shape == (3, 256, 48)
    assert (got - expected).abs().max().item() <= 1e-4
    assert expected.std() > 0.1


@pytest.mark.parametrize("size", [(448, 448), (700, 300), (333, 777)], ids=str)
def test_uint8_tiles_normalised_by_the_encoder_equal_transformers_bitwise(tiny_models, size):
    """Tiles travel as uint8 and are normalised on the encoder's device; in float32 the result
    is bit-for-bit what transformers' image processor gives."""
    from helpers import encode_image, noise_image
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil,
    )

    from vision_server.model.encoder import TileNormaliser
    from vision_server.preprocess import ImageLimits, TilingOptions, prepare_image

    image = noise_image(*size, seed=size[0] + size[1])
    processor = GotOcr2ImageProcessorPil.from_pretrained(str(tiny_models["hf"]))
    expected = processor(image, crop_to_patches=True, return_tensors="pt")["pixel_values"]
    spec = load_checkpoint_spec(tiny_models["hf"])
    prepared = prepare_image(encode_image(image), ImageLimits(), TilingOptions())
    assert prepared.tiles.dtype == torch.uint8
    normalise = TileNormaliser(spec.image_mean, spec.image_std, "cpu")
    got = normalise(prepared.tiles, torch.float32)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_cuda_graph_batch_sizes_cover_every_pass_with_little_padding():
    from vision_server.cuda_graphs import graph_batch_sizes

    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 3, 4, 5, 6]
    assert graph_batch_sizes(32) == [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 28, 32]
    assert graph_batch_sizes(30) == [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 28, 30]
    for cap in (1, 6, 13, 30, 32, 64):
        sizes = graph_batch_sizes(cap)
        assert sizes[-1] == cap
        for tiles in range(1, cap + 1):  # the smallest size that holds a pass pads <= 3 tiles
            assert 0 <= min(s for s in sizes if s >= tiles) - tiles <= 3
