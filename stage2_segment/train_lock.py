"""One ``train`` per work dir at a time: an exclusive lock file that names its owner.

``train_lock(work_dir)`` takes ``<work_dir>/stage2/train.lock`` with ``fcntl.flock`` (exclusive, non-blocking) and
writes the owner's pid, host and start time into it. A second ``train`` on the same work dir stops at once with
``TrainLockedError`` naming that owner. The kernel drops the lock when its process ends, however it ends, so a lock
left by a killed ``train`` is stale by construction and the next ``train`` takes it over (the file stays; only the
lock on it counts). The lock must be on a file system with working ``flock`` (local disks, NFSv4).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = "train.lock"


class TrainLockedError(OSError):
    """Another process is training in this work dir; the message names it (an OSError, like a busy resource)."""


def lock_path(work_dir: Path) -> Path:
    return Path(work_dir) / "stage2" / LOCK_FILE


def _owner(handle) -> str:
    handle.seek(0)
    try:
        owner = json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        owner = {}
    if not isinstance(owner, dict) or "pid" not in owner:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"pid {owner['pid']} on {owner.get('host', '?')}, started {started}"


@contextmanager
def train_lock(work_dir: Path) -> Iterator[Path]:
    """Hold the work dir's training lock for the ``with`` block; raises TrainLockedError when another process holds
    it. Yields the lock file's path."""
    path = lock_path(work_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainLockedError(
                f"another `train` is running in {work_dir} ({_owner(handle)}; lock {path}); wait for it to finish "
                "or stop it, then rerun: it resumes from the newest checkpoint"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
        handle.flush()
        yield path
    finally:
        handle.close()  # releases the lock
