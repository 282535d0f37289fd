"""How stage 1 works through its pending shards: per-phase loops with engine restarts, inside rounds that share the run
folder with other jobs through shard leases (``shared.leases``).

A round runs the generation phase over the free pending shards that lack generation (each step first claims the
shard's lease, and keeps it), then the embedding phase over the shards this job holds or can claim with finished
generation (each step releases the lease once the shard is done). A shard a live job holds is skipped; when a round
leaves shards unfinished, the job waits for their holders, and a later round takes over a lease gone stale (its holder
killed, its node lost). Under the lease a shard is checked again, so a shard another job finished meanwhile is counted
as theirs and never written twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from shared import shards
from shared.console import progress as tqdm  # tqdm on a terminal, plain lines in a log
from shared.leases import ShardLeases
from shared.processes import STOPPING, terminate_pids
from stage1_reason.engine_health import EngineFailure

log = logging.getLogger(__name__)

ROUNDS_WITHOUT_PROGRESS = 3  # free shards that stay unfinished this many rounds in a row: a bug, not a wait


@dataclass
class EngineLifecycle:
    """The engines one phase of this job started and closed, and the seconds that took (the rest is shard work)."""

    starts: int = 0
    start_seconds: float = 0.0
    close_seconds: float = 0.0

    def start(self, make_engine: Callable[[], Any]) -> Any:
        began = time.perf_counter()
        engine = make_engine()
        self.starts += 1
        self.start_seconds += time.perf_counter() - began
        return engine

    def close(self, engine: Any) -> None:
        began = time.perf_counter()
        engine.close()
        self.close_seconds += time.perf_counter() - began

    @property
    def seconds(self) -> float:
        return self.start_seconds + self.close_seconds

    def as_dict(self) -> dict[str, Any]:
        return {"starts": self.starts, "start_s": round(self.start_seconds, 2), "close_s": round(self.close_seconds, 2)}


def run_with_restarts(
    tasks: list[Any], label: str, engine: Any, make_engine: Any, step: Any, max_restarts: int,
    lifecycle: EngineLifecycle | None = None,
) -> tuple[list[Any], int]:
    """``step(task, engine)`` for each task, in order; returns the results and how many engines were restarted.

    When the engine dies or stalls (``EngineFailure``) the shard in flight is left unfinished, the engine is closed and
    its processes ended, and a new engine redoes that shard; after ``max_restarts`` restarts in this phase, or for an
    engine passed in by the caller (not ours to restart), the failure is raised with the count.
    """
    if not tasks:
        return [], 0
    own = engine is None
    restarts, results = 0, []
    lifecycle = lifecycle or EngineLifecycle()
    engine = engine or lifecycle.start(make_engine)
    try:
        for task in tqdm(tasks, desc=label, unit="shard"):
            while True:
                try:
                    results.append(step(task, engine))
                    break
                except EngineFailure as error:
                    if not own or restarts >= max_restarts or STOPPING.is_set():
                        raise EngineFailure(
                            f"{label}: {error}; stopped after {restarts} engine restart(s) "
                            f"(stage1.engine_restarts = {max_restarts}). {task.path} is not done; finished shards are "
                            "kept, and rerunning the command resumes"
                        ) from error
                    restarts += 1
                    log.warning("%s: %s; restarting the engine (%d of %d) and redoing %s", label, error, restarts,
                                max_restarts, task.path)  # fmt: skip
                    _discard(engine)
                    engine = None
                    engine, restarts = _restart(label, make_engine, lifecycle, restarts, max_restarts, task.path)
    finally:
        if own and engine is not None:
            lifecycle.close(engine)
    return results, restarts


def _restart(
    label: str, make_engine: Any, lifecycle: EngineLifecycle, restarts: int, max_restarts: int, shard: Any,
) -> tuple[Any, int]:
    """A new engine after a failure. A restart that dies while it starts (the OOM killer again, mid-start) uses up
    another restart; with none left, the start's error is raised with the count."""
    while True:
        try:
            return lifecycle.start(make_engine), restarts
        except Exception as error:
            if restarts >= max_restarts or STOPPING.is_set():
                raise EngineFailure(
                    f"{label}: the restarted engine failed to start: {error}; stopped after {restarts} engine "
                    f"restart(s) (stage1.engine_restarts = {max_restarts}). {shard} is not done; finished shards are "
                    "kept, and rerunning the command resumes"
                ) from error
            restarts += 1
            log.warning("%s: the restarted engine failed to start (%s); starting another (%d of %d)", label, error,
                        restarts, max_restarts)  # fmt: skip


def _discard(engine: Any) -> None:
    """Close a failed engine and end whatever is left of its processes."""
    pids = set(getattr(getattr(engine, "watchdog", None), "pids", set()))
    try:
        engine.close()
    except Exception as error:  # a dead engine may fail to close; its processes are ended below
        log.debug("closing a failed engine: %s", error)
    terminate_pids(pids)


