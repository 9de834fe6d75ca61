"""`dvd-tiny-model`: write a tiny, InternVL3.5-shaped checkpoint with random weights.

The geometry is real (448x448 tiles, patch 14, 1024 patches per tile, pixel shuffle 0.5 ->
256 tokens per tile); only widths and depths are tiny, so the whole product runs on a laptop
CPU and tests can compare it with transformers' own InternVL. The language model is one of the
InternVL3.5 family's backbones (``--llm``): dense Qwen3, Qwen3-MoE (routed experts) or GPT-OSS
(routed experts, attention sinks, sliding-window layers, harmony chat format).

Two layouts hold the same weights:
- ``hf``: transformers' native ``InternVLForConditionalGeneration`` format, written by
  transformers itself (``save_pretrained``).
- ``original``: OpenGVLab's ``InternVLChatModel`` format (``vision_model.*``, ``mlp1.*``,
  ``language_model.*``; ``llm_config``/``vision_config``; no code shipped).

Initialisation is chosen so that greedy decoding is a sharp test: the language model's
matrices have a large spread, so its greedy outputs vary from token to token and depend on the
image, with clear logit margins.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from checkpoints import tokenizer as tiny_tokenizer

logger = logging.getLogger(__name__)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# Widths and depths per preset; everything else keeps InternVL3.5's real geometry.
# "tiny": the test and default model. "bench": InternVL3.5-1B (InternViT-300M + Qwen3-0.6B)
# scaled down 4x in width, with depths chosen so that a tile's ViT work stays about 3x the
# LLM's prefill work for its 256 tokens, as in the real model (see docs/benchmarks.md).
# "vision-300m" and "vision-6b": real vision halves at full size, for benchmarking the vision
# service (dvd-bench-vision) on a GPU: InternVL3.5-1B's InternViT-300M (LLM width 1024), and
# InternViT-6B as InternVL3.5-38B uses it (RMSNorm, q/k norm, no qkv bias; LLM width 5120).
# Their language model is a single layer of the real width: the vision service needs only
# the width.
_ONE_LLM_LAYER = dict(
    intermediate_size=1024,
    num_hidden_layers=1,
    num_attention_heads=8,
    num_key_value_heads=8,
    head_dim=128,
)
PRESETS: dict[str, tuple[dict[str, Any], dict[str, int]]] = {
    "tiny": (
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
        dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
        ),
    ),
    "bench": (
        dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024),
        dict(
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=13,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
        ),
    ),
    "vision-300m": (
        dict(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
        ),
        dict(hidden_size=1024, **_ONE_LLM_LAYER),
    ),
    "vision-6b": (
        dict(
            hidden_size=3200,
            num_hidden_layers=45,
            num_attention_heads=25,
            intermediate_size=12800,
            norm_type="rms_norm",
            use_qk_norm=True,
            attention_bias=False,
        ),
        dict(hidden_size=5120, **_ONE_LLM_LAYER),
    ),
}
MAX_CONTEXT = 8192


# ---------------------------------------------------------------------------------------------
# Language backbones: the text-config keys that make a preset's widths into each architecture.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backbone:
    """One language-model family of InternVL3.5, at tiny scale."""

    architecture: str  # the causal-LM class OpenGVLab's llm_config names
    chat_format: tiny_tokenizer.ChatFormat
    # Keys on top of the preset's widths; "expert_width" is replaced by the expert MLP width.
    text_config: dict[str, Any]


# Real values wherever they are not sizes: routing (softmax top-k, renormalised), GPT-OSS's
# sliding window of 128 tokens on every other layer, its YaRN rope and clamped SwiGLU.
# Expert counts are scaled down (Qwen3-30B-A3B: 128 experts, top 8; GPT-OSS-20B: 32, top 4).
BACKBONES: dict[str, Backbone] = {
    "qwen3": Backbone(
        "Qwen3ForCausalLM",
        tiny_tokenizer.CHATML,
        dict(
            model_type="qwen3",
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        ),
    ),
    "qwen3_moe": Backbone(
        "Qwen3MoeForCausalLM",
        tiny_tokenizer.CHATML,
        dict(
            model_type="qwen3_moe",
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size="expert_width",
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
    ),
    "gpt_oss": Backbone(
        "GptOssForCausalLM",
        tiny_tokenizer.HARMONY,
        dict(
            model_type="gpt_oss",
            rms_norm_eps=1e-5,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150_000.0,
                "factor": 32.0,
                "original_max_position_embeddings": 4096,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
            },
            num_local_experts=8,
            num_experts_per_tok=2,
            intermediate_size="expert_width",
            sliding_window=128,
            attention_bias=True,
            swiglu_limit=7.0,
            # YaRN's factor is this over original_max_position_embeddings, as in GPT-OSS.
            max_position_embeddings=131_072,
        ),
    ),
}


def backbone_text_config(llm: str, text_dims: dict[str, int]) -> dict[str, Any]:
    """A preset's language-model widths as backbone ``llm``: routed experts are a quarter of
    the dense MLP width each, so that top-2 routing costs about half the dense MLP."""
    if llm not in BACKBONES:
        raise ValueError(f"unknown language backbone {llm!r}; expected one of {sorted(BACKBONES)}")
    expert_width = text_dims["intermediate_size"] // 4
    config: dict[str, Any] = dict(text_dims, max_position_embeddings=MAX_CONTEXT)
    for key, value in BACKBONES[llm].text_config.items():
        config[key] = expert_width if value == "expert_width" else value
    return config


def build_hf_model(seed: int, preset: str = "tiny", llm: str = "qwen3") -> Any:
    """Build a transformers InternVLForConditionalGeneration of one of the ``PRESETS``, with
    language backbone ``llm`` (one of ``BACKBONES``)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    vision_dims, text_dims = PRESETS[preset]
    text_config = backbone_text_config(llm, text_dims)
    chat_format = BACKBONES[llm].chat_format
    tokenizer = tiny_tokenizer.train_tokenizer(chat_format)
    vocab = tokenizer.get_vocab()
    end_of_text = vocab[tiny_tokenizer.END_OF_TEXT]
    eos = vocab[chat_format.eos_token]
    config = InternVLConfig(
        vision_config=dict(
            image_size=448,
            patch_size=14,
            attention_bias=True,
            use_qk_norm=False,
            norm_type="layer_norm",
            layer_norm_eps=1e-6,
            hidden_act="gelu",
            use_mean_pooling=True,
        )
        | vision_dims,
        text_config=dict(
            **text_config,
            vocab_size=tokenizer.get_vocab_size(),
            tie_word_embeddings=False,
            bos_token_id=end_of_text,
            eos_token_id=eos,
            pad_token_id=end_of_text,
        ),
        image_token_id=vocab[tiny_tokenizer.IMG_CONTEXT],
        image_seq_length=256,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    _reinitialise(model, seed)
    if chat_format is tiny_tokenizer.HARMONY:
        _plant_harmony_header(model, vocab)
    return model, tokenizer


def _reinitialise(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter a seeded, non-trivial value.

    Nothing is left at 0 or 1 (so a mis-mapped bias, norm or layer scale shows up in the
    reference tests), and the language model gets a wide spread (so greedy decoding is varied
    and has clear margins instead of repeating one token).
    """
    generator = torch.Generator().manual_seed(seed)
    has_sinks = any(name.endswith("self_attn.sinks") for name, _ in model.named_parameters())
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            is_text = "language_model" in name or name.startswith("lm_head")
            if name.endswith("lm_head.weight") or name.endswith("embed_tokens.weight"):
                std = 1.0
            elif is_text and ("q_norm" in name or "k_norm" in name):
                # Qwen3 normalises q and k per head, which caps attention logits near N(0, 1):
                # with hundreds of image tokens, attention turns into a plain average and greedy
                # decoding repeats one token. Large qk-norm gains make attention sharp.
                param.copy_(3.0 * (1.0 + 0.1 * torch.randn(param.shape, generator=generator)))
                continue
            elif is_text and name.endswith("self_attn.sinks"):
                # GPT-OSS's per-head sink logits: large enough to take a real share of the
                # attention, so that serving them wrongly (or not at all) changes the answer.
                param.copy_(8.0 + 3.0 * torch.randn(param.shape, generator=generator))
                continue
            elif is_text and has_sinks and (".q_proj." in name or ".k_proj." in name):
                # GPT-OSS has no q/k norm: with the spread below its attention logits would
                # reach 30-60, and nothing but the top key (no sink, no window edge) would
                # count. This spread keeps the logits at a few units.
                std = 0.15
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
                continue
            elif "lambda_" in name:
                param.copy_(0.5 + 0.5 * torch.rand(param.shape, generator=generator))
                continue
            elif is_text:
                std = 0.25
            elif "multi_modal_projector" in name:
                std = 0.2
            elif "position_embeddings" in name or "cls_token" in name:
                std = 0.5
            else:
                std = 0.08
            param.copy_(std * torch.randn(param.shape, generator=generator))


# A harmony model opens its answer with a header: after the prompt's "<|start|>assistant" it
# writes "<|channel|>final<|message|>", then the answer. Random weights would not, and the
# harmony parsing would never see a real answer; so the tiny GPT-OSS model has the header
# planted as a chain of "this token -> that next token" rules.
HARMONY_HEADER_CHAIN = [
    ("assistant", "<|channel|>"),
    ("<|channel|>", "final"),
    ("final", "<|message|>"),
]
_HEADER_TRIGGER = 64.0  # the trigger token's value on its reserved dimension
_HEADER_GAIN = 200.0  # the next token's output weight on it: a margin of hundreds of logits


def _plant_harmony_header(model: Any, vocab: dict[str, int]) -> None:
    """One hidden dimension per rule (the last ones), reserved: only the rule's trigger token
    has a value there, no layer reads or writes it, so it reaches the final norm unchanged
    and the output matrix maps it to the rule's next token alone. Everything else in the
    model is what ``_reinitialise`` drew, minus those dimensions; transformers and vLLM see
    ordinary GPT-OSS weights."""
    text_model = model.model.language_model
    embed = text_model.embed_tokens.weight  # [vocab, hidden]
    head = model.lm_head.weight  # [vocab, hidden]
    hidden = embed.shape[1]
    dims = list(range(hidden - len(HARMONY_HEADER_CHAIN), hidden))
    with torch.no_grad():
        embed[:, dims] = 0.0
        head[:, dims] = 0.0
        for layer in text_model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            for reads in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.router):
                reads.weight[:, dims] = 0.0
            attention.o_proj.weight[dims, :] = 0.0
            attention.o_proj.bias[dims] = 0.0
            mlp.experts.gate_up_proj[:, dims, :] = 0.0  # [experts, hidden, 2·width]
            mlp.experts.down_proj[:, :, dims] = 0.0  # [experts, width, hidden]
            mlp.experts.down_proj_bias[:, dims] = 0.0
        for dim, (trigger, following) in zip(dims, HARMONY_HEADER_CHAIN, strict=True):
            embed[vocab[trigger], dim] = _HEADER_TRIGGER
            head[vocab[following], dim] = _HEADER_GAIN


# ---------------------------------------------------------------------------------------------
# InternVL3.5-Flash: the Visual Resolution Router and the 64-token projector.
# ---------------------------------------------------------------------------------------------

# Router thresholds of the tiny Flash checkpoint: about half of an image's tiles are compressed.
TINY_FLASH_RELATIVE_THRESHOLD = 0.5
TINY_FLASH_ABSOLUTE_THRESHOLD = 0.05


def flash_tensor_shapes(vit_width: int, llm_width: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the Flash tensors, as OpenGVLab's checkpoints store them.

    ``mlp2``: LayerNorm, Linear(16·vit → 2·llm), GELU, Dropout, Linear(2·llm → 2·llm), GELU,
    Dropout, Linear(2·llm → llm). ``pooling_before_gating``: a query token and four
    ``nn.MultiheadAttention`` + LayerNorm stages. ``gating``: four residual blocks (Linear 4x,
    GELU, Dropout, Linear back, Dropout, LayerNorm) and LayerNorm + Linear(→ 2).
    """
    v, wide, out = vit_width, 2 * llm_width, llm_width
    shapes: dict[str, tuple[int, ...]] = {
        "mlp2.0.weight": (16 * v,),
        "mlp2.0.bias": (16 * v,),
        "mlp2.1.weight": (wide, 16 * v),
        "mlp2.1.bias": (wide,),
        "mlp2.4.weight": (wide, wide),
        "mlp2.4.bias": (wide,),
        "mlp2.7.weight": (out, wide),
        "mlp2.7.bias": (out,),
        "pooling_before_gating.query_token": (1, v),
        "gating.gate.0.weight": (v,),
        "gating.gate.0.bias": (v,),
        "gating.gate.1.weight": (2, v),
        "gating.gate.1.bias": (2,),
    }
    for i in range(1, 5):
        prefix = f"pooling_before_gating.attn{i}"
        shapes |= {
            f"{prefix}.in_proj_weight": (3 * v, v),
            f"{prefix}.in_proj_bias": (3 * v,),
            f"{prefix}.out_proj.weight": (v, v),
            f"{prefix}.out_proj.bias": (v,),
            f"pooling_before_gating.norm{i}.weight": (v,),
            f"pooling_before_gating.norm{i}.bias": (v,),
        }
        block = f"gating.block{i}"
        shapes |= {
            f"{block}.0.weight": (4 * v, v),
            f"{block}.0.bias": (4 * v,),
            f"{block}.3.weight": (v, 4 * v),
            f"{block}.3.bias": (v,),
            f"{block}.5.weight": (v,),
            f"{block}.5.bias": (v,),
        }
    return shapes


def build_flash_tensors(seed: int, vit_width: int, llm_width: int) -> dict[str, torch.Tensor]:
    """Seeded Flash tensors; their own generator leaves the shared weights untouched, so a
    Flash checkpoint and a plain one of the same seed differ only by these tensors."""
    generator = torch.Generator().manual_seed(seed * 7919 + 17)
    tensors = {}
    for name, shape in sorted(flash_tensor_shapes(vit_width, llm_width).items()):
        if name.endswith("bias"):
            value = 0.05 * torch.randn(shape, generator=generator)
        elif len(shape) == 1:  # LayerNorm gains
            value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name == "gating.gate.1.weight":
            value = 0.15 * torch.randn(shape, generator=generator)  # p0 spread, not saturated
        else:
            value = torch.randn(shape, generator=generator) / shape[-1] ** 0.5
        tensors[name] = value
    return tensors


# ---------------------------------------------------------------------------------------------
# The original (OpenGVLab) layout: key names and config schema.
# ---------------------------------------------------------------------------------------------

_HF_TO_ORIGINAL_VISION_PARTS = [
    ("embeddings.cls_token", "embeddings.class_embedding"),
    ("embeddings.position_embeddings", "embeddings.position_embedding"),
    ("embeddings.patch_embeddings.projection.", "embeddings.patch_embedding."),
    ("attention.projection_layer.", "attn.proj."),
    ("attention.q_norm.", "attn.q_norm."),
    ("attention.k_norm.", "attn.k_norm."),
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("lambda_1", "ls1"),
    ("lambda_2", "ls2"),
]
_HF_TO_ORIGINAL_PROJECTOR = {
    "layer_norm": "mlp1.0",
    "linear_1": "mlp1.1",
    "linear_2": "mlp1.3",
}


def _unfuse_experts(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers' in-memory Qwen3-MoE experts as the checkpoints store them, one module per
    expert: ``experts.gate_up_proj`` [experts, 2·width, hidden] -> ``experts.E.gate_proj.weight``
    and ``experts.E.up_proj.weight`` [width, hidden] each; ``experts.down_proj``
    [experts, hidden, width] -> ``experts.E.down_proj.weight``."""
    prefix, _, leaf = name.rpartition(".")
    for expert, matrix in enumerate(tensor):
        if leaf == "gate_up_proj":
            gate, up = matrix.chunk(2, dim=0)
            yield f"{prefix}.{expert}.gate_proj.weight", gate.contiguous()
            yield f"{prefix}.{expert}.up_proj.weight", up.contiguous()
        else:
            yield f"{prefix}.{expert}.{leaf}.weight", matrix.contiguous()


def hf_state_dict_to_original(
    state_dict: dict[str, torch.Tensor], text_model_type: str = "qwen3"
) -> dict[str, torch.Tensor]:
    """Rename a transformers InternVL state dict to OpenGVLab's original names.

    Attention q/k/v projections are fused into one ``qkv`` matrix ([q; k; v] along rows), as
    InternViT stores them. Qwen3-MoE experts are split into one module per expert, as Qwen3-MoE
    checkpoints store them; GPT-OSS keeps its fused expert tensors, which is its own format.
    """
    out: dict[str, torch.Tensor] = {}
    pending_qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if key.startswith("model.vision_tower."):
            rest = key[len("model.vision_tower.") :].replace("encoder.layer.", "encoder.layers.")
            for proj in ("q_proj", "k_proj", "v_proj"):
                marker = f"attention.{proj}."
                if marker in rest:
                    fused = "vision_model." + rest.replace(marker, "attn.qkv.")
                    pending_qkv.setdefault(fused, {})[proj] = tensor
                    break
            else:
                for hf_part, original_part in _HF_TO_ORIGINAL_VISION_PARTS:
                    rest = rest.replace(hf_part, original_part)
                out["vision_model." + rest] = tensor
        elif key.startswith("model.multi_modal_projector."):
            module, _, leaf = key[len("model.multi_modal_projector.") :].partition(".")
            out[f"{_HF_TO_ORIGINAL_PROJECTOR[module]}.{leaf}"] = tensor
        elif key.startswith("model.language_model."):
            name = "language_model.model." + key[len("model.language_model.") :]
            if text_model_type == "qwen3_moe" and name.endswith(
                (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")
            ):
                out.update(_unfuse_experts(name, tensor))
            else:
                out[name] = tensor
        elif key.startswith("lm_head."):
            out["language_model." + key] = tensor
        else:
            raise KeyError(f"unexpected transformers InternVL key: {key}")
    for fused, parts in pending_qkv.items():
        out[fused] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out


def hf_config_to_original(hf_config: dict[str, Any]) -> dict[str, Any]:
    """Translate a transformers InternVL config.json into OpenGVLab's InternVLChatModel one."""
    vision = hf_config["vision_config"]
    text = dict(hf_config["text_config"])
    backbone = next(
        (b for b in BACKBONES.values() if b.text_config["model_type"] == text["model_type"]),
        None,
    )
    if backbone is None:
        raise ValueError(f"no original-layout name for language model {text['model_type']!r}")
    text["architectures"] = [backbone.architecture]
    if text["model_type"] == "qwen3_moe" and "num_local_experts" in text:
        # Qwen3-MoE configs name the expert count num_experts (transformers accepts both).
        text["num_experts"] = text.pop("num_local_experts")
    image_size = vision["image_size"]
    patch_size = vision["patch_size"]
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "downsample_ratio": hf_config["downsample_ratio"],
        "dynamic_image_size": True,
        "force_image_size": image_size[0] if isinstance(image_size, list) else image_size,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "ps_version": "v2",
        "select_layer": hf_config["vision_feature_layer"],
        "template": "internvl2_5",
        "use_thumbnail": True,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "torch_dtype": "float32",
        "llm_config": text,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": vision["hidden_size"],
            "num_hidden_layers": vision["num_hidden_layers"],
            "num_attention_heads": vision["num_attention_heads"],
            "intermediate_size": vision["intermediate_size"],
            "image_size": image_size[0] if isinstance(image_size, list) else image_size,
            "patch_size": patch_size[0] if isinstance(patch_size, list) else patch_size,
            "num_channels": vision.get("num_channels", 3),
            "qkv_bias": vision["attention_bias"],
            "qk_normalization": vision["use_qk_norm"],
            "norm_type": vision["norm_type"],
            "layer_norm_eps": vision["layer_norm_eps"],
            "hidden_act": vision["hidden_act"],
            "drop_path_rate": 0.0,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "use_flash_attn": False,
        },
    }


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _write_common_files(
    out_dir: Path, tokenizer: Any, chat_format: tiny_tokenizer.ChatFormat, eos_ids: list[int]
) -> None:
    tiny_tokenizer.save_tokenizer(tokenizer, out_dir, chat_format)
    (out_dir / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "GotOcr2ImageProcessor",
                "processor_class": "InternVLProcessor",
                "crop_to_patches": True,
                "min_patches": 1,
                "max_patches": 12,
                "do_resize": True,
                "size": {"height": 448, "width": 448},
                "resample": 3,
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": IMAGENET_MEAN,
                "image_std": IMAGENET_STD,
                "do_convert_rgb": True,
            },
            indent=2,
        )
    )
    (out_dir / "generation_config.json").write_text(
        json.dumps(
            {
                "eos_token_id": eos_ids,
                "pad_token_id": tokenizer.token_to_id(tiny_tokenizer.END_OF_TEXT),
            },
            indent=2,
        )
    )


