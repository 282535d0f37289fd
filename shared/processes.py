"""Ending a job's child processes (vLLM's engine core and workers, a local Ray cluster) when the job is stopped.

``STOPPING`` is set once the job was asked to stop (SIGTERM, Ctrl-C): code that would restart a failed engine checks it
and gives up instead, since the engine died because the job is ending.
"""

from __future__ import annotations

import os
import threading

STOPPING = threading.Event()


def terminate_descendants(timeout_s: float = 10.0) -> list[int]:
    """SIGTERM every descendant of this process, then SIGKILL what is left after ``timeout_s``; returns their pids."""
    import psutil

    children = psutil.Process(os.getpid()).children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=timeout_s)
    return [child.pid for child in children]
