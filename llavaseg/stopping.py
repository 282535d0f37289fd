"""How a command stops: SIGTERM and Ctrl-C end the job cleanly, with exit 143 / 130, one line, and no child left.

``install()`` makes SIGTERM raise ``Terminated`` in the main thread (so engines and Ray clusters are closed on the way
out) and end the job's child processes from a thread (while Ray is connected, only if the main thread's
``ray.shutdown()`` has not run in time: Ray's driver can exit with 1 when its raylet dies under it). Some libraries
swallow an exception raised inside their blocking calls (pyzmq's poll while vLLM waits up to ten minutes for its engine
to start), so ``STOPPING`` tells the command the job was terminated whatever exception reaches it, and if the main
thread has not unwound after ``SIGTERM_GRACE_S`` the process exits with 143 all the same: finished shards and
checkpoints are complete files, written by rename.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from shared.console import echo
from shared.processes import STOPPING, terminate_descendants

SIGTERM_GRACE_S = 20.0
RESUME_HINT = "finished shards and checkpoints are kept, rerun the same command to resume"

_main_done = threading.Event()
_log_file: Path | None = None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread."""


def install(log_file: Path | None) -> None:
    global _log_file
    _log_file = log_file
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: object) -> None:
    if STOPPING.is_set():
        return
    STOPPING.set()
    threading.Thread(target=_end_children_then_exit, name="sigterm", daemon=True).start()
    raise Terminated()


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")
    try:
        return bool(ray is not None and ray.is_initialized())
    except Exception:  # a half-imported or shutting-down Ray: treat it as connected, the grace covers it
        return True


def _end_children_then_exit() -> None:
    if _ray_connected():
        # A Ray driver whose raylet dies under it can quit at once with exit 1 ("the local Raylet is dead"), before the
        # main thread has unwound: the main thread's ray.shutdown() ends Ray's processes; they are ended here only
        # if it has not unwound in time, and then the line is said first.
        if not _main_done.wait(SIGTERM_GRACE_S):
            _say_and_exit(then_end_children=True)
        return
    terminate_descendants()  # a main thread blocked on a child's output (vLLM's engine) is freed by its end
    if not _main_done.wait(SIGTERM_GRACE_S):
        _say_and_exit(then_end_children=False)


def _say_and_exit(then_end_children: bool) -> None:
    echo(f"terminated; {RESUME_HINT}", err=True)
    if _log_file:
        echo(f"log: {_log_file}", err=True)
    if then_end_children:
        terminate_descendants()
    os._exit(143)


def stopped(code: int) -> int:
    """End what is left of the job's child processes; say so in one line. ``code``: 143 (SIGTERM) or 130 (Ctrl-C)."""
    STOPPING.set()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the clean-up short
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    what = "terminated" if code == 143 else "interrupted"
    left = terminate_descendants()
    extra = f"; ended {len(left)} child process(es)" if left else ""
    echo(f"{what}{extra}; {RESUME_HINT}", err=True)
    return code


def main_done() -> None:
    _main_done.set()
