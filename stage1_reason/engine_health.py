"""Engine failures are not row failures: telling a dead or stalled vLLM engine from a bad row.

A row fault (an unreadable image, an over-long prompt) becomes that row's error. An engine fault (its worker killed by
the OOM killer, its core process gone, no progress at all for ``stall_timeout_s``) raises ``EngineFailure``: the shard
in flight is not written, and the job restarts the engine a bounded number of times or stops with a non-zero exit.

``EngineWatchdog`` watches the engine's child processes while a call into the engine is in flight. vLLM can block for
ever waiting on a dead core's output queue, so on a death or a stall the watchdog interrupts the main thread with a
signal whose handler raises ``EngineFailure`` there. The watchdog only arms in the main thread (signals are delivered
there); elsewhere (e.g. a Ray actor's thread) death is still recognised from vLLM's own exceptions.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator

logger = logging.getLogger(__name__)

POLL_S = 0.5
WAKE_SIGNAL = signal.SIGUSR1
TRANSIENT_ERROR_PREFIX = "vLLM generation failed"  # per-row errors of the engine, not of the row: retried on a rerun


def is_transient_error(error: str | None) -> bool:
    """Whether a row's error came from the engine (a rerun may succeed) rather than from the row itself."""
    return bool(error) and error.startswith((TRANSIENT_ERROR_PREFIX, "vLLM embedding failed"))


class EngineFailure(RuntimeError):
    """The engine itself failed (died or stalled); nothing about the rows in flight is known."""


def is_engine_death(error: BaseException) -> bool:
    """Whether ``error`` (or its cause) says the engine is gone rather than that a request was bad."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, EngineFailure) or type(error).__name__ in ("EngineDeadError", "EngineCoreDeadError"):
            return True
        error = error.__cause__ or error.__context__
    return False


def _children() -> dict[int, float]:
    """pid -> CPU seconds of every descendant process."""
    import psutil

    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            found[child.pid] = times.user + times.system
        except psutil.Error:
            continue
    return found


def descendant_pids() -> set[int]:
    return set(_children())


def engine_processes(before: set[int]) -> set[int]:
    """The vLLM processes (``VLLM::EngineCore``, ``VLLM::Worker...``) among descendants that are not in ``before``."""
    import psutil

    found = set()
    for pid in descendant_pids() - before:
        try:
            title = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            continue
        if title.startswith("VLLM"):
            found.add(pid)
    return found


class EngineWatchdog:
    """Watches an engine's processes; interrupts the main thread when one dies or all stop using CPU time."""

    def __init__(self, pids: set[int], stall_timeout_s: float = 0.0) -> None:
        self.stall_timeout_s = stall_timeout_s
        self.pids = set(pids)
        self.problem: str | None = None

    def _check(self, cpu_at: dict[int, float], last_progress: float) -> tuple[str | None, dict[int, float], float]:
        now = _children()
        gone = sorted(self.pids - set(now))
        if gone:
            return f"engine process(es) {gone} died", now, last_progress
        used = sum(now.get(pid, 0.0) for pid in self.pids) - sum(cpu_at.get(pid, 0.0) for pid in self.pids)
        if used > 0.01:
            last_progress = time.monotonic()
        elif self.stall_timeout_s and time.monotonic() - last_progress > self.stall_timeout_s:
            return f"engine stalled: no CPU time used for {self.stall_timeout_s:.0f}s", now, last_progress
        return None, now, last_progress

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Run the block under watch. Raises EngineFailure when the engine died or stalled during it."""
        if threading.current_thread() is not threading.main_thread() or not self.pids:
            yield
            return
        stop = threading.Event()
        main = threading.main_thread().ident

        def wake(signum: int, frame: object) -> None:
            raise EngineFailure(self.problem or "engine failed")

        def watch() -> None:
            cpu_at, last_progress = _children(), time.monotonic()
            while not stop.wait(POLL_S):
                problem, cpu_at, last_progress = self._check(cpu_at, last_progress)
                if problem:
                    self.problem = problem
                    logger.warning("%s; interrupting the call into the engine", problem)
                    signal.pthread_kill(main, WAKE_SIGNAL)
                    return

        previous = signal.signal(WAKE_SIGNAL, wake)
        thread = threading.Thread(target=watch, name="engine-watchdog", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)
            signal.signal(WAKE_SIGNAL, previous)
        if self.problem:
            raise EngineFailure(self.problem)

    def alive(self) -> bool:
        return not (self.pids - set(_children()))
