"""What the servers need to know about an InternVL checkpoint, read from either layout.

Two on-disk layouts carry the same model:
- ``original``: OpenGVLab's ``InternVLChatModel`` (``llm_config``/``vision_config``,
  ``vision_model.*``/``mlp1.*``/``language_model.*`` weights). Its modelling code ships with the
  checkpoint; we never run it, we read ``config.json`` and the safetensors ourselves.
- ``hf``: transformers' ``InternVLForConditionalGeneration`` (``text_config``/``vision_config``,
  ``vision_tower.*``/``multi_modal_projector.*``/``language_model.*`` weights).
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Frames sampled per video when neither the request nor the checkpoint says: the model card's
# video example uses 8.
DEFAULT_VIDEO_FRAMES = 8


class CheckpointError(ValueError):
    """The checkpoint is missing, unreadable or not an InternVL model we can serve."""


class Layout(StrEnum):
    HF = "hf"
    ORIGINAL = "original"


class VisionTowerSpec(BaseModel):
    """InternViT hyper-parameters."""

    model_config = ConfigDict(frozen=True)

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    qk_norm: bool = False
    norm_type: Literal["layer_norm", "rms_norm"] = "layer_norm"
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    # Which hidden state feeds the projector: -1 is the last layer (InternVL3.5's choice).
    select_layer: int = -1

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def layers_to_run(self) -> int:
        """Encoder layers needed to produce hidden state ``select_layer`` (0 = embeddings)."""
        if self.select_layer < 0:
            return self.num_layers + 1 + self.select_layer
        return self.select_layer


class FlashSpec(BaseModel):
    """InternVL3.5-Flash's Visual Resolution Router settings (``flash_*`` config keys)."""

    model_config = ConfigDict(frozen=True)

    relative_threshold: float
    absolute_threshold: float
    # Fixed by the published architecture.
    pooling_heads: int = 16
    gating_expansion: int = 4


class ImageTokens(BaseModel):
    """The text tokens that frame an image's embedding rows in the prompt."""

    model_config = ConfigDict(frozen=True)

    start: str = "<img>"
    context: str = "<IMG_CONTEXT>"
    end: str = "</img>"


class CheckpointSpec(BaseModel):
    """Everything about a checkpoint that serving needs, independent of its layout."""

    model_config = ConfigDict(frozen=True)

    path: Path
    layout: Layout
    vision: VisionTowerSpec
    downsample_ratio: float
    llm_hidden_size: int
    text_config: dict[str, Any]
    image_tokens: ImageTokens = ImageTokens()
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    checkpoint_dtype: str = "bfloat16"
    flash: FlashSpec | None = None
    # Frames sampled per video by default (a transformers video processor config's
    # ``num_frames``, else the model card's 8).
    video_frames: int = DEFAULT_VIDEO_FRAMES

    @property
    def tokens_per_tile(self) -> int:
        side = int(self.vision.patches_per_side * self.downsample_ratio)
        return side * side

    @property
    def compressed_tokens_per_tile(self) -> int:
        """Tokens of a tile the router compresses (pixel shuffle at downsample_ratio squared)."""
        side = int(self.vision.patches_per_side * self.downsample_ratio**2)
        return side * side


def _first(value: Any) -> int:
    return int(value[0]) if isinstance(value, list | tuple) else int(value)


