"""The training log ``metrics.jsonl``: one JSON record per optimizer step (and per attempt's start), appended by rank
0 and read back by ``train``, the report and ``status``. A line torn by a killed writer loses only itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line; a line torn by a killed writer is ended first, so only that line is lost."""
    torn = False
    if path.is_file() and path.stat().st_size > 0:
        with path.open("rb") as tail:
            tail.seek(-1, 2)
            torn = tail.read(1) != b"\n"
    with path.open("a") as handle:
        handle.write(("\n" if torn else "") + json.dumps(record) + "\n")
        handle.flush()


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """Every record of ``metrics.jsonl`` (torn lines of a killed writer are skipped)."""
    path = Path(output_dir) / METRICS_FILE
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
