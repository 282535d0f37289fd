"""Stage-2 training on an ``s3://`` work dir against a real S3-compatible server (moto on 127.0.0.1): the stage-1
shards come from the store, rank 0 publishes each checkpoint (its ``COMPLETE`` marker last) and the export; a run
SIGKILLed after its first published checkpoint is resumed on another machine (a fresh mirror) from that checkpoint, and
continues with the losses the killed run had. The store's training lease keeps a second machine's ``train`` out while
one runs, and is taken over from a killed one."""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from s3_server import BUCKET
from shared.config import PathsConfig
from shared.object_store import ObjectStore
from stage2_fixtures import KILL_SCRIPT, RUN_KEY, kill_tree, stage2_world
from stage2_segment.checkpoint import COMPLETE_MARKER
from stage2_segment.train import read_metrics, train, train_output_dir
from stage2_segment.train_lock import TrainLockedError, store_train_lock

PREFIX = "train-s3"


def on_store(world, mirror: Path):
    """(config, sources) of a machine whose mirror is ``mirror``: the work dir on the store, the shards read there."""
    config = world.config(iterations=20)
    config = dataclasses.replace(config, paths=PathsConfig(data_root=str(world.data_root), mirror_dir=str(mirror),
                                                           work_dir=f"s3://{BUCKET}/{PREFIX}"))  # fmt: skip
    sources = [dataclasses.replace(s, shard_dir=mirror / s.shard_dir.relative_to(world.work_dir))
               for s in world.train_sources]  # fmt: skip
    return config, sources


def test_training_checkpoints_on_s3_resume_on_another_machine(s3_server, ray_cluster, tmp_path_factory):
    world = stage2_world(tmp_path_factory.getbasetemp() / "stage2")
    uploader = ObjectStore(f"s3://{BUCKET}/{PREFIX}", world.work_dir)  # stage 1 ran elsewhere and published its run
    assert uploader.push_tree(world.work_dir / "stage1" / RUN_KEY) > 0
    root = tmp_path_factory.mktemp("train-s3")
    config, sources = on_store(world, root / "mirror-a")
    output = train_output_dir(config, sources).relative_to(config.work_dir).as_posix()
    arguments = root / "args.pkl"
    arguments.write_bytes(pickle.dumps((config, sources)))
    log_path = root / "killed.log"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(arguments)], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    published = lambda: [k for k in s3_server.keys(f"{PREFIX}/{output}/checkpoints/") if k.endswith(COMPLETE_MARKER)]  # noqa: E731
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None and not published():
            time.sleep(0.05)
    finally:
        kill_tree(process)
    at_kill = published()
    assert at_kill, log_path.read_text()[-3000:]
    assert not [k for k in s3_server.keys(f"{PREFIX}/{output}/final/")], "finished before the kill: lengthen the run"
    last = max(int(k.split("/step_")[1].split("/")[0]) for k in at_kill)
    for marker in at_kill:  # a published marker sits over the checkpoint's files
        folder = marker.rsplit("/", 1)[0]
        assert {f"{folder}/checkpoint.json", f"{folder}/{COMPLETE_MARKER}"} <= set(s3_server.keys(folder + "/"))

    lease = f"{PREFIX}/stage2/.leases/train.lease.json"
    assert s3_server.keys(f"{PREFIX}/stage2/.leases/") == [lease]  # the killed run's, its owner gone: taken over
    config_b, sources_b = on_store(world, root / "mirror-b")  # another machine: an empty mirror
    result = train(config_b, sources_b)
    assert s3_server.keys(f"{PREFIX}/stage2/.leases/") == []
    assert (result.final_step, result.resumed_from_step, result.steps_done) == (20, last, 20 - last)
    keys = s3_server.keys(f"{PREFIX}/{output}/")
    assert f"{PREFIX}/{output}/final/{COMPLETE_MARKER}" in keys and f"{PREFIX}/{output}/metrics.jsonl" in keys
    steps = sorted({int(k.split("/step_")[1].split("/")[0]) for k in keys if "/checkpoints/step_" in k})
    assert steps[-1] == 20 and len(steps) <= config.stage2.keep_checkpoints  # pruned on the store too

    records = read_metrics(result.output_dir)
    starts = [k for k, record in enumerate(records) if record.get("event") == "start"]
    assert [records[k]["resumed_from_step"] for k in starts][-1] == last
    assert [r["step"] for r in records[starts[-1] + 1 :]] == list(range(last + 1, 21))
    killed = {r["step"]: r["loss"] for r in records[: starts[-1]] if "step" in r}
    resumed = {r["step"]: r["loss"] for r in records[starts[-1] + 1 :]}
    assert max(killed) == last and min(resumed) == last + 1  # the store's metrics end at its last checkpoint
    assert s3_server.keys(f"{PREFIX}/ray_results/"), "Ray Train's own storage is on the store too"

    fresh, fresh_sources = on_store(world, root / "mirror-c")  # a third machine finds the export on the store
    again = train(fresh, fresh_sources)
    assert (again.steps_done, again.final_step) == (0, 20)

    with store_train_lock(fresh):  # a live `train` on one machine keeps every other machine's out
        assert s3_server.keys(f"{PREFIX}/stage2/.leases/") == [lease]
        with pytest.raises(TrainLockedError, match=rf"another `train` is running on s3://{BUCKET}/{PREFIX} \(pid "
                                                   rf"{os.getpid()} on "):  # fmt: skip
            train(*on_store(world, root / "mirror-d"))
    assert s3_server.keys(f"{PREFIX}/stage2/.leases/") == []
