"""Shard leases (shared.leases): exclusive claims, heartbeats, stale takeover (by timeout, and at once for a SIGKILLed
process of this host), one winner among racing takers, cleanup of only the temp files nobody is writing, the job array
split and its usage errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from llavaseg import cli
from shared import leases, shards
from shared.leases import JobSlice, ShardLeases, lease_path

REPO = Path(__file__).resolve().parents[1]


def foreign_lease(shard: Path, heartbeat_age_s: float, host: str = "other-node") -> Path:
    """A lease file written by a job on another host, last refreshed ``heartbeat_age_s`` ago."""
    path = lease_path(shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"host": host, "pid": 4242, "start": None, "job": "77_3", "token": "f" * 32,
              "heartbeat": time.time() - heartbeat_age_s}  # fmt: skip
    path.write_text(json.dumps(record))
    return path


def test_a_lease_is_exclusive_until_released(tmp_path):
    shard = tmp_path / "m" / "00000.parquet"
    with ShardLeases(60) as first, ShardLeases(60) as second:
        assert first.acquire(shard) and first.holds(shard)
        assert first.acquire(shard)  # again: still ours
        assert not second.acquire(shard)
        assert second.holder(shard)["token"] == first.owner["token"] and first.holder(shard) is None
        record = json.loads(lease_path(shard).read_text())
        assert (record["host"], record["pid"]) == (leases.host_name(), os.getpid())
        first.release(shard)
        assert not lease_path(shard).exists() and second.acquire(shard)
    assert not lease_path(shard).exists()  # close() released it
    assert list(lease_path(shard).parent.glob("*.tmp")) == []


def test_a_live_lease_of_another_host_is_respected_and_a_stale_one_taken_over(tmp_path):
    live, stale = tmp_path / "m" / "00000.parquet", tmp_path / "m" / "00001.parquet"
    foreign_lease(live, heartbeat_age_s=5)
    foreign_lease(stale, heartbeat_age_s=120)
    # the stale writer's temp files of its shard, and another shard's temp file that must stay
    (tmp_path / "m" / ".done").mkdir()
    dead_temps = [tmp_path / "m" / ".00001.parquet.other-node-4242.tmp",
                  tmp_path / "m" / ".done" / ".00001.done.json.other-node-4242.tmp"]  # fmt: skip
    for path in dead_temps:
        path.write_bytes(b"half")
    other = tmp_path / "m" / ".00000.parquet.other-node-4242.tmp"
    other.write_bytes(b"in flight")
    with ShardLeases(timeout_s=60) as mine:
        assert not mine.acquire(live) and mine.holder(live)["job"] == "77_3"
        assert mine.acquire(stale)
        assert [(path, previous["job"]) for path, previous in mine.taken_over] == [(stale, "77_3")]
        assert json.loads(lease_path(stale).read_text())["token"] == mine.owner["token"]
    assert not any(path.exists() for path in dead_temps) and other.exists()


def test_a_sigkilled_holder_on_this_host_loses_its_lease_at_once(tmp_path):
    shard = tmp_path / "m" / "00000.parquet"
    script = ("import sys, time; from pathlib import Path; from shared.leases import ShardLeases; "
              f"l = ShardLeases(3600); assert l.acquire(Path({str(shard)!r})); print('held', flush=True); "
              "time.sleep(600)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with ShardLeases(timeout_s=3600) as mine:
            assert not mine.acquire(shard)  # alive: an hour's timeout is far away
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=30)
            assert mine.acquire(shard)  # its pid is gone: no need to wait for the timeout
            assert mine.taken_over[0][1]["pid"] == holder.pid
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_heartbeats_keep_a_lease_and_a_job_that_missed_them_loses_it_for_good(tmp_path):
    shard = tmp_path / "m" / "00000.parquet"
    holder = ShardLeases(timeout_s=0.6, heartbeat_s=0.05)
    holder.owner["host"] = "suspended-node"  # judged by its heartbeats alone, as a job on another node
    assert holder.acquire(shard)
    first_beat = json.loads(lease_path(shard).read_text())["heartbeat"]
    taker = ShardLeases(timeout_s=0.6)
    time.sleep(1.0)  # longer than the timeout: only the heartbeats keep the lease
    assert json.loads(lease_path(shard).read_text())["heartbeat"] > first_beat + 0.5
    assert not taker.acquire(shard)
    holder._stop.set()  # the job is suspended: no more heartbeats
    holder._thread.join()
    time.sleep(0.8)
    assert taker.acquire(shard) and len(taker.taken_over) == 1
    holder.refresh()  # it wakes up: its lease is gone, and it must not take it back or remove it
    assert holder.lost == [shard] and not holder.holds(shard)
    holder.close()
    assert json.loads(lease_path(shard).read_text())["token"] == taker.owner["token"]
    taker.close()


def test_racing_takers_of_one_stale_lease_have_one_winner(tmp_path):
    shard = tmp_path / "m" / "00000.parquet"
    foreign_lease(shard, heartbeat_age_s=600)
    takers = [ShardLeases(timeout_s=60) for _ in range(8)]
    start, won = threading.Barrier(len(takers)), []

    def take(job: ShardLeases) -> None:
        start.wait()
        if job.acquire(shard):
            won.append(job.owner["token"])

    threads = [threading.Thread(target=take, args=(job,)) for job in takers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and json.loads(lease_path(shard).read_text())["token"] == won[0]
    for job in takers:
        job.close()


def test_cleanup_removes_only_temp_files_nobody_writes(tmp_path):
    run_dir = tmp_path / "run"
    folder = run_dir / "reasonseg-val"
    (folder / shards.PARTIAL_DIR).mkdir(parents=True)
    free_shard_temp = folder / shards.PARTIAL_DIR / ".00002.gen.parquet.somehost-1.tmp"
    old_style_temp = folder / ("00003.parquet" + shards.TMP_SUFFIX)  # a killed writer of an older version
    busy_shard_temp = folder / ".00001.parquet.other-node-4242.tmp"
    foreign_lease(folder / "00001.parquet", heartbeat_age_s=1)  # a live job on another node writes shard 1
    stale_lease = foreign_lease(folder / "00004.parquet", heartbeat_age_s=900)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dead_writer = run_dir / f".summary.json.{leases.host_name()}-{dead.pid}.tmp"
    live_writer = shards.temporary_path(run_dir / "run.json")  # this process's: alive
    for path in (free_shard_temp, old_style_temp, busy_shard_temp, dead_writer, live_writer):
        path.write_bytes(b"x")
    removed = leases.clean_temp_files(run_dir, timeout_s=300)
    assert sorted(removed) == sorted([free_shard_temp, old_style_temp, dead_writer, stale_lease])
    assert busy_shard_temp.exists() and live_writer.exists() and lease_path(folder / "00001.parquet").exists()
    os.utime(live_writer, (time.time() - 400, time.time() - 400))  # older than the timeout: nobody writes that long
    assert leases.clean_temp_files(run_dir, timeout_s=300) == [live_writer]


def test_a_lease_write_killed_before_its_rename_leaves_nothing_behind(tmp_path):
    """A job SIGKILLed between writing a lease's temporary file and renaming it: the next cleanup sees the writer's
    process gone and removes the file at once, not only after the lease timeout."""
    shard = tmp_path / "m" / "00002.parquet"
    shard.parent.mkdir()
    child = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from shared.leases import ShardLeases, lease_path
        jobs, lease = ShardLeases(300), lease_path(Path({str(shard)!r}))
        lease.parent.mkdir(parents=True, exist_ok=True)
        jobs._write_temp(lease)  # the first half of a lease write, then the kill
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    killed = subprocess.run([sys.executable, "-c", child], cwd=REPO)
    assert killed.returncode == -9
    (left,) = lease_path(shard).parent.glob("*.tmp")
    assert left.name.startswith(".00002.lease.json.") and f".{leases.host_name()}-" in left.name  # the writer's name
    assert leases.clean_temp_files(tmp_path, timeout_s=300) == [left] and not left.exists()


def test_temporary_names_are_hidden_and_the_writers_own(tmp_path):
    name = shards.temporary_path(tmp_path / "00000.parquet").name
    assert name == f".00000.parquet.{leases.host_name()}-{os.getpid()}{shards.TMP_SUFFIX}"


def test_job_slice_takes_every_nth_shard():
    assert [k for k in range(10) if JobSlice(1, 3).takes(k)] == [1, 4, 7]
    assert all(JobSlice().takes(k) for k in range(5))
    with pytest.raises(SystemExit) as usage:
        cli.parse_args(["reason", "--num-tasks", "two"])
    assert usage.value.code == 2


@pytest.mark.parametrize(("argv", "message"), [
    (["reason", "--num-tasks", "2"], "reason: --num-tasks and --task-index go together (got only --num-tasks)"),
    (["infer", "--task-index", "0"], "infer: --num-tasks and --task-index go together (got only --task-index)"),
    (["reason", "--num-tasks", "2", "--task-index", "2"], "--task-index must be in 0..1 (--num-tasks 2), got 2"),
    (["reason", "--num-tasks", "0", "--task-index", "0"], "--num-tasks must be at least 1, got 0"),
    (["infer", "--input", "t.csv", "--num-tasks", "2", "--task-index", "1"], "split the table instead"),
])  # fmt: skip
def test_bad_task_flags_are_usage_errors(argv, message, tmp_path, capfd):
    assert cli.main([*argv, f"paths.work_dir={tmp_path}"]) == 2
    assert message in capfd.readouterr().err


def test_lease_timeout_is_validated():
    from shared.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"stage1.lease_timeout_s: must be a finite number > 0"):
        load_config(REPO / "pipeline.toml", overrides=["stage1.lease_timeout_s=0"], check_paths=False)
