"""The identity of a checkpoint: one digest that both services compute the same way.

The language service compares its own checkpoint's digest with the one the vision service
reports (``ModelInfo.checkpoint_digest``), and the vision service puts it in the key of its
embedding cache, so rows of one checkpoint are never served for another.

What goes in, and why:

- the bytes of ``config.json`` and ``preprocessor_config.json`` (architecture, widths, the
  router's thresholds, the image normalisation): small, hashed whole;
- per safetensors file: its name, its size, the sha256 of its JSON header (every tensor's
  name, dtype, shape and offsets), and the sha256 of ``SAMPLES_PER_FILE`` blocks of
  ``SAMPLE_BYTES`` spread evenly over its data.

Hashing every weight byte would be exact but costs about a second per GB at every start
(minutes for the large checkpoints); the sampled blocks cost a few milliseconds whatever the
size, and any fine-tune, re-quantisation or other export of a model changes virtually every
block, so they tell different weights apart in practice. Two things are deliberately left out:
file modification times, which differ between two copies of the same checkpoint (the two
services often load it on different hosts, one from the hub cache and one from a mounted
copy), and the hub revision, which names a commit rather than the bytes (the same weights are
reachable through many revisions, and a local folder has none). Tokenizer files are left out
too: they do not change what an image's rows are.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

DIGEST_VERSION = "dvd-checkpoint-digest-v1"
CONFIG_FILES = ("config.json", "preprocessor_config.json")
SAMPLES_PER_FILE = 16
SAMPLE_BYTES = 64 * 1024


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files, from the shard index when there is one (as the loaders read them)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({path / name for name in weight_map.values()})
    return sorted(path.glob("*.safetensors"))


def weights_fingerprint(file: Path) -> str:
    """Size, header and sampled data blocks of one safetensors file, as a hex sha256."""
    size = file.stat().st_size
    digest = hashlib.sha256(f"size={size}".encode())
    with file.open("rb") as handle:
        raw_length = handle.read(8)
        if len(raw_length) != 8:
            raise ValueError(f"{file} is not a safetensors file (shorter than 8 bytes)")
        (header_length,) = struct.unpack("<Q", raw_length)
        digest.update(hashlib.sha256(handle.read(header_length)).digest())
        data_start = 8 + header_length
        data_length = max(size - data_start, 0)
        if data_length <= SAMPLE_BYTES * SAMPLES_PER_FILE:  # small: every byte
            digest.update(hashlib.sha256(handle.read()).digest())
            return digest.hexdigest()
        # Evenly spaced blocks, the first at the start and the last at the end of the data.
        span = data_length - SAMPLE_BYTES
        for index in range(SAMPLES_PER_FILE):
            handle.seek(data_start + span * index // (SAMPLES_PER_FILE - 1))
            digest.update(hashlib.sha256(handle.read(SAMPLE_BYTES)).digest())
    return digest.hexdigest()


def checkpoint_digest(path: Path) -> str:
    """The hex sha256 identity of the checkpoint folder ``path`` (see the module docstring)."""
    path = Path(path)
    digest = hashlib.sha256(DIGEST_VERSION.encode())
    for name in CONFIG_FILES:
        file = path / name
        if file.is_file():
            digest.update(f"\0{name}\0".encode())
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    for file in _weight_files(path):
        digest.update(f"\0{file.name}\0{weights_fingerprint(file)}".encode())
    return digest.hexdigest()


def short_digest(digest: str) -> str:
    """The first 12 hex digits, for logs and messages."""
    return digest[:12] if digest else "(none)"
