"""Stage 1 under faults, through the CLI with the transformers backend (seconds to start, so kill loops are cheap).

- SIGKILL at seeded random moments (during generation, during embedding, right after a done file appears), then a run
  to completion: every shard row equals an uninterrupted run's, nothing duplicated, nothing lost, no temp or gen files.
- A file size limit (RLIMIT_FSIZE, the way a full disk fails a write): the job stops with an error naming the shard and
  the OS error, no shard is marked done, the finished generation survives, and a rerun with space completes the run.

One SIGKILL once the first shard is done is also in tests/test_stage1_run.py (vLLM backend); the shard writer alone
under a size limit is in tests/test_bad_inputs.py.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared import shards
from shared.config import PipelineConfig, load_config

from conftest import TINY_MAX_EMBED_TOKENS, TINY_MAX_NEW_TOKENS

REPO = Path(__file__).resolve().parents[1]
KILL_SEED = 20261
ROWS = 15  # 6 train images x 1-2 queries (11) + 4 val images x 1
SHARDS = 8  # shard_size 2: more shard boundaries for the kills to fall between
RUN_TIMEOUT_S = 400  # a hung run fails the test instead of hanging it
TEXT_COLUMNS = (
    "sample_id", "dataset", "split", "query", "reason_prompt", "reason_answer", "seg_prompt", "seg_answer", "target",
    "attributes", "parse_status", "seg_text", "token_ids", "generated_tokens", "status", "error",
)  # fmt: skip


def write_config(folder: Path, data_root: Path, work_dir: Path) -> Path:
    """pipeline.toml for the small demo with the transformers backend."""
    stage1 = {
        "backend": "transformers",
        "max_new_tokens": TINY_MAX_NEW_TOKENS,
        "max_embed_tokens": TINY_MAX_EMBED_TOKENS,
        "shard_size": 2,
    }
    lines = [
        "[paths]", f"data_root = {json.dumps(str(data_root))}", f"work_dir = {json.dumps(str(work_dir))}",
        "[data]", "demo_train_images = 6", "demo_val_images = 4",
        "[stage1]", *(f"{key} = {json.dumps(value)}" for key, value in stage1.items()),
    ]  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pipeline.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass(frozen=True)
class Workspace:
    config_path: Path
    config: PipelineConfig
    run_dir: Path
    run_key: str


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(root, data_root, manifests folder): the small demo dataset and its manifests, built once."""
    from llavaseg.pipeline import prepare

    root = tmp_path_factory.mktemp("faults")
    data_root = root / "data"
    config = load_config(write_config(root / "prepare", data_root, root / "work-prepare"))
    prepare(config, build_models=False)
    return root, data_root, config.work_dir / "manifests"


def make_workspace(demo: tuple[Path, Path, Path], name: str, tiny_llava_dir: Path) -> Workspace:
    """A work dir with the session's tiny LLaVA linked in and the demo manifests copied (the CLI reuses both)."""
    from stage1_reason.run import run_dir_for

    root, data_root, manifests = demo
    work = root / name
    (work / "models").mkdir(parents=True)
    (work / "models" / "tiny-llava").symlink_to(tiny_llava_dir, target_is_directory=True)
    shutil.copytree(manifests, work / "manifests")
    config_path = write_config(root / f"{name}-config", data_root, work)
    config = load_config(config_path)
    run_dir, key, _ = run_dir_for(config, str(tiny_llava_dir))
    return Workspace(config_path, config, run_dir, key)


def start_reason(workspace: Workspace, log_path: Path | None, preexec_fn=None) -> subprocess.Popen:
    """``llavaseg reason`` in its own process group (a kill takes every process it started); output appended to
    ``log_path``, or to a pipe when None."""
    command = [sys.executable, "-m", "llavaseg.cli", "reason", "--config", str(workspace.config_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if log_path is None:
        return subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, preexec_fn=preexec_fn,
        )  # fmt: skip
    with open(log_path, "a") as log:
        return subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=preexec_fn,
        )  # fmt: skip


def run_to_completion(workspace: Workspace, log_path: Path) -> None:
    proc = start_reason(workspace, log_path)
    try:
        proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log_path.read_text()[-4000:]


