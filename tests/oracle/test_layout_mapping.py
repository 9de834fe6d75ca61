"""The original <-> hf checkpoint layouts, checked against an independent reading of the mapping.

The tests' original-layout checkpoints all come from the project's converter
(``checkpoints.tiny.hf_state_dict_to_original``), so every other test checks that mapping only
against itself. Here the other side is written from transformers' documented conversion of an
OpenGVLab InternVL checkpoint (``convert_internvl_weights_to_hf.py``: its key table and its
split of InternViT's fused ``attn.qkv`` into q, k, v thirds), in this file and without DvD
code: ``original_to_hf`` renames an original-layout state dict to the names transformers writes
to disk. The project's original-layout file, renamed so, must equal transformers' own
``save_pretrained`` file of the same model tensor for tensor, bit for bit; and the config
entries that conversion carries over must agree.

No server; a few seconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# transformers' key table for the vision tower, in the order its conversion applies it (a
# pattern may rely on an earlier one: "attn.proj" before the catch-all "attn").
VISION_RENAMES: list[tuple[str, str]] = [
    (r"^vision_model\.", "vision_tower."),
    (r"\.layers\.", ".layer."),
    (r"\.class_embedding$", ".cls_token"),
    (r"\.position_embedding$", ".position_embeddings"),
    (r"\.patch_embedding\.", ".patch_embeddings.projection."),
    (r"\.ls(\d+)$", r".lambda_\1"),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
]
# The projector: OpenGVLab's nn.Sequential(LayerNorm, Linear, GELU, Linear).
PROJECTOR_RENAMES = {
    "mlp1.0.": "multi_modal_projector.layer_norm.",
    "mlp1.1.": "multi_modal_projector.linear_1.",
    "mlp1.3.": "multi_modal_projector.linear_2.",
}
# InternVL3.5-Flash's extra tensors keep OpenGVLab's names in both layouts (transformers has
# no Flash format).
FLASH_PREFIXES = ("mlp2.", "pooling_before_gating.", "gating.")


def original_to_hf(original: dict[str, torch.Tensor], vit_width: int) -> dict[str, torch.Tensor]:
    """OpenGVLab names -> the names transformers writes for InternVLForConditionalGeneration.

    The language model (``language_model.model.*``, ``language_model.lm_head``) keeps its
    names: Qwen3, Qwen3-MoE and GPT-OSS checkpoints are already transformers' causal LMs."""
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in original.items():
        if name.startswith("language_model.") or name.startswith(FLASH_PREFIXES):
            converted[name] = tensor
        elif name.startswith("mlp1."):
            prefix = next(p for p in PROJECTOR_RENAMES if name.startswith(p))
            converted[PROJECTOR_RENAMES[prefix] + name[len(prefix) :]] = tensor
        elif name.startswith("vision_model."):
            new = name
            for pattern, replacement in VISION_RENAMES:
                new = re.sub(pattern, replacement, new)
            if ".attention.qkv." in new:
                # [q; k; v] stacked along the output rows, each vit_width long.
                assert tensor.shape[0] == 3 * vit_width, (name, tensor.shape)
                for index, part in enumerate(("q_proj", "k_proj", "v_proj")):
                    rows = tensor[index * vit_width : (index + 1) * vit_width]
                    converted[new.replace(".qkv.", f".{part}.")] = rows
            else:
                converted[new] = tensor
        else:
            raise KeyError(f"not an OpenGVLab InternVL tensor name: {name}")
    return converted


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    assert not missing and not extra, f"missing {missing[:8]}, unexpected {extra[:8]}"
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name], tensor), f"{name} differs"