def detect_layout(config: dict[str, Any]) -> Layout:
    if "llm_config" in config or config.get("model_type") == "internvl_chat":
        return Layout.ORIGINAL
    if "text_config" in config and config.get("model_type") == "internvl":
        return Layout.HF
    raise CheckpointError(
        "not an InternVL checkpoint: config.json has neither InternVLChatModel's 'llm_config' "
        f"nor transformers InternVL's 'text_config' (model_type={config.get('model_type')!r})"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


# The vision-config keys (with their defaults) that the two layouts name differently:
# attention bias, QK normalisation, norm type.
_VISION_KEYS = {
    "original": (("qkv_bias", True), ("qk_normalization", False), ("norm_type", "rms_norm")),
    "hf": (("attention_bias", False), ("use_qk_norm", False), ("norm_type", "layer_norm")),
}


def _vision_spec(vision: dict[str, Any], select_layer: int, layout: str) -> VisionTowerSpec:
    if layout == "hf" and not vision.get("use_mean_pooling", True):
        # A final LayerNorm after the encoder is not part of InternViT as InternVL uses it.
        raise CheckpointError("vision_config.use_mean_pooling=false is not supported")
    bias, qk_norm, norm_type = (vision.get(key, default) for key, default in _VISION_KEYS[layout])
    return VisionTowerSpec(
        hidden_size=vision["hidden_size"],
        num_layers=vision["num_hidden_layers"],
        num_heads=vision["num_attention_heads"],
        intermediate_size=vision["intermediate_size"],
        image_size=_first(vision.get("image_size", 448)),
        patch_size=_first(vision.get("patch_size", 14)),
        num_channels=vision.get("num_channels", 3),
        qkv_bias=bias,
        qk_norm=qk_norm,
        norm_type=norm_type,
        layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
        hidden_act=vision.get("hidden_act", "gelu"),
        select_layer=select_layer,
    )


def load_checkpoint_spec(path: Path) -> CheckpointSpec:
    """Read ``config.json`` (and the processor/tokenizer configs) of a local checkpoint folder."""
    path = Path(path)
    config = _read_json(path / "config.json")
    if not config:
        raise CheckpointError(f"{path} has no config.json")
    layout = detect_layout(config)
    preprocessor = _read_json(path / "preprocessor_config.json")
    video_preprocessor = _read_json(path / "video_preprocessor_config.json")
    tokenizer_config = _read_json(path / "tokenizer_config.json")

    if layout is Layout.ORIGINAL:
        if config.get("ps_version", "v2") != "v2":
            raise CheckpointError(
                "only pixel-shuffle version 'v2' (InternVL2 and later) is supported"
            )
        select_layer = int(config.get("select_layer", -1))
        vision = _vision_spec(config["vision_config"], select_layer, "original")
        text_config = dict(config["llm_config"])
        min_tiles = int(config.get("min_dynamic_patch", 1))
        max_tiles = int(config.get("max_dynamic_patch", 12))
        use_thumbnail = bool(config.get("use_thumbnail", True))
        if not config.get("dynamic_image_size", True):
            min_tiles = max_tiles = 1
        checkpoint_dtype = str(
            config.get("torch_dtype") or text_config.get("torch_dtype") or "bfloat16"
        )
    else:
        if config.get("vision_feature_select_strategy", "default") != "default":
            raise CheckpointError("only vision_feature_select_strategy='default' is supported")
        layer = config.get("vision_feature_layer", -1)
        if isinstance(layer, list):
            raise CheckpointError("multi-layer vision features are not supported")
        vision = _vision_spec(config["vision_config"], int(layer), "hf")
        text_config = dict(config["text_config"])
        min_tiles = int(preprocessor.get("min_patches", 1))
        max_tiles = int(preprocessor.get("max_patches", 12))
        use_thumbnail = True
        checkpoint_dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")

    flash = None
    if config.get("flash_mode"):
        flash = FlashSpec(
            relative_threshold=float(config["flash_relative_threshold"]),
            absolute_threshold=float(config["flash_absolute_threshold"]),
        )
    image_tokens = ImageTokens(
        start=tokenizer_config.get("start_image_token", "<img>"),
        context=tokenizer_config.get("context_image_token", "<IMG_CONTEXT>"),
        end=tokenizer_config.get("end_image_token", "</img>"),
    )
    mean = tuple(preprocessor.get("image_mean", IMAGENET_MEAN))
    std = tuple(preprocessor.get("image_std", IMAGENET_STD))
    return CheckpointSpec(
        path=path,
        layout=layout,
        vision=vision,
        downsample_ratio=float(config.get("downsample_ratio", 0.5)),
        llm_hidden_size=int(text_config["hidden_size"]),
        text_config=text_config,
        image_tokens=image_tokens,
        image_mean=mean,
        image_std=std,
        min_tiles=min_tiles,
        max_tiles=max_tiles,
        use_thumbnail=use_thumbnail,
        checkpoint_dtype=checkpoint_dtype,
        flash=flash,
        video_frames=_video_frames(video_preprocessor),
    )


def _video_frames(video_preprocessor: dict[str, Any]) -> int:
    frames = video_preprocessor.get("num_frames")
    return int(frames) if isinstance(frames, int) and frames > 0 else DEFAULT_VIDEO_FRAMES