def files(run_dir: Path, pattern: str) -> list[Path]:
    return sorted(run_dir.rglob(pattern)) if run_dir.is_dir() else []


def shard_rows(workspace: Workspace) -> pa.Table:
    folders = sorted(p for p in workspace.run_dir.iterdir() if p.is_dir())
    tables = [shards.read_shards(folder, expected_run_key=workspace.run_key) for folder in folders]
    return pa.concat_tables(tables).sort_by("sample_id")


def assert_same_rows(got: pa.Table, expected: pa.Table) -> None:
    assert got.num_rows == expected.num_rows == ROWS
    for name in TEXT_COLUMNS:
        assert got.column(name).to_pylist() == expected.column(name).to_pylist(), name
    for row in range(got.num_rows):
        np.testing.assert_allclose(
            shards.embedding_from_arrow(got.column("embedding"), row).astype(np.float32),
            shards.embedding_from_arrow(expected.column("embedding"), row).astype(np.float32),
            atol=2e-3, err_msg=got.column("sample_id")[row].as_py(),
        )  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(demo, tiny_llava_dir, tmp_path_factory) -> tuple[Workspace, pa.Table]:
    """The reference: one CLI run, never interrupted."""
    workspace = make_workspace(demo, "work-uninterrupted", tiny_llava_dir)
    run_to_completion(workspace, tmp_path_factory.mktemp("logs") / "uninterrupted.log")
    rows = shard_rows(workspace)
    manifest_ids = sorted(
        sid for path in (workspace.config.work_dir / "manifests").glob("*.parquet")
        for sid in pq.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist()
    )  # fmt: skip
    assert rows.column("sample_id").to_pylist() == manifest_ids and len(manifest_ids) == ROWS
    assert rows.column("status").to_pylist() == ["ok"] * ROWS
    return workspace, rows


def wait_for_kill_moment(proc: subprocess.Popen, workspace: Workspace, trigger: str, delay: float) -> bool:
    """Wait until ``trigger`` happens, then ``delay`` seconds more; False if the run ended first.

    Triggers: "start" (at once), "gen" (one more gen file than at start: a shard's generation was just saved),
    "embedding" (every shard has its gen or done file: generation is over), "done" (one more done file than at start).
    Kill moments follow the run's progress rather than the clock, so they land in the same phases on a fast machine
    and on a loaded one.
    """
    gen_at_start = len(files(workspace.run_dir, "*.gen.parquet"))
    done_at_start = len(files(workspace.run_dir, "*.done.json"))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        gen = len(files(workspace.run_dir, "*.gen.parquet"))
        done = len(files(workspace.run_dir, "*.done.json"))
        if (
            trigger == "start"
            or (trigger == "gen" and gen > gen_at_start)
            or (trigger == "embedding" and gen + done >= SHARDS)
            or (trigger == "done" and done > done_at_start)
        ):
            break
        time.sleep(0.01)
    end = time.monotonic() + delay
    while time.monotonic() < end and proc.poll() is None:
        time.sleep(0.01)
    return proc.poll() is None


