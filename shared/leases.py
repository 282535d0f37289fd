"""Shard leases: several jobs (two ``reason`` commands, the tasks of a job array) share one run folder, and each shard is
written by one of them at a time, exactly once.

A lease is a small JSON file beside the shard's done marker, ``<folder>/.leases/<n>.lease.json``, naming its owner
(host, pid, the process's start time, the batch system's job id, a token unique to the job) and a ``heartbeat`` time that
a thread of the owner refreshes every ``timeout_s / 4`` (at most every 30 s) while it holds the lease::

    acquire   write the record to a temporary file, then os.link() it to the lease name: atomic, and it fails when a
              lease exists (O_CREAT|O_EXCL where the file system has no hard links). An existing lease is taken over
              only when it is stale: its heartbeat is older than ``timeout_s``, or its owner ran on this host and its
              process is gone (a SIGKILLed job's shards are taken over at once, not after the timeout).
    refresh, take over, release   rewrite or remove an existing lease only under a per-folder file lock
              (``.leases/.lock``, filelock), after checking who holds it; so two jobs never both take over one lease,
              and a job that lost its lease never removes its successor's.

A writer works on a shard only while it holds its lease and checks under the lease that the shard is still not done,
so a shard is never written twice. Temporary files (``.<name>.<host>-<pid>.tmp``, see ``shared.shards.temporary_path``)
of a shard are removed only by the job that holds, or took over, its lease; other temporary files only when their
writer is a dead process of this host or they are older than ``timeout_s``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from shared import shards

log = logging.getLogger(__name__)

LEASE_DIR = ".leases"  # hidden: readers of the folder skip it
LEASE_SUFFIX = ".lease.json"
LOCK_NAME = ".lock"
MAX_HEARTBEAT_S = 30.0
_SHARD_TEMP = re.compile(r"^\.?(?P<stem>\d{5})\.")  # .00000.parquet.<writer>.tmp, .00000.done.json..., .00000.gen...
_WRITER = re.compile(r"\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.tmp$")


@dataclass(frozen=True)
class JobSlice:
    """Task ``index`` of ``count`` (a job array): it takes shards index, index + count, ... of the run (numbered over
    every manifest in order, so the split is a function of the input only) and never another task's."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"--num-tasks must be at least 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"--task-index must be in 0..{self.count - 1} (--num-tasks {self.count}), got {self.index}")

    def takes(self, ordinal: int) -> bool:
        return ordinal % self.count == self.index

    def describe(self) -> str:
        return f"task {self.index} of {self.count}" if self.count > 1 else "whole run"


def lease_path(shard_path: Path) -> Path:
    """``<folder>/.leases/<n>.lease.json``: the lease of ``<folder>/<n>.parquet``."""
    return shard_path.parent / LEASE_DIR / (Path(shard_path.name).stem + LEASE_SUFFIX)


def host_name() -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", socket.gethostname()) or "host"


def _batch_job_id() -> str:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return env.get("SLURM_JOB_ID") or env.get("PBS_JOBID") or env.get("LSB_JOBID") or ""


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[19]) if len(fields) > 19 else None


