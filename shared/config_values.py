"""Value checks of a loaded configuration: settings of the right type that still cannot work.

``value_problems(sections)`` returns one message per bad value, each naming its key, so that ``load_config`` reports
them together with the type errors before any work starts (not later, inside Ray workers, after retries): a learning
rate that is NaN, infinite or not positive, adapter blocks outside the SAM variant's encoder, a negative checkpoint
count, zero CPUs per worker, a vLLM memory fraction outside (0, 1], negative sample rates, AdamW betas outside [0, 1),
and paths given as URIs of a scheme the key cannot take (a work dir on ``gs://``, a data root on any store).
"""

from __future__ import annotations

import math
import re
from urllib.parse import urlparse
from typing import Any

# Encoder depth of each SAM variant (stage2_segment.modeling.SAM_VARIANTS; a test keeps the two equal). shared/ may
# not import stage 2, so the numbers live here too.
SAM_ENCODER_DEPTHS = {"vit_h": 32, "vit_l": 24, "vit_b": 12, "tiny": 4, "mini": 4}
URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# The URI schemes each path key takes (none: a local or mounted folder only). The work dir needs conditional writes for
# its leases (shared/object_store.py); Ray Train reads and writes its storage path itself, through pyarrow.fs.
URI_PATH_KEYS = {("paths", "data_root"): (), ("paths", "work_dir"): ("s3",), ("ray", "storage_path"): ("s3", "gs")}


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def server_problems(stage1: Any) -> list[str]:
    """``stage1.backend = "openai"``: the server URLs it needs, and request settings that can work."""
    problems = []
    urls = {"server_url": stage1.server_url, "embed_server_url": stage1.embed_server_url}
    for key, url in urls.items():
        parsed = urlparse(url)
        if url and (parsed.scheme not in ("http", "https") or not parsed.netloc):
            problems.append(f"stage1.{key}: {url!r} is not an http(s)://host:port URL")
    if stage1.backend == "openai":
        if not stage1.server_url:
            problems.append("stage1.server_url: required with stage1.backend = 'openai' (the `vllm serve` URL)")
        if stage1.embed_mode == "hidden" and not stage1.embed_server_url and not stage1.embed_backend:
            problems.append("stage1.embed_server_url: required with stage1.backend = 'openai' and embed_mode 'hidden' "
                            "(a `vllm serve --runner pooling` URL; embed_mode 'input' or a local "
                            "stage1.embed_backend needs none)")  # fmt: skip
    if stage1.api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", stage1.api_key_env):
        problems.append(f"stage1.api_key_env: {stage1.api_key_env!r} is not an environment variable name (the key "
                        "itself does not belong in the config)")  # fmt: skip
    if stage1.max_concurrency < 1:
        problems.append(f"stage1.max_concurrency: must be >= 1, got {stage1.max_concurrency}")
    if stage1.request_retries < 0:
        problems.append(f"stage1.request_retries: must be >= 0, got {stage1.request_retries}")
    for key in ("request_timeout_s", "retry_backoff_s"):
        value = getattr(stage1, key)
        if not (_finite(value) and (value > 0 if key == "request_timeout_s" else value >= 0)):
            problems.append(f"stage1.{key}: must be a finite number {'> 0' if key == 'request_timeout_s' else '>= 0'}, "
                            f"got {value}")  # fmt: skip
    return problems


