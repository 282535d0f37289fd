"""Ending a job's child processes (vLLM's engine core and workers, a local Ray cluster) when the job is stopped.

``STOPPING`` is set once the job was asked to stop (SIGTERM, Ctrl-C): code that would restart a failed engine checks it
and gives up instead, since the engine died because the job is ending.
"""

from __future__ import annotations

import os
import threading

STOPPING = threading.Event()


def terminate_processes(processes: list, timeout_s: float = 10.0) -> None:
    """SIGTERM each ``psutil.Process``, then SIGKILL those still alive after ``timeout_s``."""
    import psutil

    for process in processes:
        try:
            process.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=timeout_s)


def terminate_pids(pids: set[int], timeout_s: float = 10.0) -> None:
    """``terminate_processes`` for the given pids (those already gone are skipped)."""
    import psutil

    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.Error:
            continue
    terminate_processes(found, timeout_s)


def terminate_descendants(timeout_s: float = 10.0) -> list[int]:
    """End every descendant of this process (SIGTERM, then SIGKILL after ``timeout_s``); returns their pids."""
    import psutil

    children = psutil.Process(os.getpid()).children(recursive=True)
    terminate_processes(children, timeout_s)
    return [child.pid for child in children]
