"""Console progress: plain periodic lines off a terminal (no carriage returns), and training progress from metrics."""

from __future__ import annotations

import io
import json
import re

from shared import console
from stage2_segment.train_progress import watch_training


def test_plain_progress_writes_whole_lines_with_rate_and_eta():
    stream = io.StringIO()
    console.set_console(None, stream)
    try:
        bar = console.progress(total=10, desc="work", unit="step", initial=2)
        bar.every_s = 0.0  # a line on every update
        bar.update(3)
        bar.set_postfix(loss="0.5")
        bar.close()
        bar.close()  # once only
        for _ in console.progress(range(4), desc="loop", unit="item"):
            pass
    finally:
        console.set_console(None, None)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 3
    assert re.fullmatch(r"work: 5/10 step \(\d+s, [\d.]+ step/s, ETA \d+s\)", lines[0]), lines[0]
    assert re.fullmatch(r"work: 5/10 step done \(\d+s, [\d.]+ step/s, loss=0.5\)", lines[1]), lines[1]
    assert re.fullmatch(r"loop: 4/4 item done \(\d+s(, [\d.]+ item/s)?\)", lines[2]), lines[2]


def test_quiet_console_hides_progress():
    stream = io.StringIO()
    console.set_console(None, stream, quiet=True)
    try:
        assert list(console.progress(range(3), desc="x")) == [0, 1, 2]
    finally:
        console.set_console(None, None)
    assert stream.getvalue() == ""


def test_training_progress_follows_the_metrics_file(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 3, "loss": 9.0}) + "\n")  # an earlier attempt: not counted again
    stream = io.StringIO()
    console.set_console(None, stream)
    try:
        with watch_training(metrics, total=6, start_step=3) as watcher:
            with open(metrics, "a") as f:
                f.write(json.dumps({"event": "start", "resumed_from_step": 3}) + "\n")
                for step in (4, 5):
                    f.write(json.dumps({"step": step, "loss": 1.0 / step, "samples_per_s": 8.0}) + "\n")
                f.write('{"step": 6, "lo')  # torn: waits for the rest
            watcher.poll()
            assert watcher.step == 5
            with open(metrics, "a") as f:
                f.write('ss": 0.1, "samples_per_s": 8.0}\n')
    finally:
        console.set_console(None, None)
    assert watcher.step == 6
    (line,) = stream.getvalue().splitlines()
    assert re.fullmatch(r"stage 2 train: 6/6 step done \(\d+s, [\d.]+ step/s, loss=0.1000, samples_per_s=8.0\)", line), line
