"""Training progress on the driver's console while Ray Train workers run: step, loss, samples/s and ETA.

The workers' own output goes to the command's log file; rank 0 appends one JSON record per step to ``metrics.jsonl``
(``stage2_segment.train``). ``watch_training`` follows that file from a background thread of the driver and moves one
progress bar (``shared.console.progress``: tqdm on a terminal, plain periodic lines in a log).
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from shared.console import progress

POLL_S = 1.0


def _new_records(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON lines appended after byte ``offset``; a torn last line waits for the next poll."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records, offset + end


class TrainingWatcher:
    def __init__(self, metrics_path: Path, total: int, start_step: int) -> None:
        self.metrics_path, self.total = Path(metrics_path), total
        self.offset = self.metrics_path.stat().st_size if self.metrics_path.is_file() else 0
        self.step = start_step
        self.bar = progress(total=total, desc="stage 2 train", unit="step", initial=start_step)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="training-progress", daemon=True)

    def poll(self) -> None:
        records, self.offset = _new_records(self.metrics_path, self.offset)
        for record in records:
            step = record.get("step")
            if not isinstance(step, int) or step <= self.step:
                continue  # a redone step after a resume, or an event record
            self.bar.update(step - self.step)
            self.step = step
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                                 samples_per_s=f"{record.get('samples_per_s', 0.0):.1f}")  # fmt: skip

    def _run(self) -> None:
        while not self.stop.wait(POLL_S):
            self.poll()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.poll()
        self.bar.close()


@contextmanager
def watch_training(metrics_path: Path, total: int, start_step: int = 0) -> Iterator[TrainingWatcher]:
    """Show training progress from ``metrics_path`` while the block runs (e.g. around ``trainer.fit()``)."""
    watcher = TrainingWatcher(metrics_path, total, start_step)
    watcher.thread.start()
    try:
        yield watcher
    finally:
        watcher.close()