def process_alive(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` of this host runs (a zombie or a new process with a reused pid does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust the signal check
    fields = stat.rsplit(")", 1)[-1].split()
    if fields and fields[0] in ("Z", "X"):
        return False
    return start is None or process_start(pid) == start


def read_lease(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_stale(path: Path, record: dict[str, Any] | None, timeout_s: float, now: float | None = None) -> bool:
    """A lease nobody keeps: heartbeat older than ``timeout_s``, or its owner a dead process of this host. An unreadable
    record (a half-written one, where there are no hard links) counts by the file's age."""
    now = time.time() if now is None else now
    if record is None:
        try:
            return now - path.stat().st_mtime > timeout_s
        except FileNotFoundError:
            return True
    if now - float(record.get("heartbeat", 0.0)) > timeout_s:
        return True
    return record.get("host") == host_name() and not process_alive(int(record.get("pid", -1)), record.get("start"))


def _describe(record: dict[str, Any] | None) -> str:
    if not record:
        return "an unknown job"
    job = f", job {record['job']}" if record.get("job") else ""
    return f"{record.get('host')} pid {record.get('pid')}{job}"


class ShardLeases:
    """The leases one job holds, refreshed by a heartbeat thread; use as a context manager (``close`` releases all).

    ``acquire(shard)`` -> True when the lease is now this job's (new, or taken over from a stale owner, whose
    temporary files of that shard are then removed); False while a live job holds it. ``holder(shard)`` is the live
    other owner's record, None when the lease is free, stale or ours.
    """

    def __init__(self, timeout_s: float, heartbeat_s: float | None = None) -> None:
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else min(MAX_HEARTBEAT_S, self.timeout_s / 4)
        pid = os.getpid()
        self.owner = {"host": host_name(), "pid": pid, "start": process_start(pid), "job": _batch_job_id(),
                      "token": uuid.uuid4().hex}  # fmt: skip
        self.taken_over: list[tuple[Path, dict[str, Any] | None]] = []  # (shard, previous owner)
        self.lost: list[Path] = []  # leases another job took over from us (we were stale: suspended, cut off)
        self._held: dict[Path, Path] = {}  # lease file -> shard
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ShardLeases:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _record(self) -> dict[str, Any]:
        return dict(self.owner, heartbeat=time.time())

    def _write_temp(self, lease: Path) -> Path:
        # the token keeps two lease sets of one process apart; host-pid lets a later job see that a writer killed
        # between this write and the rename is gone (``writer_gone``), so its temp file does not outlive it
        temp = lease.with_name(f".{lease.name}.{self.owner['token'][:12]}.{host_name()}-{os.getpid()}.tmp")
        temp.write_text(json.dumps(self._record(), sort_keys=True))
        return temp

    @staticmethod
    def _mutex(lease: Path) -> FileLock:
        return FileLock(str(lease.parent / LOCK_NAME), timeout=120)

    def _mine(self, record: dict[str, Any] | None) -> bool:
        return bool(record) and record.get("token") == self.owner["token"]

    def holds(self, shard_path: Path) -> bool:
        with self._guard:
            return lease_path(Path(shard_path)) in self._held

    def holder(self, shard_path: Path) -> dict[str, Any] | None:
        lease = lease_path(Path(shard_path))
        record = read_lease(lease)
        if not lease.exists() or self._mine(record) or is_stale(lease, record, self.timeout_s):
            return None
        return record or {}

    def acquire(self, shard_path: Path) -> bool:
        shard_path = Path(shard_path)
        lease = lease_path(shard_path)
        if self.holds(shard_path):
            return True
        lease.parent.mkdir(parents=True, exist_ok=True)
        temp = self._write_temp(lease)
        try:
            if not self._create(temp, lease):
                with self._mutex(lease):
                    previous = read_lease(lease)
                    if not is_stale(lease, previous, self.timeout_s):
                        return False
                    os.replace(temp, lease)
                log.warning("%s: took over the stale lease of %s", shard_path, _describe(previous))
                self.taken_over.append((shard_path, previous))
                clean_shard_temp_files(shard_path)
        finally:
            temp.unlink(missing_ok=True)
        with self._guard:
            self._held[lease] = shard_path
        self._start_heartbeat()
        return True

    def _create(self, temp: Path, lease: Path) -> bool:
        """Create ``lease`` from ``temp`` atomically; False when a lease exists."""
        try:
            os.link(temp, lease)
            return True
        except FileExistsError:
            return False
        except OSError as error:  # no hard links on this file system
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS):
                raise
        try:
            fd = os.open(lease, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(temp.read_text())
        return True

    def release(self, shard_path: Path) -> None:
        lease = lease_path(Path(shard_path))
        with self._guard:
            if self._held.pop(lease, None) is None:
                return
        with self._mutex(lease):
            if self._mine(read_lease(lease)):
                lease.unlink(missing_ok=True)

    def refresh(self) -> None:
        """One heartbeat: rewrite each held lease's time; a lease found in another job's hands is dropped (and logged)."""
        with self._guard:
            held = dict(self._held)
        for lease, shard_path in held.items():
            with self._mutex(lease):
                if not self._mine(read_lease(lease)):
                    lost = True
                else:
                    lost = False
                    temp = self._write_temp(lease)
                    os.replace(temp, lease)
            if lost:
                log.warning("%s: lost its lease to %s (this job missed its heartbeats)", shard_path,
                            _describe(read_lease(lease)))  # fmt: skip
                with self._guard:
                    self._held.pop(lease, None)
                self.lost.append(shard_path)

    def _start_heartbeat(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="shard-lease-heartbeat", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.refresh()
            except Exception as error:  # shared storage or object store hiccup: try again at the next beat
                log.warning("lease heartbeat failed: %s", error)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._guard:
            held = list(self._held.values())
        for shard_path in held:
            try:
                self.release(shard_path)
            except OSError as error:
                log.warning("%s: could not release its lease: %s", shard_path, error)


def clean_shard_temp_files(shard_path: Path) -> list[Path]:
    """Remove the temporary files of one shard (its own, its done marker's, its intermediates'); call it only while
    holding the shard's lease."""
    stem = Path(shard_path.name).stem
    removed = []
    for folder in (shard_path.parent, shard_path.parent / shards.DONE_DIR, shard_path.parent / shards.PARTIAL_DIR):
        if folder.is_dir():
            for path in folder.glob(f"*{stem}.*{shards.TMP_SUFFIX}"):
                match = _SHARD_TEMP.match(path.name)
                if match and match.group("stem") == stem:
                    path.unlink(missing_ok=True)
                    removed.append(path)
    return removed


def writer_gone(path: Path, timeout_s: float) -> bool:
    """Whether nobody writes temporary file ``path`` any more: its writer (host-pid in its name) is a dead process of
    this host, or it is older than ``timeout_s``."""
    match = _WRITER.search(path.name)
    if match and match.group("host") == host_name() and not process_alive(int(match.group("pid"))):
        return True
    try:
        return time.time() - path.stat().st_mtime > timeout_s
    except FileNotFoundError:
        return False


def clean_temp_files(run_dir: Path, timeout_s: float, shard_of: Callable[[Path], Path | None] | None = None) -> list[Path]:
    """Remove the temporary files and stale leases that no live job needs, under ``run_dir``.

    A shard's temporary file goes when the shard's lease is free or stale (a writer holds the lease while it writes);
    any other temporary file when ``writer_gone``. Another running job's files stay.
    """
    shard_of = shard_of or _shard_of
    removed = []
    if not run_dir.is_dir():
        return removed
    for path in sorted(run_dir.rglob(f"*{shards.TMP_SUFFIX}")):
        if path.parent.name == LEASE_DIR:
            gone = writer_gone(path, timeout_s)
        else:
            shard_path = shard_of(path)
            if shard_path is None:
                gone = writer_gone(path, timeout_s)
            else:
                lease = lease_path(shard_path)
                gone = not lease.exists() or is_stale(lease, read_lease(lease), timeout_s)
        if gone:
            path.unlink(missing_ok=True)
            removed.append(path)
    for lease in sorted(run_dir.rglob(f"{LEASE_DIR}/*{LEASE_SUFFIX}")):
        with FileLock(str(lease.parent / LOCK_NAME), timeout=120):
            if lease.exists() and is_stale(lease, read_lease(lease), timeout_s):
                lease.unlink(missing_ok=True)
                removed.append(lease)
    return removed


def _shard_of(temp: Path) -> Path | None:
    """The shard a temporary file belongs to (``<folder>/<n>.parquet``), None for run-level files."""
    match = _SHARD_TEMP.match(temp.name)
    if not match:
        return None
    folder = temp.parent.parent if temp.parent.name in (shards.DONE_DIR, shards.PARTIAL_DIR) else temp.parent
    return folder / shards.shard_name(int(match.group("stem")))
