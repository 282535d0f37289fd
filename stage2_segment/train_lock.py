"""One ``train`` per work dir at a time: an exclusive lock file that names its owner.

``train_lock(work_dir)`` takes ``<work_dir>/stage2/train.lock`` with ``fcntl.flock`` (exclusive, non-blocking) and
writes the owner's pid, host and start time into it. A second ``train`` on the same work dir stops at once with
``TrainLockedError`` naming that owner. The kernel drops the lock when its process ends, however it ends, so a lock
left by a killed ``train`` is stale by construction and the next ``train`` takes it over (the file stays; only the
lock on it counts). The lock must be on a file system with working ``flock`` (local disks, NFSv4).

With an object-store work dir (``s3://``) each machine has its own mirror, so ``store_train_lock`` also takes a lease
object beside the store's copy of that file (``stage2/.leases/train.lease.json``, ``shared.object_leases``: conditional
writes, a heartbeat while training runs). A ``train`` on another machine stops with ``TrainLockedError`` naming the
holder; a lease whose heartbeat stopped (a killed ``train``) is taken over after ``stage1.lease_timeout_s``.
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
from typing import Any

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


@contextmanager
def store_train_lock(config: Any) -> Iterator[None]:
    """With an object-store work dir, hold its training lease for the ``with`` block (nothing for a local work dir);
    raises TrainLockedError naming the live holder on any machine."""
    store = config.work_store
    if store is None:
        yield
        return
    from shared.leases import lease_path
    from shared.object_leases import ObjectLeases

    path = lock_path(config.work_dir)
    with ObjectLeases(store, config.stage1.lease_timeout_s) as leases:
        if not leases.acquire(path):
            holder = leases.holder(path) or {}
            raise TrainLockedError(
                f"another `train` is running on {store.url(config.work_dir)} (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}; lease {store.url(lease_path(path))}); wait for it to finish or stop it, "
                f"then rerun: it resumes from the newest published checkpoint"
            )  # fmt: skip
        try:
            yield
        finally:
            leases.release(path)
