"""``kill <pid>`` (SIGTERM) of ``llavaseg train`` while Ray Train is stepping: exit 143, one line saying so, no
traceback, no process of the job left (Ray's GCS, raylet and workers included), and a rerun of the same command resumes
from the newest complete checkpoint and trains to the end.

The work dir holds the demo manifests and synthetic stage-1 shards under the run key of the config's tiny LLaVA, so the
command goes straight to training (a reduced schedule: 2 CPU workers, tiny SAM).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from stage2_fixtures import write_synthetic_shards
from test_faults_stage1 import REPO, demo, make_workspace  # noqa: F401  (demo: the module fixture, shared)

ITERATIONS = 40
CHECKPOINT_EVERY = 4
DEADLINE_S = 400
TRAIN_SETTINGS = {"global_batch": 4, "micro_batch": 2, "iterations": ITERATIONS, "warmup_iterations": 2,
                  "checkpoint_every": CHECKPOINT_EVERY, "lr": 1e-3, "eval_batch": 4}  # fmt: skip
RAY_SETTINGS = {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 1}


def train_workspace(demo, tiny_llava_dir: Path):
    """A work dir whose config trains for a few seconds, with stage 1's shards already done (synthetic)."""
    from shared.config import load_config

    workspace = make_workspace(demo, "work-train-sigterm", tiny_llava_dir)
    text = workspace.config_path.read_text()
    for section, values in (("stage2", TRAIN_SETTINGS), ("ray", RAY_SETTINGS)):
        text += f"[{section}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())
    workspace.config_path.write_text(text)
    config = load_config(workspace.config_path)
    for spec in (*config.data.train, *config.data.eval):
        manifest = config.work_dir / "manifests" / f"{spec.replace('/', '-')}.parquet"
        write_synthetic_shards(manifest, workspace.run_dir, spec, run_key=workspace.run_key)
    return config, workspace.config_path


def start_train(config_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "llavaseg.cli", "train", "--config", str(config_path)]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip


def metrics_records(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            continue
    return records


def kill_tree(proc: subprocess.Popen, children: list[psutil.Process]) -> None:
    """Clean up after a failed assertion: the job and whatever it started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass


def test_sigterm_ends_train_with_143_no_child_left_and_a_rerun_resumes(demo, tiny_llava_dir):
    from llavaseg.pipeline import prepare, stage2_sources
    from stage2_segment.checkpoint import list_complete
    from stage2_segment.train import CHECKPOINTS_DIR, train_output_dir

    config, config_path = train_workspace(demo, tiny_llava_dir)
    output_dir = train_output_dir(config, stage2_sources(config, prepare(config, build_models=False), config.data.train))
    proc = start_train(config_path)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not list_complete(output_dir / CHECKPOINTS_DIR):  # mid-training: a checkpoint is done, steps go on
            assert proc.poll() is None, f"train ended (rc {proc.returncode}) early: {proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3, children  # Ray's GCS and raylet, and the training workers
        os.kill(proc.pid, signal.SIGTERM)  # `kill <pid>`: the job alone, not its process group
        out, _ = proc.communicate(timeout=DEADLINE_S)
    finally:
        kill_tree(proc, children)
    assert proc.returncode == 143, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    stop_lines = [line for line in out.splitlines() if re.match(r"(terminated|interrupted|error)\b", line)]
    assert len(stop_lines) == 1, out[-3000:]
    assert re.match(r"terminated(; ended \d+ child process\(es\))?; finished shards and checkpoints are kept",
                    stop_lines[0]), stop_lines  # fmt: skip
    _, alive = psutil.wait_procs(children, timeout=15)
    assert alive == [], [(p.pid, p.name()) for p in alive]
    steps_at_stop = [r["step"] for r in metrics_records(output_dir) if "step" in r]
    assert steps_at_stop and max(steps_at_stop) < ITERATIONS  # it was stopped mid-training
    complete_at_stop = [step for step, _ in list_complete(output_dir / CHECKPOINTS_DIR)]
    assert complete_at_stop

    rerun = start_train(config_path)
    try:
        out, _ = rerun.communicate(timeout=DEADLINE_S)
    finally:
        kill_tree(rerun, [])
    assert rerun.returncode == 0, out[-3000:]
    assert f"trained to step {ITERATIONS}" in out, out[-3000:]
    starts = [r for r in metrics_records(output_dir) if r.get("event") == "start"]
    assert len(starts) == 2 and starts[-1]["resumed_from_step"] == max(complete_at_stop), starts
