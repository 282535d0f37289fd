"""An ``s3://`` work dir against a real S3-compatible server (moto, on 127.0.0.1; tests/s3_server.py).

- Leases as objects: of two jobs one acquires; of eight jobs taking over one stale lease exactly one wins; a job never
  removes its successor's lease, and finds out at its next heartbeat that it lost it.
- Stage 1 through the CLI: a job SIGKILLed once its first shard is published, then a job on another machine (a fresh
  mirror) finishes the run. The store then holds every shard and done marker, no lease, and rows equal to an
  uninterrupted local run's.
- Stage 1 on Ray Data actors (``stage1.use_ray``): every shard published by the actors, none left half-way.
- ``infer --input s3://...``: the table and photos come from the store, stage 1 and the predictions go to an s3:// work
  dir, and another machine's rerun finds them all done there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

from shared import shards
from shared.leases import lease_path
from shared.object_leases import ObjectLeases
from shared.object_store import ObjectStore
from test_faults_stage1 import (  # noqa: F401  (demo, uninterrupted: the module fixtures, shared)
    RUN_TIMEOUT_S,
    SHARDS,
    Workspace,
    assert_same_rows,
    demo,
    shard_rows,
    start_reason,
    uninterrupted,
    write_config,
)
from s3_server import BUCKET
from test_infer_input import project  # noqa: F401  (the module fixture: a table of own photos and a checkpoint)


def test_leases_are_objects_taken_by_one_job(s3_server, tmp_path):
    store = ObjectStore(f"s3://{BUCKET}/leases", tmp_path / "mirror")
    shard = store.mirror / "run" / "m" / "00000.parquet"
    lease_key = f"leases/{lease_path(shard).relative_to(store.mirror).as_posix()}"
    with ObjectLeases(store, 60) as first, ObjectLeases(store, 60) as second:
        assert first.acquire(shard) and not second.acquire(shard)
        assert second.holder(shard)["token"] == first.owner["token"] and first.holder(shard) is None
        assert s3_server.keys("leases/") == [lease_key] and not lease_path(shard).exists()  # nothing in the mirror
        first.release(shard)
        assert s3_server.keys("leases/") == [] and second.acquire(shard)

    stale = ObjectLeases(store, timeout_s=2, heartbeat_s=3600)  # a job that stopped beating
    assert stale.acquire(shard)
    time.sleep(2.3)
    takers = [ObjectLeases(store, timeout_s=2, heartbeat_s=0.2) for _ in range(8)]
    won: list[bool] = [False] * len(takers)
    threads = [threading.Thread(target=lambda i=i: won.__setitem__(i, takers[i].acquire(shard))) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(won) == 1, won
    winner = takers[won.index(True)]
    assert [path for path, _ in winner.taken_over] == [shard] and winner.holds(shard)
    stale.release(shard)  # refused by the store: the successor's lease stays
    assert s3_server.keys("leases/") == [lease_key]
    assert takers[won.index(False)].holder(shard)["token"] == winner.owner["token"]

    other = store.mirror / "run" / "m" / "00001.parquet"
    assert stale.acquire(other)
    time.sleep(2.3)
    assert winner.acquire(other)  # taken over from the stale job
    stale.refresh()  # its conditional write is refused: it learns that it lost the lease, and drops it
    assert stale.lost == [other] and not stale.holds(other)
    assert takers[won.index(False)].holder(other)["token"] == winner.owner["token"]
    for taker in takers:
        taker.close()
    stale.close()
    assert s3_server.keys("leases/") == []


def s3_workspace(demo, name: str, mirror: str, tiny_llava_dir: Path) -> Workspace:
    """A config whose work dir is ``s3://<bucket>/<name>``, mirrored in ``<root>/<mirror>`` (one per machine), with the
    session's tiny LLaVA and the demo manifests in the mirror, as each machine would build them."""
    from shared.config import load_config
    from stage1_reason.run import run_dir_for

    root, data_root, manifests = demo
    mirror_dir = root / mirror
    (mirror_dir / "models").mkdir(parents=True)
    (mirror_dir / "models" / "tiny-llava").symlink_to(tiny_llava_dir, target_is_directory=True)
    shutil.copytree(manifests, mirror_dir / "manifests")
    config_path = write_config(root / f"{mirror}-config", data_root, f"s3://{BUCKET}/{name}")
    config_path.write_text(config_path.read_text().replace("[paths]\n", f"[paths]\nmirror_dir = {json.dumps(str(mirror_dir))}\n"))
    config = load_config(config_path)
    run_dir, key, _ = run_dir_for(config, str(tiny_llava_dir))
    return Workspace(config_path, config, run_dir, key)


