"""The model served when none is given: the generated tiny checkpoint, cached on disk."""

from __future__ import annotations

import os
from pathlib import Path

from filelock import FileLock

# Bump when the generator's output changes, so stale caches are not served.
TINY_GENERATOR_VERSION = 3
TINY_MODEL_NAME = "dvd-tiny-internvl"


def default_cache_dir() -> Path:
    """``$DVD_CACHE_DIR``, else ``$XDG_CACHE_HOME/dvd``, else ``~/.cache/dvd``."""
    explicit = os.environ.get("DVD_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "dvd"


def tiny_checkpoint(
    cache_dir: Path | None = None,
    *,
    seed: int = 0,
    layout: str = "hf",
    flash: bool = True,
    llm: str = "qwen3",
) -> Path:
    """Path of the cached tiny checkpoint (a Flash one by default, so the router is on; a
    dense Qwen3 language model unless ``llm`` says otherwise), generating it on first use
    (safe across processes)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    kind = "-flash" if flash else ""
    name = f"{TINY_MODEL_NAME}-v{TINY_GENERATOR_VERSION}-seed{seed}-{layout}-{llm}{kind}"
    target = cache_dir / name
    if (target / "config.json").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f".{target.name}.lock")):
        if not (target / "config.json").exists():
            from checkpoints.tiny import write_tiny_checkpoint

            write_tiny_checkpoint(target, seed=seed, layout=layout, flash=flash, llm=llm)
    return target


def resolve_model(
    model: str | None, revision: str | None, cache_dir: Path | None
) -> tuple[Path, str]:
    """(local checkpoint folder, model id) for a ``--model`` value; None means the tiny model."""
    if model:
        from checkpoints.weights import resolve_checkpoint

        return resolve_checkpoint(model, revision), model
    return tiny_checkpoint(cache_dir), TINY_MODEL_NAME
