"""Engine and signal faults of ``llavaseg reason``, injected for real into the CLI's own processes.

- The OOM killer's SIGKILL of ``VLLM::Worker``, then of the restarted ``VLLM::EngineCore`` (which used to hang the job
  in vLLM's output queue): the job restarts the engine, loses no row and writes every row once, none as an error.
- ``kill <pid>`` (SIGTERM): exit 143 with one line, and no child process left behind.
- ``reason --overwrite`` killed after it replaced its first shard: every other shard is still done, nothing is lost.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

from conftest import TINY_MAX_NEW_TOKENS
from shared import leases, shards
from test_faults_stage1 import (  # noqa: F401  (demo: the module fixture, shared)
    REPO,
    ROWS,
    SHARDS,
    Workspace,
    demo,
    make_workspace,
    shard_rows,
    start_reason,
)

DEADLINE_S = 500


def vllm_workspace(demo, name: str, tiny_llava_dir: Path, **stage1: object) -> Workspace:
    """A fault workspace whose stage 1 runs the real vLLM engine ('input' embeddings: no second engine)."""
    from shared.config import load_config
    from stage1_reason.run import run_dir_for

    workspace = make_workspace(demo, name, tiny_llava_dir)
    text = workspace.config_path.read_text().replace('backend = "transformers"', 'backend = "vllm"')
    extra = {"embed_mode": '"input"', "kv_cache_tokens": "4096",  # sized in tokens: no warm-up pass at each start
             **{k: str(v) for k, v in stage1.items()}}
    text = "".join(line for line in text.splitlines(keepends=True) if line.split(" = ")[0] not in extra)
    text = text.replace("[stage1]\n", "[stage1]\n" + "".join(f"{k} = {v}\n" for k, v in extra.items()))
    workspace.config_path.write_text(text)
    config = load_config(workspace.config_path)
    run_dir, key, _ = run_dir_for(config, str(tiny_llava_dir))
    return Workspace(workspace.config_path, config, run_dir, key)


def processes_of(pid: int, title: str) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if " ".join(child.cmdline()).startswith(title):
                found.append(child)
        except psutil.Error:
            continue
    return found


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout_s: float = DEADLINE_S, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = log.read_text() if log is not None else proc.stdout.read()
            raise AssertionError(f"reason ended (rc {proc.returncode}) before {what}: {out[-3000:]}")
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def finish(proc: subprocess.Popen, log: Path | None = None) -> str:
    try:
        out, _ = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return log.read_text() if log is not None else out


def all_rows_once(workspace: Workspace) -> None:
    rows = shard_rows(workspace)
    ids = rows.column("sample_id").to_pylist()
    manifest_ids = sorted(
        sid for path in (workspace.config.work_dir / "manifests").glob("*.parquet")
        for sid in pq.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist()
    )  # fmt: skip
    assert ids == manifest_ids and len(ids) == ROWS  # every row, once
    assert rows.column("status").to_pylist() == ["ok"] * ROWS, rows.column("error").to_pylist()


def test_killed_worker_then_killed_engine_core_restart_the_engine_and_lose_nothing(demo, tiny_llava_dir, tmp_path):
    # The kills fall inside the generation phase: a fast machine generated all 8 shards in 3 s, before the test had
    # killed anything. Twice the usual tokens widen it; the first kill is triggered by a shard the engine has claimed
    # (which it does only once it is up), the second by a shard the restarted engine has generated.
    workspace = vllm_workspace(demo, "work-engine-deaths", tiny_llava_dir, engine_restarts=2,
                               engine_stall_timeout_s=120, max_new_tokens=2 * TINY_MAX_NEW_TOKENS)  # fmt: skip
    output = tmp_path / "reason.out"
    proc = start_reason(workspace, output)
    run_dir = workspace.run_dir
    generated = lambda: {p.name for p in run_dir.glob(f"*/{shards.PARTIAL_DIR}/*.gen.parquet")}  # noqa: E731
    claimed = lambda: len(list(run_dir.glob(f"*/{leases.LEASE_DIR}/*{leases.LEASE_SUFFIX}")))  # noqa: E731
    wait_for(claimed, proc, "the first shard's claim", log=output)  # the engine is up and at work on it
    first_cores = {p.pid for p in processes_of(proc.pid, "VLLM::EngineCore")}
    seen = processes_of(proc.pid, "VLLM::")
    (worker,) = processes_of(proc.pid, "VLLM::Worker")
    worker.kill()  # what the OOM killer does
    # Once the job says it restarts, the dead engine writes nothing more: a generation file that appears after that
    # line is the restarted engine's, which is then up and working (killing it while it starts is another fault).
    wait_for(lambda: "restarting the engine (1 of 2)" in output.read_text(), proc, "the first restart", log=output)
    before_restart = generated()

    def restarted_and_working() -> list[psutil.Process]:
        cores = [p for p in processes_of(proc.pid, "VLLM::EngineCore") if p.pid not in first_cores]
        return cores if cores and generated() - before_restart else []

    (core,) = wait_for(restarted_and_working, proc, "a shard generated by the restarted engine", log=output)
    seen += processes_of(proc.pid, "VLLM::")
    core.kill()  # a dead core used to leave the job blocked in vLLM's output queue for ever
    out = finish(proc, output)
    assert proc.returncode == 0, out[-4000:]
    assert "2 engine restart(s)" in out, out[-3000:]
    log_file = Path(re.search(r"^log: (\S+)$", out, re.M).group(1))
    assert log_file.read_text().count("restarting the engine") == 2
    all_rows_once(workspace)
    _, alive = psutil.wait_procs(seen, timeout=10)
    assert alive == []  # nothing of the failed engines (or the last one) is left


def test_sigterm_ends_reason_with_143_and_no_child_left(demo, tiny_llava_dir):
    workspace = vllm_workspace(demo, "work-sigterm", tiny_llava_dir)
    proc = start_reason(workspace, None)
    wait_for(lambda: processes_of(proc.pid, "VLLM::Worker"), proc, "the vLLM engine")
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children
    os.kill(proc.pid, signal.SIGTERM)  # `kill <pid>`: the job alone, not its process group
    out = finish(proc)
    assert proc.returncode == 143, out[-3000:]
    assert "Traceback" not in out
    assert re.search(r"^terminated(; ended \d+ child process\(es\))?; finished shards and checkpoints are kept", out, re.M)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], [p.pid for p in alive]


def test_overwrite_replaces_each_shard_only_when_its_new_version_is_complete(demo, tiny_llava_dir, tmp_path):
    from stage1_reason.run import run_dir_for

    workspace = make_workspace(demo, "work-overwrite", tiny_llava_dir)  # transformers backend: no engine start
    finished = start_reason(workspace, tmp_path / "first.log")
    assert finished.wait(timeout=DEADLINE_S) == 0, (tmp_path / "first.log").read_text()[-3000:]
    done_files = sorted(workspace.run_dir.rglob("*.done.json"))
    assert len(done_files) == SHARDS
    before = {path: path.stat().st_mtime_ns for path in done_files}

    replaced = lambda: [p for p in done_files if p.stat().st_mtime_ns != before[p]]  # noqa: E731
    # The markers are replaced about 50 ms apart: a kill that came after the last one (a loaded machine) did not
    # land mid-way, and the overwrite is tried again on the now fully replaced run folder.
    for _attempt in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-m", "llavaseg.cli", "reason", "--overwrite", "--config", str(workspace.config_path)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        wait_for(replaced, proc, "the first replaced shard")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if len(replaced()) < SHARDS:
            break
        before = {path: path.stat().st_mtime_ns for path in done_files}
    assert 1 <= len(replaced()) < SHARDS
    config = workspace.config
    run_dir, key, _ = run_dir_for(config, str(tiny_llava_dir))
    for manifest in (config.work_dir / "manifests").glob("*.parquet"):
        ids = sorted(pq.read_table(manifest, columns=["sample_id"]).column("sample_id").to_pylist())
        folder = run_dir / manifest.stem
        for index, start in enumerate(range(0, len(ids), 2)):
            assert shards.is_done(folder / shards.shard_name(index), ids[start:start + 2], expected_run_key=key)
    all_rows_once(workspace)
