"""Connecting to Ray, the same way for every stage: the configured cluster, or a local one on this machine."""

from __future__ import annotations

import os

from shared.config import PipelineConfig


def ensure_ray(config: PipelineConfig) -> bool:
    """Connect to ``ray.address`` or start a local cluster; True when this call started Ray (the caller may shut it
    down), False when Ray was already initialised in this process."""
    import ray

    if ray.is_initialized():
        return False
    if config.ray.address:
        ray.init(address=config.ray.address)
    else:
        needed = config.ray.num_workers * config.ray.cpus_per_worker
        ray.init(address="local", include_dashboard=False, num_cpus=max(os.cpu_count() or 1, needed))
    return True