def assert_configs_agree(hf: dict, original: dict) -> None:
    """The entries transformers' conversion reads from an original config, and what it makes
    of them (``get_internvl_config``: llm_config -> text_config, qkv_bias -> attention_bias,
    qk_normalization -> use_qk_norm; the rest of the vision config by the same name)."""
    assert original["model_type"] == "internvl_chat" and hf["model_type"] == "internvl"
    assert original["downsample_ratio"] == hf["downsample_ratio"]
    # select_layer is the ViT layer whose output feeds the projector (-1: the last).
    assert original["select_layer"] == hf["vision_feature_layer"]
    vision_o, vision_h = original["vision_config"], hf["vision_config"]
    assert vision_o["qkv_bias"] == vision_h["attention_bias"]
    assert vision_o["qk_normalization"] == vision_h["use_qk_norm"]
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "norm_type",
        "layer_norm_eps",
        "hidden_act",
    ):
        assert vision_o[key] == vision_h[key], key
    assert [vision_o["image_size"]] * 2 == list(vision_h["image_size"])
    assert [vision_o["patch_size"]] * 2 == list(vision_h["patch_size"])
    assert original["force_image_size"] == vision_o["image_size"]
    text_o, text_h = original["llm_config"], hf["text_config"]
    assert text_o["model_type"] == text_h["model_type"]
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "rms_norm_eps",
        "head_dim",
        "eos_token_id",
    ):
        if key in text_h:
            assert text_o[key] == text_h[key], key
    experts = text_h.get("num_local_experts", text_h.get("num_experts"))
    if experts is not None:
        assert text_o.get("num_experts", text_o.get("num_local_experts")) == experts


CASES = [
    ("qwen3", False),
    ("qwen3_moe", False),
    ("gpt_oss", False),
    ("qwen3", True),
]


@pytest.mark.parametrize(("llm", "flash"), CASES, ids=[f"{m}{'-flash' * f}" for m, f in CASES])
def test_original_layout_is_transformers_layout_renamed(tmp_path: Path, llm: str, flash: bool):
    """The project's two layouts of one model: its original-layout file, renamed by the
    independent mapping, is transformers' own hf-layout file."""
    from checkpoints.tiny import write_tiny_checkpoint

    paths = {
        layout: write_tiny_checkpoint(
            tmp_path / f"{llm}-{layout}", seed=3, layout=layout, llm=llm, flash=flash
        )
        for layout in ("hf", "original")
    }
    hf_config = json.loads((paths["hf"] / "config.json").read_text())
    original_config = json.loads((paths["original"] / "config.json").read_text())
    assert_configs_agree(hf_config, original_config)
    hf = load_file(str(paths["hf"] / "model.safetensors"))
    original = load_file(str(paths["original"] / "model.safetensors"))
    vit_width = original_config["vision_config"]["hidden_size"]
    assert_same_tensors(original_to_hf(original, vit_width), hf)
    # The check is not blind: q, k and v of a layer differ, and a swap would be caught.
    q = hf["vision_tower.encoder.layer.0.attention.q_proj.weight"]
    k = hf["vision_tower.encoder.layer.0.attention.k_proj.weight"]
    assert not torch.equal(q, k)


def test_internvit_6b_variant_maps_its_qk_norms(tmp_path: Path):
    """InternViT-6B's vision half (RMSNorm, q/k norm, no qkv bias), which the tiny checkpoints
    do not have: a small transformers model of that shape, written by transformers itself, and
    converted by the project's converter from the model's own state dict."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from checkpoints.tiny import hf_state_dict_to_original

    config = InternVLConfig(
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=448,
            patch_size=14,
            attention_bias=False,
            use_qk_norm=True,
            norm_type="rms_norm",
        ),
        text_config=dict(
            model_type="qwen3",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            vocab_size=300,
            tie_word_embeddings=False,
        ),
        image_token_id=299,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():  # no parameter left at a constant init (ones, zeros)
        for param in model.parameters():
            param.copy_(torch.randn_like(param))
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    written = load_file(str(tmp_path / "model.safetensors"))
    assert any(".attention.q_norm." in name for name in written)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    original = hf_state_dict_to_original(state, text_model_type="qwen3")
    assert "vision_model.encoder.layers.0.attn.q_norm.weight" in original
    assert_same_tensors(original_to_hf(original, vit_width=32), written)