def _done_marker_identity(shard_path: Path) -> tuple[int, int] | None:
    try:
        stat = shards.done_path(shard_path).stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


@dataclass(frozen=True)
class FinishedCheck:
    """Whether a pending shard is finished: done, and for a shard this job redoes (``--overwrite``, engine-side
    errors, changed inputs), done by a new done marker (the one seen when the job planned is in ``redo``)."""

    run_key: str
    redo: dict[str, tuple[int, int] | None] = field(default_factory=dict)  # shard path -> its done marker's (inode, mtime)
    refresh: Callable[[Path], None] | None = None  # brings a shard's published state into the mirror (object store)

    @staticmethod
    def marker(shard_path: Path) -> tuple[int, int] | None:
        return _done_marker_identity(shard_path)

    def __call__(self, task: Any) -> bool:
        path = Path(task.path)
        if self.refresh is not None:
            self.refresh(path)
        if not shards.is_done(path, task.sample_ids, expected_run_key=self.run_key):
            return False
        return task.path not in self.redo or _done_marker_identity(path) != self.redo[task.path]


@dataclass
class ShardClaims:
    """This job's claims on its pending shards: a step runs only on a shard whose lease it holds and that is not
    finished. ``poll_s``: how often a job waiting for other jobs' shards looks again."""

    leases: ShardLeases
    finished: Callable[[Any], bool]
    poll_s: float = 2.0
    written: int = 0  # shards this job wrote
    publish: Callable[[Path], None] | None = None  # uploads a written shard, then its done marker (object store)

    def claim(self, task: Any) -> bool:
        path = Path(task.path)
        if not self.leases.acquire(path):
            return False
        if self.finished(task):  # another job finished it since this one planned
            self.leases.release(path)
            return False
        return True

    def generating(self, step: Callable[[Any, Any], int], has_generation: Callable[[Any], bool]):
        """The generation step on claimed shards only; the lease is kept for the embedding phase."""

        def run(task: Any, engine: Any) -> int:
            if not self.claim(task) or has_generation(task):
                return 0
            return step(task, engine)

        return run

    def embedding(self, step: Callable[[Any, Any], Any], has_generation: Callable[[Any], bool]):
        """The embedding step on held or claimed shards with finished generation; None for a shard it skipped."""

        def run(task: Any, engine: Any) -> Any:
            path = Path(task.path)
            if not self.leases.holds(path) and not self.claim(task):
                return None
            if not has_generation(task):  # its generator died before finishing it: the next round generates it
                self.leases.release(path)
                return None
            stats = step(task, engine)
            if self.publish is not None:
                self.publish(path)
            self.written += 1
            self.leases.release(path)
            return stats

        return run

    def free(self, tasks: list[Any]) -> list[Any]:
        """The tasks no live job holds (free, stale, or ours)."""
        return [t for t in tasks if self.leases.holder(Path(t.path)) is None]

    def embeddable(self, tasks: list[Any], has_generation: Callable[[Any], bool]) -> list[Any]:
        """The tasks this job holds, or no live job holds and whose generation is finished."""
        return [t for t in tasks if self.leases.holds(Path(t.path))
                or (self.leases.holder(Path(t.path)) is None and has_generation(t))]

    def work_through(self, pending: list[Any], run_round: Callable[[list[Any]], list[Any]]) -> list[Any]:
        """``run_round(tasks)`` over the free pending tasks, again until every pending task is finished (by this job or
        another); returns what the rounds returned, Nones left out."""
        results, remaining, stuck, waiting_for = [], list(pending), 0, None
        while remaining:
            free = self.free(remaining)
            if free:
                results += [r for r in run_round(free) if r is not None]
            unfinished = [t for t in remaining if not self.finished(t)]
            stuck = stuck + 1 if free and len(unfinished) == len(remaining) else 0
            if stuck >= ROUNDS_WITHOUT_PROGRESS:
                raise RuntimeError(f"stage 1: {len(unfinished)} shards stayed unfinished after {stuck} rounds, e.g. "
                                   f"{unfinished[0].path}")  # fmt: skip
            remaining = unfinished
            if remaining and not self.free(remaining):
                holders = sorted({_owner(self.leases.holder(Path(t.path))) for t in remaining})
                if holders != waiting_for:
                    log.info("waiting for %d shard(s) that other jobs are writing (%s)", len(remaining),
                             "; ".join(holders))  # fmt: skip
                    waiting_for = holders
                time.sleep(self.poll_s)
        return results


def _owner(record: dict[str, Any] | None) -> str:
    if not record:
        return "released"
    return f"{record.get('host')} pid {record.get('pid')}" + (f" job {record['job']}" if record.get("job") else "")


def poll_interval(timeout_s: float) -> float:
    return min(5.0, max(0.2, timeout_s / 10))
