"""Connecting to Ray, the same way for every stage: the configured cluster, or a local one on this machine.

``ray.init`` installs the core worker's failure signal handler for SIGTERM in this process, over the job's own: a
``kill <pid>`` then printed a C++ stack and ended the driver with SIGABRT, leaving Ray's processes behind. The Python
handler in place before ``ray.init`` is put back after it, so the job stops as it does without Ray.
"""

from __future__ import annotations

import os
import signal
import threading

from shared.config import PipelineConfig


def ensure_ray(config: PipelineConfig) -> bool:
    """Connect to ``ray.address`` or start a local cluster; True when this call started Ray (the caller may shut it
    down), False when Ray was already initialised in this process."""
    import ray

    if ray.is_initialized():
        return False
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    if config.ray.address:
        ray.init(address=config.ray.address)
    else:
        needed = config.ray.num_workers * config.ray.cpus_per_worker
        ray.init(address="local", include_dashboard=False, num_cpus=max(os.cpu_count() or 1, needed))
    if callable(previous):  # a Python handler (not SIG_DFL/SIG_IGN): re-arm it over Ray's C++ one
        signal.signal(signal.SIGTERM, previous)
    return True
