"""Which stage-1 shards a training reads: complete data unless asked otherwise, and their identity.

``require_complete`` refuses to train while a train manifest has unfinished shards (no done marker) or rows that
stage 1 has not produced, unless ``allow_partial``; a model trained on part of the data would otherwise be reused as
if it were complete. ``shard_set`` lists the done shards of every source with their content checksums: it is part of
the training identity (``train.train_settings``), so new or rewritten shards mean a new training, not "already
trained".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from shared.shards import list_shards, read_done
from stage2_segment.data import JoinReport, Stage2Source

logger = logging.getLogger(__name__)


class PartialDataError(ValueError):
    """A train manifest whose stage-1 output is not complete; the message names each one."""


def require_complete(reports: Sequence[JoinReport], allow_partial: bool) -> None:
    """Raise PartialDataError naming every source with unfinished shards or manifest rows without a stage-1 row,
    unless ``allow_partial`` (then log a warning per source)."""
    partial = [r for r in reports if r.unfinished_shards or r.without_stage1_row]
    if not partial:
        return
    lines = [f"{r.spec}: {r.unfinished_shards} unfinished stage-1 shards, {r.without_stage1_row} manifest rows "
             f"without a stage-1 row ({r.joined} usable samples)" for r in partial]  # fmt: skip
    if allow_partial:
        for line in lines:
            logger.warning("training on partial data (--allow-partial): %s", line)
        return
    raise PartialDataError(
        "stage 1 has not finished the training data: " + "; ".join(lines)
        + ". Run `llavaseg reason` to finish it, or pass --allow-partial to train on what there is"
    )


def shard_set(sources: Sequence[Stage2Source]) -> list[dict]:
    """Per source, the done shards it reads: ``[[file name, content sha256 (or the ids digest of an older done
    file)], ...]``."""
    sets = []
    for source in sources:
        shards = []
        for path in list_shards(Path(source.shard_dir)) if Path(source.shard_dir).is_dir() else []:
            done = read_done(path)
            if done is not None:
                shards.append([path.name, done.get("content_sha256") or done.get("ids_digest")])
        sets.append({"spec": source.spec, "shards": shards})
    return sets