def test_sigkill_loop_then_completion_equals_uninterrupted(demo, uninterrupted, tiny_llava_dir, tmp_path):
    reference, expected = uninterrupted
    workspace = make_workspace(demo, "work-killed", tiny_llava_dir)
    assert workspace.run_key == reference.run_key
    rng = random.Random(KILL_SEED)
    plan = [
        ("start", rng.uniform(0.5, 3.0)),  # start-up: config, model, first prompts
        ("gen", rng.uniform(0.0, 0.5)),  # generating the next shard
        ("gen", 0.0),  # right after a gen file is saved
        ("embedding", 0.0),  # generation over: closing the generator, loading the embedder
        ("done", 0.0),  # right after a shard is marked done: embedding the next one
    ]
    log_path = tmp_path / "killed.log"
    kills = []  # (trigger, delay, gen files, done files) after each kill
    for trigger, delay in plan:
        proc = start_reason(workspace, log_path)
        try:
            alive = wait_for_kill_moment(proc, workspace, trigger, delay)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert alive and proc.returncode == -signal.SIGKILL, (kills, trigger, log_path.read_text()[-3000:])
        gen, done = len(files(workspace.run_dir, "*.gen.parquet")), len(files(workspace.run_dir, "*.done.json"))
        kills.append((trigger, round(delay, 2), gen, done))
    assert kills[-1][3] < SHARDS, kills  # work was left for the final run

    stale = workspace.run_dir / "reasonseg-val" / ("00000.parquet" + shards.TMP_SUFFIX)
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"a killed writer's half shard")
    run_to_completion(workspace, log_path)

    context = f"kills (trigger, delay, gen files, done files): {kills}"
    got = shard_rows(workspace)
    assert got.column("sample_id").to_pylist() == expected.column("sample_id").to_pylist(), context
    assert_same_rows(got, expected)
    assert len(files(workspace.run_dir, "*.done.json")) == SHARDS
    assert files(workspace.run_dir, "*.tmp") == [], context
    assert files(workspace.run_dir, "*.gen.parquet") == [], context
    summary = json.loads((workspace.run_dir / "summary.json").read_text())
    assert summary["new_rows"] + summary["reused_rows"] == ROWS and summary["errors"] == 0, summary


def test_leftover_gen_file_of_a_done_shard_is_removed(demo, uninterrupted, tiny_llava_dir):
    """A kill between a shard's done file and the removal of its gen file must not leave the gen file forever."""
    from stage1_reason.run import run_stage1

    reference, _ = uninterrupted
    workspace = make_workspace(demo, "work-leftover-gen", tiny_llava_dir)
    shutil.copytree(reference.run_dir, workspace.run_dir)
    leftover = shards.partial_path(workspace.run_dir / "reasonseg-train" / "00000.parquet", ".gen.parquet")
    leftover.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"sample_id": ["reasonseg/train/demo_train_0000/0"]}), leftover)
    manifests = sorted((workspace.config.work_dir / "manifests").glob("*.parquet"))
    specs = [(path.stem.replace("-", "/", 1), path) for path in manifests]
    summary = run_stage1(workspace.config, specs)  # every shard is done: no engine starts
    assert summary.reused_rows == ROWS and summary.generated_samples == 0
    assert not leftover.exists()


def test_stale_gen_file_of_another_manifest_version_is_regenerated(demo, uninterrupted, tiny_llava_dir):
    from stage1_reason.run import GEN_SCHEMA, run_stage1

    reference, expected = uninterrupted
    workspace = make_workspace(demo, "work-stale-gen", tiny_llava_dir)
    shutil.copytree(reference.run_dir, workspace.run_dir)
    shard = workspace.run_dir / "reasonseg-val" / "00001.parquet"
    shard.unlink()
    shards.done_path(shard).unlink()
    stale = {name: [None, None] for name in GEN_SCHEMA.names}
    stale.update(sample_id=["reasonseg/val/removed_image/0", "reasonseg/val/other_image/0"])
    pq.write_table(pa.table(stale, schema=GEN_SCHEMA), shards.partial_path(shard, ".gen.parquet"))
    manifests = sorted((workspace.config.work_dir / "manifests").glob("*.parquet"))
    summary = run_stage1(workspace.config, [(path.stem.replace("-", "/", 1), path) for path in manifests])
    assert summary.new_rows == 2 and summary.reused_rows == ROWS - 2
    assert_same_rows(shard_rows(workspace), expected)


