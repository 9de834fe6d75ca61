"""The language model's config, as vLLM must see it, written next to (not into) the checkpoint.

vLLM reads the weights and tokenizer straight from the InternVL checkpoint folder; only its
``config.json`` is replaced, through ``hf_config_path``, by the LLM's own config (from
``llm_config`` or ``text_config``) naming DvD's architecture class. A few hundred bytes per
checkpoint, cached under DvD's cache folder; the weights are never copied.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from checkpoints.spec import CheckpointError, CheckpointSpec
from llm_server.engine.vllm_plugin import LANGUAGE_MODEL_CLASSES, MODEL_TYPE_ARCHITECTURES


def language_model_architecture(text_config: dict[str, object]) -> str:
    """The LLM architecture of the checkpoint (e.g. ``Qwen3ForCausalLM``)."""
    architectures = text_config.get("architectures")
    if isinstance(architectures, list) and architectures:
        return str(architectures[0])
    model_type = str(text_config.get("model_type", ""))
    if model_type in MODEL_TYPE_ARCHITECTURES:
        return MODEL_TYPE_ARCHITECTURES[model_type]
    raise CheckpointError(
        f"cannot tell the language model's architecture (model_type={model_type!r})"
    )


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def language_model_config_dir(spec: CheckpointSpec, cache_dir: Path) -> Path:
    """Folder holding the LLM ``config.json`` (and ``generation_config.json``) for vLLM."""
    architecture = language_model_architecture(spec.text_config)
    if architecture not in LANGUAGE_MODEL_CLASSES:
        supported = ", ".join(sorted(LANGUAGE_MODEL_CLASSES))
        raise CheckpointError(
            f"language model {architecture} is not supported (supported: {supported})"
        )
    config = dict(spec.text_config)
    config["architectures"] = [LANGUAGE_MODEL_CLASSES[architecture]]
    # The LLM sub-config often leaves the dtype to the top level; without it vLLM would guess.
    if not (config.get("dtype") or config.get("torch_dtype")):
        config["dtype"] = spec.checkpoint_dtype
    config_text = json.dumps(config, indent=2, sort_keys=True)
    generation = spec.path / "generation_config.json"
    generation_text = generation.read_text() if generation.exists() else None
    digest = hashlib.sha256((config_text + (generation_text or "")).encode()).hexdigest()[:16]
    folder = cache_dir / "language-model-configs" / f"{architecture}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(folder / "config.json", config_text)
    if generation_text is not None:
        _write_atomically(folder / "generation_config.json", generation_text)
    return folder


def main() -> None:
    """``python -m llm_server.engine.model_files CHECKPOINT``: print the folder to give
    ``vllm serve CHECKPOINT --hf-config-path`` (to serve the same LLM with plain vLLM)."""
    import sys

    from checkpoints.default import default_cache_dir
    from checkpoints.spec import load_checkpoint_spec

    spec = load_checkpoint_spec(Path(sys.argv[1]))
    print(language_model_config_dir(spec, default_cache_dir()))


if __name__ == "__main__":
    main()
