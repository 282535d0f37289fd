"""``llavaseg build-mini-models``: train the mini LLaVA and the mini SAM of the demo world, record their sha256.

Writes ``<out>/mini-llava/`` (``stage1_reason.mini_llava.build_mini_llava``) and ``<out>/mini-sam/``
(``stage2_segment.mini_sam.build_mini_sam``), then updates ``<out>/SHA256SUMS`` (``sha256sum -c`` format, paths
relative to ``<out>``): the lines of the folders just built are replaced, every other line is kept. Both builders are
seeded; with the same seed, steps and torch thread count a rerun writes the same weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SUMS_FILE = "SHA256SUMS"
MODELS = ("mini-llava", "mini-sam")
# torch threads each committed model was built with (the weights depend on the thread count)
DEFAULT_THREADS = {"mini-llava": 2, "mini-sam": 1}


def _builder(model: str) -> Callable[..., dict[str, Any]]:
    """The build function of ``model``, imported only when used (the mini LLaVA builder may be absent)."""
    if model == "mini-sam":
        from stage2_segment.mini_sam import build_mini_sam

        return build_mini_sam
    from stage1_reason.mini_llava import build_mini_llava

    return build_mini_llava


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_sums(path: Path) -> dict[str, str]:
    """``SHA256SUMS`` -> {relative path: hex digest}; a missing file is empty."""
    sums = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                digest, name = line.split(maxsplit=1)
                sums[name.strip().lstrip("*")] = digest
    return sums


def update_sums(out_dir: Path, folders: list[str]) -> dict[str, str]:
    """Replace the ``SHA256SUMS`` lines of ``folders`` (relative to ``out_dir``) with the digests of their files now."""
    sums_path = out_dir / SUMS_FILE
    sums = {name: digest for name, digest in read_sums(sums_path).items()
            if not any(name.startswith(f"{folder}/") for folder in folders)}  # fmt: skip
    for folder in folders:
        for path in sorted((out_dir / folder).rglob("*")):
            if path.is_file() and not path.name.endswith(".tmp"):
                sums[path.relative_to(out_dir).as_posix()] = sha256_file(path)
    temporary = sums_path.with_name(f"{SUMS_FILE}.tmp")
    temporary.write_text("".join(f"{sums[name]}  {name}\n" for name in sorted(sums)), encoding="utf-8")
    temporary.replace(sums_path)
    return sums


def build_mini_models(
    out_dir: Path,
    models: tuple[str, ...] = MODELS,
    seed: int = 0,
    steps: dict[str, int | None] | None = None,
    progress: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """Build ``models`` under ``out_dir`` and update its ``SHA256SUMS``; returns each model's figures and seconds.
    ``threads`` = torch threads for every model; None = each model's ``DEFAULT_THREADS`` (those of the committed
    weights)."""
    unknown = [model for model in models if model not in MODELS]
    if unknown:
        raise ValueError(f"unknown mini model(s) {unknown}; known: {', '.join(MODELS)}")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"seed": seed, "models": {}}
    for model in models:
        try:
            build = _builder(model)
        except ImportError as error:
            raise ValueError(f"{model}: its builder cannot be imported ({error})") from error
        model_started = time.perf_counter()
        torch.set_num_threads(threads or DEFAULT_THREADS[model])
        figures = build(out_dir / model, seed=seed, steps=(steps or {}).get(model), progress=progress)
        figures = {key: value for key, value in figures.items() if key != "losses"}
        summary["models"][model] = {**figures, "torch_threads": torch.get_num_threads(),
                                    "build_seconds": round(time.perf_counter() - model_started, 1)}  # fmt: skip
        update_sums(out_dir, [model])
    summary["sha256"] = {name: digest for name, digest in read_sums(out_dir / SUMS_FILE).items()
                         if name.split("/")[0] in models}  # fmt: skip
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary


def _scalars(figures: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Numbers and strings of a (nested) figures dict, keys joined with dots; lists (loss curves) left out."""
    flat: dict[str, Any] = {}
    for key, value in figures.items():
        if isinstance(value, dict):
            flat |= _scalars(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float, str)):
            flat[f"{prefix}{key}"] = value
    return flat


def describe(summary: dict[str, Any]) -> str:
    """Human summary: one block per model (its quality figures), the hashes, and the total run time."""
    lines = [f"mini models (seed {summary['seed']}):"]
    for model, figures in summary["models"].items():
        lines.append(f"  {model}: " + json.dumps(_scalars(figures), sort_keys=True))
    lines += [f"  {digest}  {name}" for name, digest in sorted(summary["sha256"].items())]
    lines.append(f"built in {summary['seconds']:.0f} s")
    return "\n".join(lines)