def _flash_config() -> dict[str, Any]:
    return {
        "flash_mode": True,
        "flash_relative_threshold": TINY_FLASH_RELATIVE_THRESHOLD,
        "flash_absolute_threshold": TINY_FLASH_ABSOLUTE_THRESHOLD,
    }


def write_tiny_checkpoint(
    out_dir: Path,
    *,
    seed: int = 0,
    layout: str = "hf",
    flash: bool = False,
    preset: str = "tiny",
    llm: str = "qwen3",
) -> Path:
    """Write the tiny checkpoint in ``layout`` ('hf' or 'original') to ``out_dir``; with
    ``flash``, an InternVL3.5-Flash checkpoint (router + 64-token projector added); ``llm``
    picks the language backbone (one of ``BACKBONES``)."""
    if layout not in ("hf", "original"):
        raise ValueError(f"unknown layout {layout!r}; expected 'hf' or 'original'")
    model, tokenizer = build_hf_model(seed, preset, llm)
    chat_format = BACKBONES[llm].chat_format
    flash_tensors = (
        build_flash_tensors(
            seed, model.config.vision_config.hidden_size, model.config.text_config.hidden_size
        )
        if flash
        else {}
    )
    vocab = tokenizer.get_vocab()
    eos_ids = [vocab[token] for token in chat_format.stop_tokens]
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Write into a scratch folder next to the target, then rename: a reader never sees half a
    # checkpoint, and concurrent writers of the same cache entry cannot interleave.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if layout == "hf":
            model.save_pretrained(str(staging), safe_serialization=True)
            # transformers writes its own generation config; ours carries both stop tokens.
            if flash:
                # transformers has no Flash format; the extra tensors keep OpenGVLab's names.
                weights = staging / "model.safetensors"
                save_file(load_file(str(weights)) | flash_tensors, str(weights), {"format": "pt"})
                config = json.loads((staging / "config.json").read_text())
                (staging / "config.json").write_text(json.dumps(config | _flash_config(), indent=2))
        else:
            hf_config = json.loads(model.config.to_json_string())
            original = hf_state_dict_to_original(
                {k: v.contiguous() for k, v in model.state_dict().items()},
                text_model_type=hf_config["text_config"]["model_type"],
            )
            save_file(
                original | flash_tensors, str(staging / "model.safetensors"), {"format": "pt"}
            )
            config = hf_config_to_original(hf_config) | (_flash_config() if flash else {})
            (staging / "config.json").write_text(json.dumps(config, indent=2))
        _write_common_files(staging, tokenizer, chat_format, eos_ids)
        for path in staging.iterdir():
            path.chmod(0o644)
        staging.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    kind = "Flash " if flash else ""
    logger.info(
        "wrote tiny %s%s checkpoint with a %s language model (seed %d) to %s",
        kind,
        layout,
        llm,
        seed,
        out_dir,
    )
    return out_dir


