"""A fingerprint of a model's weights for provenance and run keys, cheap enough to compute on every run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SAMPLE_BYTES = 1 << 20


def _local_dir(model: str) -> Path | None:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:  # a hub id: its snapshot in the local cache, if any (never downloads)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:
        return None


def model_fingerprint(model: str) -> str:
    """sha256 over config.json, the weight index, each weight file's name and size, and its first and last MiB.

    A hub id with no local snapshot gets ``hub:<id>`` (vLLM resolves it the same way the user's cache does).
    """
    folder = _local_dir(model)
    if folder is None:
        return f"hub:{model}"
    digest = hashlib.sha256()
    for name in ("config.json", *_INDEX_FILES):
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    weights = sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    digest.update(json.dumps([(p.name, p.stat().st_size) for p in weights]).encode())
    for path in weights:  # first and last MiB of each file: different weights of the same shapes differ here
        with open(path, "rb") as f:
            digest.update(f.read(_SAMPLE_BYTES))
            f.seek(max(0, path.stat().st_size - _SAMPLE_BYTES))
            digest.update(f.read(_SAMPLE_BYTES))
    return "sha256:" + digest.hexdigest()[:32]
