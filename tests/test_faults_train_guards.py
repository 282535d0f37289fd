"""Faults injected into stage-2 training: a non-finite loss, unfinished stage-1 shards, a second ``train`` on the same
work dir. Each must stop clearly and lose nothing that was finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from shared.shards import done_path, embeddings_to_arrow, list_shards, write_shard
from stage2_fixtures import DIM, RUN_KEY, stage2_world, write_synthetic_shards
from stage2_segment.checkpoint import WEIGHTS_FILE, is_complete, list_complete
from stage2_segment.data import MixtureSampler, Stage2Source, build_index
from stage2_segment.optim import TrainingDivergedError
from stage2_segment.train import CHECKPOINTS_DIR, FINAL_DIR, read_metrics, train, train_name, train_output_dir
from stage2_segment.train_inputs import PartialDataError
from stage2_segment.train_lock import TrainLockedError, lock_path, train_lock

ITERATIONS, CHECKPOINT_EVERY = 10, 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return stage2_world(tmp_path_factory.getbasetemp() / "stage2")


def _source(world, run_dir, shard_size=8) -> Stage2Source:
    manifest = world.train_sources[0].manifest
    shard_dir = write_synthetic_shards(manifest, run_dir, "reasonseg/train", shard_size=shard_size)
    return Stage2Source("reasonseg/train", manifest, shard_dir, RUN_KEY)


def _first_drawn_step(config, source, last_step):
    """(sample id, the first step at which a worker draws it), for the sample drawn first as late as possible."""
    index = build_index([source])
    sampler = MixtureSampler(index.table["family"].to_pylist(), index.table["dataset"].to_pylist(),
                             config.data.sample_rates, config.stage2.seed)  # fmt: skip
    first = {}
    per_rank = config.stage2.global_batch // config.ray.num_workers
    for step in range(1, last_step + 1):
        for rank in range(config.ray.num_workers):
            for i in sampler.draw(step, rank, per_rank):
                first.setdefault(int(i), step)
    candidates = [(step, i) for i, step in first.items() if 3 <= step <= last_step]
    step, i = max(candidates)
    return index.table["sample_id"][i].as_py(), step


def _poison(source, sample_id):
    """Rewrite the shard holding ``sample_id`` with a NaN embedding for it (a new, valid done marker)."""
    for path in list_shards(source.shard_dir):
        table = pq.read_table(path)
        ids = table["sample_id"].to_pylist()
        if sample_id in ids:
            row = ids.index(sample_id)
            embeddings = [np.asarray(table["embedding"][k].as_py(), np.float16).reshape(-1, DIM)
                          for k in range(len(ids))]  # fmt: skip
            embeddings[row][:] = np.nan
            column = table.schema.get_field_index("embedding")
            table = table.set_column(column, table.schema.field(column), embeddings_to_arrow(embeddings, DIM))
            write_shard(pa.table(table.columns, schema=table.schema), path, {"synthetic": True})
            return
    raise AssertionError(sample_id)


def test_a_non_finite_loss_stops_training_keeps_the_last_finite_checkpoint_and_exports_nothing(
    world, ray_cluster, tmp_path
):
    config = world.config(work_dir=tmp_path / "work", iterations=ITERATIONS, checkpoint_every=CHECKPOINT_EVERY,
                          keep_checkpoints=0)  # fmt: skip
    source = _source(world, tmp_path / "stage1")
    sample_id, bad_step = _first_drawn_step(config, source, ITERATIONS - 1)
    _poison(source, sample_id)
    output_dir = train_output_dir(config, [source])

    with pytest.raises(TrainingDivergedError) as err:
        train(config, [source])
    kept = [step for step in range(CHECKPOINT_EVERY, bad_step, CHECKPOINT_EVERY)]
    last = output_dir / CHECKPOINTS_DIR / f"step_{kept[-1]:06d}"
    text = str(err.value)
    assert f"stopped at step {bad_step}: non-finite training values (loss nan" in text
    assert f"nothing was exported; last finite checkpoint kept: {last}" in text
    assert [step for step, _ in list_complete(output_dir / CHECKPOINTS_DIR)] == kept
    assert not is_complete(output_dir / FINAL_DIR) and not (output_dir / FINAL_DIR).exists()
    weights = load_file(str(last / WEIGHTS_FILE))
    assert all(bool(torch.isfinite(tensor).all()) for tensor in weights.values())
    steps = [record["step"] for record in read_metrics(output_dir) if "step" in record]
    assert steps == list(range(1, bad_step))  # the non-finite step is not logged as a step
    assert json.loads((output_dir / "diverged.json").read_text())["step"] == bad_step


def test_unfinished_shards_stop_training_unless_allowed_and_change_the_identity(world, ray_cluster, tmp_path):
    config = world.config(work_dir=tmp_path / "work", iterations=2, checkpoint_every=2, bce_weight=float("nan"))
    source = _source(world, tmp_path / "stage1", shard_size=4)
    shards = list_shards(source.shard_dir)
    full_name = train_name(config, [source])
    marker = done_path(shards[1])
    saved = marker.read_bytes()
    marker.unlink()  # what a killed `reason` leaves: the shard without its done marker
    rows = pq.read_metadata(shards[1]).num_rows
    with pytest.raises(PartialDataError) as err:
        train(config, [source])
    assert str(err.value).startswith(
        f"stage 1 has not finished the training data: reasonseg/train: 1 unfinished stage-1 shards, {rows} manifest "
        f"rows without a stage-1 row"
    )
    assert "--allow-partial" in str(err.value)
    assert not (config.work_dir / "stage2" / train_name(config, [source]) / CHECKPOINTS_DIR).exists()
    partial_name = train_name(config, [source])
    assert partial_name != full_name  # the shards used are part of the identity

    with pytest.raises(TrainingDivergedError, match=r"stopped at step 1: .*last finite checkpoint kept: none"):
        train(config, [source], allow_partial=True)  # the check passes; the NaN loss weight stops step 1
    marker.write_bytes(saved)  # stage 1 finishes the shard: new data, a new training
    assert train_name(config, [source]) == full_name != partial_name


def test_a_second_train_on_the_same_work_dir_stops_naming_the_first(world, tmp_path):
    work = tmp_path / "work"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom stage2_segment.train_lock import train_lock\n"
         "with train_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n", str(work)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = world.config(work_dir=work)
        started = time.monotonic()
        with pytest.raises(TrainLockedError) as err:
            train(config, world.train_sources)
        assert time.monotonic() - started < 10  # stops at once, before any data or Ray work
        assert f"another `train` is running in {work} (pid {holder.pid} on " in str(err.value)
        assert not (work / "stage2" / train_name(config, world.train_sources)).exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed holder's lock is stale: the next train takes it over and names itself.
    with train_lock(work) as path:
        assert path == lock_path(work) and json.loads(path.read_text())["pid"] == os.getpid()