def iter_layouts() -> Iterator[str]:
    yield from ("hf", "original")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="dvd-tiny-model",
        description="Write a tiny InternVL3.5-shaped checkpoint with random weights.",
    )
    parser.add_argument("out", type=Path, help="output folder (replaced if it exists)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    parser.add_argument(
        "--layout",
        choices=list(iter_layouts()),
        default="hf",
        help="hf: transformers' InternVLForConditionalGeneration; "
        "original: OpenGVLab's InternVLChatModel (default: hf)",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="tiny",
        help="tiny: the test model; bench: InternVL3.5-1B's ViT:LLM compute ratio, scaled down; "
        "vision-300m / vision-6b: InternViT-300M / InternViT-6B at full size with a one-layer "
        "language model (for dvd-bench-vision)",
    )
    parser.add_argument(
        "--flash",
        action="store_true",
        help="InternVL3.5-Flash: add the Visual Resolution Router and the 64-token projector",
    )
    parser.add_argument(
        "--llm",
        choices=list(BACKBONES),
        default="qwen3",
        help="language backbone: qwen3 (dense), qwen3_moe (routed experts) or gpt_oss "
        "(routed experts, attention sinks, sliding windows, harmony chat format) "
        "(default: qwen3)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_tiny_checkpoint(
        args.out,
        seed=args.seed,
        layout=args.layout,
        flash=args.flash,
        preset=args.preset,
        llm=args.llm,
    )


if __name__ == "__main__":
    main()
