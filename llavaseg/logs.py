"""Where a command's output goes: the project's own lines on the console, everything else in a log file.

Without ``-v``, a command's file descriptors 1 and 2 are pointed at ``<work_dir>/logs/<command>-<time>.log``, so what
vLLM, Ray, torch, Triton and every child process (vLLM's engine core, Ray workers) print lands there. The console keeps
copies of the original descriptors: it shows the project's log lines (INFO, or only warnings and errors with ``-q``),
the progress bars and the final summary, with one plain format and repeated warnings shown once. Python warnings are
logged (to the file). With ``-v`` nothing is redirected and every logger prints to the console at DEBUG.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from shared.console import set_console

OWN_LOGGERS = ("llavaseg", "shared", "manifests", "stage1_reason", "stage2_segment", "bench")
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
THIRD_PARTY_ENV = {
    "VLLM_CONFIGURE_LOGGING": "1",  # vLLM logs to stdout (here: the log file), in the parent and its children
    "RAY_DEDUP_LOGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class OwnLines(logging.Filter):
    """The project's loggers only, each distinct warning once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] not in OWN_LOGGERS:
            return False
        if record.levelno >= logging.WARNING:
            key = (record.name, record.getMessage())
            if key in self.seen:
                return False
            self.seen.add(key)
        return True


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname.lower()}: {message}"
        return message


def log_path(work_dir: Path, command: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(work_dir) / "logs" / f"{command}-{stamp}-{os.getpid()}.log"


def _console_copy(fd: int) -> TextIO:
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")


def route_output(work_dir: Path | None, command: str, verbose: bool, quiet: bool) -> Path | None:
    """Set up logging for one command; returns the log file (None with ``-v`` or without a work dir)."""
    logging.captureWarnings(True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if verbose or work_dir is None:
        set_console(None, None, quiet=quiet)
        logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
                            format=FILE_FORMAT, datefmt="%H:%M:%S")  # fmt: skip
        if not verbose:
            for name in OWN_LOGGERS:
                logging.getLogger(name).setLevel(logging.INFO if not quiet else logging.WARNING)
        return None
    for key, value in THIRD_PARTY_ENV.items():
        os.environ.setdefault(key, value)
    path = log_path(work_dir, command)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    out, err = _console_copy(1), _console_copy(2)
    log_file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - open for the life of the process
    os.dup2(log_file.fileno(), 1)
    os.dup2(log_file.fileno(), 2)
    set_console(out, err, quiet=quiet)

    file_handler = logging.StreamHandler(log_file)
    file_handler.setFormatter(logging.Formatter(FILE_FORMAT))
    file_handler.setLevel(logging.INFO)
    console = logging.StreamHandler(err)
    console.setFormatter(ConsoleFormatter())
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.addFilter(OwnLines())
    root.setLevel(logging.INFO)
    root.addHandler(file_handler)
    root.addHandler(console)
    return path
