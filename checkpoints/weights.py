"""Finding a checkpoint (local folder or hub id) and reading its vision-side weights.

Only safetensors are read (never pickle), and only the files that make up the model's config,
tokenizer and weights are downloaded: code shipped with a checkpoint is never fetched or run.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from checkpoints.spec import CheckpointError, Layout

logger = logging.getLogger(__name__)

# What a served checkpoint needs; notably absent: *.py (remote code) and *.bin/*.pt (pickle).
CHECKPOINT_FILE_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "*.txt",
    "*.model",
    "*.tiktoken",
]


def resolve_checkpoint(model: str, revision: str | None = None) -> Path:
    """Return a local folder for ``model``: the folder itself, or a hub snapshot.

    Hub downloads go through ``huggingface_hub`` and so honour ``HF_HOME``, ``HF_TOKEN`` and
    ``HF_HUB_OFFLINE`` (offline: only what is already cached).
    """
    local = Path(model).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.exists():
        raise CheckpointError(f"{model} is a file, expected a checkpoint folder")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise CheckpointError(f"checkpoint folder {model} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id=model, revision=revision, allow_patterns=CHECKPOINT_FILE_PATTERNS
            )
        )
    except Exception as exc:  # the hub raises many types; all mean "cannot get it"
        raise CheckpointError(f"cannot fetch checkpoint {model!r} from the hub: {exc}") from exc


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's weight files (from the shard index when there is one)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / name for name in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{path} has no *.safetensors weights (pickled .bin checkpoints are not loaded)"
        )
    return files


def read_tensors(path: Path, keep: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Read the tensors whose names start with one of the ``keep`` prefixes (all if None)."""
    prefixes = tuple(keep) if keep is not None else None
    tensors: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if prefixes is None or name.startswith(prefixes):
                    tensors[name] = handle.get_tensor(name)
    return tensors


# transformers' InternVL names -> OpenGVLab's names (our canonical ones). Checkpoints saved by
# transformers 5 carry the bare prefixes ("vision_tower."); in-memory/other savers add "model.".
_HF_VISION_RENAMES = [
    (re.compile(r"^(model\.)?vision_tower\."), "vision_model."),
    (re.compile(r"\.encoder\.layer\."), ".encoder.layers."),
    (re.compile(r"\.embeddings\.cls_token$"), ".embeddings.class_embedding"),
    (re.compile(r"\.embeddings\.position_embeddings$"), ".embeddings.position_embedding"),
    (re.compile(r"\.embeddings\.patch_embeddings\.projection\."), ".embeddings.patch_embedding."),
    (re.compile(r"\.attention\.projection_layer\."), ".attn.proj."),
    (re.compile(r"\.attention\.(q_norm|k_norm)\."), r".attn.\1."),
    (re.compile(r"\.layernorm_before\."), ".norm1."),
    (re.compile(r"\.layernorm_after\."), ".norm2."),
    (re.compile(r"\.lambda_(\d)$"), r".ls\1"),
]
_HF_PROJECTOR = re.compile(r"^(model\.)?multi_modal_projector\.(layer_norm|linear_1|linear_2)\.")
_HF_PROJECTOR_INDEX = {"layer_norm": "0", "linear_1": "1", "linear_2": "3"}
_HF_QKV = re.compile(r"^(?P<layer>.*)\.attention\.(?P<part>[qkv])_proj\.(?P<leaf>weight|bias)$")


def _hf_to_canonical(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        projector = _HF_PROJECTOR.match(name)
        if projector:
            index = _HF_PROJECTOR_INDEX[projector.group(2)]
            out[f"mlp1.{index}." + name[projector.end() :]] = tensor
            continue
        for pattern, replacement in _HF_VISION_RENAMES:
            name = pattern.sub(replacement, name)
        split = _HF_QKV.match(name)
        if split:
            fused = f"{split['layer']}.attn.qkv.{split['leaf']}"
            qkv.setdefault(fused, {})[split["part"]] = tensor
        else:
            out[name] = tensor
    for fused, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"incomplete q/k/v projections for {fused}")
        out[fused] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# InternVL3.5-Flash: the 64-token projector and the Visual Resolution Router.
FLASH_PREFIXES = ("mlp2.", "pooling_before_gating.", "gating.")


def _is_flash_tensor(name: str) -> bool:
    return name.removeprefix("model.").startswith(FLASH_PREFIXES)


def load_vision_weights(path: Path, layout: Layout) -> dict[str, torch.Tensor]:
    """The ViT, projector and router weights under OpenGVLab's names (``vision_model.*``,
    ``mlp1.*``, ``mlp2.*``, ``pooling_before_gating.*``, ``gating.*``)."""
    if layout is Layout.ORIGINAL:
        return read_tensors(path, keep=("vision_model.", "mlp1.", *FLASH_PREFIXES))
    hf = read_tensors(
        path,
        keep=(
            "vision_tower.",
            "model.vision_tower.",
            "multi_modal_projector.",
            "model.multi_modal_projector.",
            *FLASH_PREFIXES,
            *(f"model.{prefix}" for prefix in FLASH_PREFIXES),
        ),
    )
    # transformers has no Flash format yet: DvD's hf-layout Flash checkpoints keep the router
    # and mlp2 under their original names (optionally behind "model.").
    flash = {k.removeprefix("model."): v for k, v in hf.items() if _is_flash_tensor(k)}
    rest = {k: v for k, v in hf.items() if not _is_flash_tensor(k)}
    return _hf_to_canonical(rest) | flash