def value_problems(sections: dict[str, Any]) -> list[str]:
    """Messages naming each key whose value cannot work; ``sections`` maps section names to their dataclasses."""
    stage1, stage2, data, ray = sections["stage1"], sections["stage2"], sections["data"], sections["ray"]
    problems = []
    if not (_finite(stage2.lr) and stage2.lr > 0):
        problems.append(f"stage2.lr: must be a finite number > 0, got {stage2.lr}")
    for key in ("weight_decay", "bce_weight", "dice_weight", "grad_clip_norm"):
        value = getattr(stage2, key)
        if not (_finite(value) and value >= 0):
            problems.append(f"stage2.{key}: must be a finite number >= 0, got {value}")
    if _finite(stage2.bce_weight) and _finite(stage2.dice_weight) and stage2.bce_weight + stage2.dice_weight <= 0:
        problems.append("stage2.bce_weight, stage2.dice_weight: at least one must be > 0 (the loss would be 0)")
    betas = stage2.adam_betas
    if len(betas) != 2 or not all(_finite(beta) and 0 <= beta < 1 for beta in betas):
        problems.append(f"stage2.adam_betas: must be two numbers in [0, 1) (beta1, beta2), got {betas}")
    if stage2.warmup_iterations < 0:
        problems.append(f"stage2.warmup_iterations: must be >= 0, got {stage2.warmup_iterations}")
    if stage2.keep_checkpoints < 0:
        problems.append(f"stage2.keep_checkpoints: must be >= 0 (0 keeps them all), got {stage2.keep_checkpoints}")
    if stage2.loader_workers < 0:
        problems.append(f"stage2.loader_workers: must be >= 0, got {stage2.loader_workers}")
    depth = SAM_ENCODER_DEPTHS.get(stage2.sam_variant)
    if depth is not None:
        outside = [block for block in stage2.adapter_blocks if not 0 <= block < depth]
        if outside:
            problems.append(f"stage2.adapter_blocks: {outside} outside the {stage2.sam_variant} encoder's blocks "
                            f"0..{depth - 1}")  # fmt: skip
        if len(set(stage2.adapter_blocks)) != len(stage2.adapter_blocks):
            problems.append(f"stage2.adapter_blocks: {stage2.adapter_blocks} names a block twice")
    if ray.cpus_per_worker < 1:
        problems.append(f"ray.cpus_per_worker: must be >= 1, got {ray.cpus_per_worker}")
    if stage1.kv_cache_tokens < 0:
        problems.append(f"stage1.kv_cache_tokens: must be >= 0 (0 = sized by gpu_memory_utilization), got "
                        f"{stage1.kv_cache_tokens}")  # fmt: skip
    if stage1.engine_restarts < 0:
        problems.append(f"stage1.engine_restarts: must be >= 0, got {stage1.engine_restarts}")
    if not (_finite(stage1.engine_stall_timeout_s) and stage1.engine_stall_timeout_s >= 0):
        problems.append(f"stage1.engine_stall_timeout_s: must be a finite number >= 0 (0 = off), got "
                        f"{stage1.engine_stall_timeout_s}")  # fmt: skip
    if not (_finite(stage1.lease_timeout_s) and stage1.lease_timeout_s > 0):
        problems.append(f"stage1.lease_timeout_s: must be a finite number > 0 (seconds), got {stage1.lease_timeout_s}")
    if not (_finite(stage1.gpu_memory_utilization) and 0 < stage1.gpu_memory_utilization <= 1):
        problems.append(f"stage1.gpu_memory_utilization: must be in (0, 1], got {stage1.gpu_memory_utilization}")
    for family, rate in data.sample_rates.items():
        if not (_finite(rate) and rate >= 0):
            problems.append(f"data.sample_rates.{family}: must be a finite number >= 0, got {rate}")
    for (section, key), schemes in URI_PATH_KEYS.items():
        value = getattr(sections[section], key)
        if URI_SCHEME.match(value):
            scheme = value.split("://", 1)[0]
            if scheme not in schemes:
                takes = " or ".join(f"{s}://" for s in schemes) + " URIs or " if schemes else ""
                problems.append(f"{section}.{key}: {value!r} is a {scheme}:// URI; it takes {takes}local (or mounted) "
                                "folders")  # fmt: skip
            elif not value.split("://", 1)[1].strip("/"):
                problems.append(f"{section}.{key}: {value!r} names no bucket")
    problems += server_problems(stage1)
    return problems
