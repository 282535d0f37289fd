"""Several ``llavaseg reason`` processes on one run folder (real CLI processes, transformers backend, the small demo of
tests/test_faults_stage1.py: 15 rows in 8 shards).

- Two jobs at once, one SIGKILLed mid-shard while it holds leases: the survivor exits 0, takes over every lease the
  dead job held, and the run holds every sample id exactly once in byte-valid done shards, with no temp or lease file
  left; the survivor's summary adds up (written by it + by the other + already done = 8 shards).
- A job array of two tasks (``--num-tasks 2 --task-index 0/1``) at once, on the first 4 rows of each manifest (4 shards):
  each writes its own 2 shards, none of the other's, and the union is exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from shared import leases, shards
from shared.config import load_config
from stage1_reason.run import run_dir_for
from test_faults_stage1 import (  # noqa: F401  (demo: the module fixture, shared)
    REPO,
    ROWS,
    SHARDS,
    Workspace,
    demo,
    files,
    make_workspace,
    shard_rows,
)

DEADLINE_S = 400


def start(workspace: Workspace, log_path: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "llavaseg.cli", "reason", "--config", str(workspace.config_path), *extra]
    with open(log_path, "a") as log:
        return subprocess.Popen(command, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def wait(proc: subprocess.Popen, log_path: Path) -> int:
    try:
        return proc.wait(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"reason did not finish: {log_path.read_text()[-3000:]}")


def held_by(workspace: Workspace, pid: int) -> list[Path]:
    """The shards whose lease process ``pid`` holds."""
    held = []
    for lease in files(workspace.run_dir, f"*{leases.LEASE_SUFFIX}"):
        record = leases.read_lease(lease)
        if record and record.get("pid") == pid:
            held.append(lease.parent.parent / lease.name.replace(leases.LEASE_SUFFIX, ".parquet"))
    return held


def assert_exactly_once(workspace: Workspace, rows_per_manifest: int = 0, expected_shards: int = SHARDS) -> None:
    rows = shard_rows(workspace)  # done shards only, each checked against its done marker's sha256
    ids = rows.column("sample_id").to_pylist()
    manifest_ids = sorted(
        sid for path in (workspace.config.work_dir / "manifests").glob("*.parquet")
        for sid in sorted(pq.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist())[
            : rows_per_manifest or None]
    )  # fmt: skip
    assert ids == manifest_ids and len(set(ids)) == len(ids)  # every sample once across the done shards
    assert rows.column("status").to_pylist() == ["ok"] * len(ids)
    assert len(files(workspace.run_dir, "*.done.json")) == expected_shards
    assert files(workspace.run_dir, "*.tmp") == [] and files(workspace.run_dir, "*.gen.parquet") == []
    assert files(workspace.run_dir, f"*{leases.LEASE_SUFFIX}") == []


def test_two_jobs_one_killed_mid_shard_the_survivor_finishes_exactly_once(demo, tiny_llava_dir, tmp_path):
    workspace = make_workspace(demo, "work-two-jobs", tiny_llava_dir)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    victim = start(workspace, log_b)
    survivor = start(workspace, log_a)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:  # both at work, and the victim holds a shard it generated, not yet embedded
            assert victim.poll() is None and survivor.poll() is None, (log_a.read_text()[-2000:], log_b.read_text())
            generated = [p for p in held_by(workspace, victim.pid) if shards.partial_path(p, ".gen.parquet").is_file()]
            if generated and held_by(workspace, survivor.pid):
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"never both at work: {log_b.read_text()[-2000:]}")
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
    # what the dead job left: leases of shards it had not finished (and, had the kill fallen between a done marker and
    # its release, one of a done shard, which nobody needs to take over)
    orphaned = [p for p in held_by(workspace, victim.pid) if not shards.read_done(p)]
    assert orphaned
    assert wait(survivor, log_a) == 0, log_a.read_text()[-4000:]

    assert_exactly_once(workspace)
    assert shard_rows(workspace).num_rows == ROWS
    job = json.loads((workspace.run_dir / "summary.json").read_text())["job"]
    assert job["owner"]["pid"] == survivor.pid
    assert job["leases_taken_over"] == len(orphaned), (job, orphaned)
    assert job["shards_by_this_job"] + job["shards_by_others"] + job["shards_already_done"] == SHARDS, job
    assert job["shards_by_this_job"] >= len(orphaned) and job["shards_already_done"] == 0
    log = log_a.read_text()
    assert "took over the stale lease of" in log and "shards written by this job" in log


def test_a_job_array_of_two_tasks_splits_the_shards(demo, tiny_llava_dir, tmp_path):
    workspace = make_workspace(demo, "work-array", tiny_llava_dir)
    text = workspace.config_path.read_text().replace("[data]\n", "[data]\nmax_samples_per_manifest = 4\n")
    workspace.config_path.write_text(text)
    config = load_config(workspace.config_path)
    run_dir, key, _ = run_dir_for(config, str(tiny_llava_dir))
    workspace = Workspace(workspace.config_path, config, run_dir, key)
    logs = [tmp_path / f"task{i}.log" for i in range(2)]
    tasks = [start(workspace, logs[i], "--num-tasks", "2", "--task-index", str(i)) for i in range(2)]
    for proc, log in zip(tasks, logs):
        assert wait(proc, log) == 0, log.read_text()[-4000:]
    assert_exactly_once(workspace, rows_per_manifest=4, expected_shards=4)
    for i in range(2):
        job = json.loads((workspace.run_dir / f"summary.task-{i}-of-2.json").read_text())["job"]
        assert job["slice"] == f"task {i} of 2"
        assert (job["shards_by_this_job"], job["shards_by_others"], job["other_task_shards"]) == (2, 0, 2), job