def done_keys(s3_server, prefix: str) -> list[str]:
    return [k for k in s3_server.keys(prefix) if k.endswith(".done.json")]


def test_stage1_on_s3_killed_then_finished_on_another_machine(s3_server, demo, uninterrupted, tiny_llava_dir, tmp_path):
    reference, expected = uninterrupted
    first = s3_workspace(demo, "work1", "mirror-a", tiny_llava_dir)
    assert first.run_key == reference.run_key and first.config.work_dir == demo[0] / "mirror-a"
    run = first.run_dir.relative_to(first.config.work_dir).as_posix()  # stage1/<run name>
    prefix = f"work1/{run}/"
    log_path = tmp_path / "reason.log"
    proc = start_reason(first, log_path)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not done_keys(s3_server, prefix) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, log_path.read_text()[-3000:]
    published = done_keys(s3_server, prefix)
    assert 1 <= len(published) < SHARDS
    for marker in published:  # each published marker sits over its complete shard
        shard_key = marker.replace("/.done/", "/").replace(".done.json", ".parquet")
        assert shard_key in s3_server.keys(prefix)

    second = s3_workspace(demo, "work1", "mirror-b", tiny_llava_dir)  # another machine: nothing of the first's mirror
    proc = start_reason(second, log_path)
    assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, log_path.read_text()[-4000:]
    keys = s3_server.keys(prefix)
    assert len(done_keys(s3_server, prefix)) == SHARDS and len([k for k in keys if k.endswith(".parquet")]) == SHARDS
    assert not [k for k in keys if ".leases/" in k or k.endswith(".tmp") or ".partial/" in k], keys
    summary = json.loads(s3_server.client().get_object(Bucket=BUCKET, Key=prefix + "summary.json")["Body"].read())
    assert summary["job"]["shards_already_done"] == len(published), summary
    assert summary["job"]["shards_by_this_job"] == SHARDS - len(published), summary

    reader = ObjectStore(f"s3://{BUCKET}/work1", tmp_path / "reader")  # a third machine reads what the store holds
    run_dir = reader.mirror / run
    assert len(reader.pull(run_dir)) == len(keys)
    got = shard_rows(Workspace(first.config_path, first.config, run_dir, first.run_key))
    assert got.column("sample_id").to_pylist() == expected.column("sample_id").to_pylist()
    assert_same_rows(got, expected)
    assert not (run_dir / ".leases").exists()
    assert shards.read_done(run_dir / "reasonseg-val" / "00000.parquet")["rows"] >= 1


