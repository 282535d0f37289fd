"""The console: where progress bars and summaries go, and progress that suits a terminal or a log.

The command line (``llavaseg.logs``) may point the console at the terminal while everything else a process and its
children print (vLLM, Ray, torch, Triton) goes to a log file; code of every stage writes its progress and summaries
through here so they reach the person running the job either way.

``progress`` is tqdm on a terminal; elsewhere (a pipe, a batch log) it writes a plain line every ``PLAIN_EVERY_S``
seconds and when it ends, with no carriage returns or colour codes.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, TextIO

PLAIN_EVERY_S = 30.0

_out: TextIO | None = None
_err: TextIO | None = None
_quiet = False


def set_console(out: TextIO | None, err: TextIO | None, quiet: bool = False) -> None:
    """Send summaries to ``out`` and progress to ``err`` (None: the process's current stdout / stderr); ``quiet``
    hides progress."""
    global _out, _err, _quiet
    _out, _err, _quiet = out, err, quiet


def console_out() -> TextIO:
    return _out or sys.stdout


def console_err() -> TextIO:
    return _err or sys.stderr


def echo(*parts: Any, err: bool = False) -> None:
    """print() to the console (stdout, or stderr with ``err``), flushed."""
    print(*parts, file=console_err() if err else console_out(), flush=True)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class PlainProgress:
    """tqdm's small API (iteration, update, set_postfix, close, context manager) as plain periodic lines."""

    def __init__(self, iterable: Iterable | None, desc: str, total: int | None, unit: str, stream: TextIO,
                 every_s: float = PLAIN_EVERY_S, initial: int = 0) -> None:  # fmt: skip
        self.iterable, self.desc, self.unit, self.stream, self.every_s = iterable, desc, unit, stream, every_s
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n, self.initial, self.postfix = total, initial, initial, ""
        self.started = self.last = time.monotonic()
        self.closed = False

    def _line(self, state: str = "") -> None:
        elapsed = time.monotonic() - self.started
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        speed = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        rate = f", {speed:.2f} {self.unit}/s" if speed else ""
        if speed and self.total is not None and self.n < self.total and not state:
            rate += f", ETA {(self.total - self.n) / speed:.0f}s"
        extra = f", {self.postfix}" if self.postfix else ""
        label = f" {state}" if state else ""
        print(f"{self.desc}: {count} {self.unit}{label} ({elapsed:.0f}s{rate}{extra})", file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._line()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        values = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or self.desc

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line("done")

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Silent(PlainProgress):
    def _line(self, state: str = "") -> None:
        return None


def progress(iterable: Iterable | None = None, *, desc: str = "", total: int | None = None, unit: str = "it",
             disable: bool = False, **tqdm_kwargs: Any) -> Any:  # fmt: skip
    """A progress bar over ``iterable`` on the console: tqdm on a terminal, plain periodic lines elsewhere."""
    stream = console_err()
    initial = int(tqdm_kwargs.pop("initial", 0))
    if disable or _quiet:
        return _Silent(iterable, desc, total, unit, stream, initial=initial)
    if _is_terminal(stream):
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, file=stream, dynamic_ncols=True, initial=initial,
                    **tqdm_kwargs)  # fmt: skip
    return PlainProgress(iterable, desc, total, unit, stream, initial=initial)