def test_a_bit_flipped_done_shard_is_redone_by_reason_and_refused_by_stage2(demo, uninterrupted, tiny_llava_dir):
    """One flipped bit in a done shard: stage 2 refuses it by name; `reason` redoes exactly that shard."""
    from stage1_reason.run import run_stage1
    from stage2_segment.data import Stage2Source, build_index

    reference, expected = uninterrupted
    workspace = make_workspace(demo, "work-bit-flip", tiny_llava_dir)
    shutil.copytree(reference.run_dir, workspace.run_dir)
    shard = workspace.run_dir / "reasonseg-val" / "00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10
    shard.write_bytes(bytes(data))
    manifest = workspace.config.work_dir / "manifests" / "reasonseg-val.parquet"
    ids = pq.read_table(manifest, columns=["sample_id"]).column("sample_id").to_pylist()
    source = Stage2Source("reasonseg/val", manifest, shard.parent, workspace.run_key)
    with pytest.raises(shards.ShardError, match=r"reasonseg-val/00000\.parquet: refused, its content sha256"):
        build_index([source])
    rows_in_shard = pq.read_metadata(reference.run_dir / "reasonseg-val" / "00000.parquet").num_rows
    manifests = sorted((workspace.config.work_dir / "manifests").glob("*.parquet"))
    summary = run_stage1(workspace.config, [(path.stem.replace("-", "/", 1), path) for path in manifests])
    assert summary.new_rows == rows_in_shard and summary.reused_rows == ROWS - rows_in_shard
    assert_same_rows(shard_rows(workspace), expected)
    assert build_index([source]).table.num_rows == len(ids)


def test_rows_that_failed_in_the_engine_are_retried_by_a_rerun(demo, uninterrupted, tiny_llava_dir):
    """A done shard holding an engine-side row error (what a flaky engine leaves) is redone by the next run, which
    says how many rows it retried; a row's own error (an unreadable image) would be kept as it is."""
    from stage1_reason.engine_health import TRANSIENT_ERROR_PREFIX
    from stage1_reason.run import run_stage1

    reference, expected = uninterrupted
    workspace = make_workspace(demo, "work-transient", tiny_llava_dir)
    shutil.copytree(reference.run_dir, workspace.run_dir)
    shard = workspace.run_dir / "reasonseg-val" / "00001.parquet"
    table = pq.read_table(shard)
    status = table.column("status").to_pylist()
    error = table.column("error").to_pylist()
    status[0], error[0] = "error", f"{TRANSIENT_ERROR_PREFIX}: RuntimeError: a request timed out"
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
    table = table.set_column(table.schema.get_field_index("error"), "error", pa.array(error, pa.string()))
    done = shards.read_done(shard)
    shards.write_shard(table, shard, {k: v for k, v in done.items() if k not in ("rows", "ids_digest", "content_sha256")}
                       | {"errors": 1, "transient_errors": 1})  # fmt: skip
    manifests = sorted((workspace.config.work_dir / "manifests").glob("*.parquet"))
    summary = run_stage1(workspace.config, [(path.stem.replace("-", "/", 1), path) for path in manifests])
    assert summary.retried_rows == 1 and summary.new_rows == table.num_rows and summary.errors == 0
    assert "rows retried after engine-side errors" in summary.describe()
    assert_same_rows(shard_rows(workspace), expected)


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_full_disk_stops_with_a_clear_error_and_a_rerun_completes(demo, uninterrupted, tiny_llava_dir, tmp_path):
    reference, expected = uninterrupted
    workspace = make_workspace(demo, "work-full-disk", tiny_llava_dir)
    smallest_shard = min(path.stat().st_size for path in files(reference.run_dir, "*.parquet"))
    limit = smallest_shard - 1  # every shard is too big; run.json, configs and gen files are smaller
    # Output goes to a pipe: the size limit applies to every file the job writes, a log file included.
    proc = start_reason(workspace, None, preexec_fn=_file_size_limit(limit))
    try:
        log, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode not in (0, -signal.SIGKILL, -signal.SIGXFSZ), log[-4000:]
    first_shard = workspace.run_dir / "reasonseg-train" / "00000.parquet"
    assert f"{first_shard}: could not be written (File too large)" in log, log[-4000:]
    assert files(workspace.run_dir, "*.done.json") == []
    assert files(workspace.run_dir, "*.tmp") == []
    assert not first_shard.exists()
    assert len(files(workspace.run_dir, "*.gen.parquet")) == SHARDS  # the generation phase finished and is kept

    run_to_completion(workspace, tmp_path / "rerun.log")
    assert_same_rows(shard_rows(workspace), expected)
    summary = json.loads((workspace.run_dir / "summary.json").read_text())
    assert summary["generated_samples"] == 0 and summary["new_rows"] == ROWS  # only the embedding phase was redone
    assert files(workspace.run_dir, "*.gen.parquet") == [] and files(workspace.run_dir, "*.tmp") == []