def test_stage1_on_ray_actors_publishes_every_shard_to_s3(s3_server, demo, uninterrupted, tiny_llava_dir, ray_cluster):
    """``stage1.use_ray`` with an s3:// work dir: the Ray Data actors take object leases, publish each shard (data,
    then done marker) and leave no intermediate on the store; another machine's mirror then finds every shard done."""
    import dataclasses

    from stage1_reason.run import run_stage1

    reference, expected = uninterrupted

    def on_ray(mirror: str):
        workspace = s3_workspace(demo, "work-ray", mirror, tiny_llava_dir)
        config = workspace.config
        config = dataclasses.replace(config, stage1=dataclasses.replace(config.stage1, use_ray=True, replicas=1))
        paths = sorted((config.work_dir / "manifests").glob("*.parquet"))
        manifests = [(path.stem.replace("-", "/", 1), path) for path in paths]
        return workspace, run_stage1(config, manifests)

    first, summary = on_ray("mirror-ray-a")
    assert summary.run_key == reference.run_key and summary.new_rows == expected.num_rows
    prefix = f"work-ray/{first.run_dir.relative_to(first.config.work_dir).as_posix()}/"
    keys = s3_server.keys(prefix)
    assert len(done_keys(s3_server, prefix)) == SHARDS and len([k for k in keys if k.endswith(".parquet")]) == SHARDS
    # the actors' intermediates are gone (pyarrow leaves the emptied folder's zero-byte "folder/" marker, not a file)
    assert not [k for k in keys if not k.endswith("/") and (".leases/" in k or k.endswith(".tmp") or ".partial/" in k)]

    second, again = on_ray("mirror-ray-b")  # another machine: everything is on the store
    assert again.new_rows == 0 and again.generated_samples == 0 and again.reused_rows == expected.num_rows
    got = shard_rows(second)
    assert got.column("sample_id").to_pylist() == expected.column("sample_id").to_pylist()
    assert_same_rows(got, expected)


def test_infer_input_from_s3_onto_an_s3_work_dir(s3_server, project, ray_cluster, vllm_generation_engine,
                                                 vllm_pooling_engine, tmp_path):  # fmt: skip
    """``infer --input s3://.../queries.csv``: the table and its photos are fetched, stage 1 and the predictions are
    published to the s3:// work dir (each prediction shard before its done marker), and a second machine's rerun
    finds every shard done on the store."""
    import dataclasses

    import pytest

    from llavaseg.infer_input import infer_input
    from shared.config import PathsConfig
    from shared.object_store import fetch_input

    base, table, config, checkpoint, sizes = project
    uploader = ObjectStore(f"s3://{BUCKET}/inputs", base)
    uploader.push(table)
    uploader.push_tree(base / "photos")
    with pytest.raises(ValueError, match=r"--input: 's3://llavaseg-test/inputs/nope.csv' does not exist"):
        fetch_input(f"s3://{BUCKET}/inputs/nope.csv", tmp_path)
    with pytest.raises(ValueError, match=r"--root: cannot open 'ftp://host/x'"):
        fetch_input("ftp://host/x", tmp_path, "--root")

    def on_store(mirror: Path):
        paths = PathsConfig(data_root=config.paths.data_root, work_dir=f"s3://{BUCKET}/own", mirror_dir=str(mirror))
        s3_config = dataclasses.replace(config, paths=paths)
        source = fetch_input(f"s3://{BUCKET}/inputs/queries.csv", s3_config.work_dir / "inputs")
        root = fetch_input(f"s3://{BUCKET}/inputs/photos", s3_config.work_dir / "inputs", "--root")
        return infer_input(s3_config, source, checkpoint, root=root, backend=vllm_generation_engine,
                           embedder=vllm_pooling_engine)  # fmt: skip

    first = on_store(tmp_path / "mirror-a")
    assert (first["rows"], first["ok"], first["rejected_rows"]) == (8, 6, 2), first
    keys = s3_server.keys("own/")
    predictions = sorted(k for k in keys if k.startswith("own/predictions/") and k.endswith(".parquet"))
    markers = [k for k in keys if k.startswith("own/predictions/") and k.endswith(".done.json")]
    assert predictions and len(markers) == first["stage2_shards_written"] > 0, keys
    assert [k for k in keys if k.startswith("own/stage1/") and k.endswith(".done.json")], keys
    assert not [k for k in keys if ".leases/" in k or k.endswith(".tmp")], keys

    second = on_store(tmp_path / "mirror-b")  # another machine: stage 1 and the predictions are found on the store
    assert second["stage1_new_rows"] == 0 and second["stage2_shards_written"] == 0, second
    assert second["stage2_shards_skipped"] == first["stage2_shards_written"]
