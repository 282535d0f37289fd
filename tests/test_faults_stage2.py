"""Stage-2 training under repeated SIGKILL: the training command is killed five times at seeded random points (while
Ray starts, a few steps past a checkpoint, while a checkpoint folder is being written), rerun after each kill, then
rerun to the end. The outcome must be that of one uninterrupted run: the same final weights bit for bit, the same
losses at every step any attempt ran, every step logged, each attempt resuming from the newest complete checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from stage2_fixtures import KILL_SCRIPT, Stage2World, stage2_world
from stage2_segment.checkpoint import WEIGHTS_FILE, is_complete, list_complete, read_meta, step_dir_name
from stage2_segment.train import CHECKPOINTS_DIR, FINAL_DIR, METRICS_FILE, TrainResult, read_metrics, train
from stage2_segment.train import train_output_dir

ITERATIONS = 30
CHECKPOINT_EVERY = 5
KILLS = 5
PLAN_SEED = 3
POLL_S = 0.002
ATTEMPT_TIMEOUT_S = 300
STEP_FIELDS = ("step", "loss", "bce", "dice", "lr")  # what a step record says about training (not timings)


@dataclass(frozen=True)
class KillPoint:
    """Where one attempt is killed. ``startup``: ``delay_s`` after launch. ``steps``: ``delay_s`` after the attempt
    logs step ``resumed + steps``. ``checkpoint``: ``delay_s`` after a new checkpoint folder (or its temporary
    folder) appears, the writing worker first."""

    kind: str
    steps: int
    delay_s: float


def kill_plan(seed: int) -> list[KillPoint]:
    """Two kills while the command starts (cheap: Ray Train takes ~20 s to start here), one while a checkpoint is
    being written and two 6..10 steps past the resume point (each lands after a new complete checkpoint), in a seeded
    random order with seeded random delays."""
    rng = random.Random(seed)
    kinds = ["startup", "startup", "checkpoint", "steps", "steps"]
    rng.shuffle(kinds)
    plan = []
    for kind in kinds:
        if kind == "startup":
            plan.append(KillPoint(kind, 0, rng.uniform(1.0, 12.0)))
        elif kind == "steps":
            plan.append(KillPoint(kind, rng.randint(CHECKPOINT_EVERY + 1, 2 * CHECKPOINT_EVERY), rng.uniform(0, 0.3)))
        else:
            plan.append(KillPoint(kind, 0, rng.uniform(0.0, 0.005)))
    return plan


@dataclass(frozen=True)
class KilledAttempt:
    point: KillPoint
    complete_at_launch: list[int]  # steps of the complete checkpoints when the attempt was launched
    starts_before: int  # start events in metrics.jsonl before the attempt
    starts_after: int
    last_step: int | None  # the highest step the attempt logged before it died
    complete_at_kill: list[int]
    half_written: list[str]  # temporary checkpoint folders left behind by the kill
    final_complete: bool
    log: str


@dataclass(frozen=True)
class KilledRun:
    config: object  # shared.config.PipelineConfig
    attempts: list[KilledAttempt]
    complete_before_rerun: list[int]
    result: TrainResult


def running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_job(process: subprocess.Popen, first: int | None = None) -> None:
    """SIGKILL a command and every process it started. Ray's processes run in sessions of their own, so the process
    group is not enough: the whole tree is stopped first (so nothing can start another process), then killed.
    ``first``: a pid to kill before the rest (the worker writing a checkpoint)."""
    if process.poll() is not None:  # it ended by itself (the caller reports that); Ray shut down with it
        return
    if first is not None:
        try:
            writer = psutil.Process(first)
            if process.pid in [parent.pid for parent in writer.parents()]:
                writer.kill()
        except psutil.NoSuchProcess:
            pass
    root = psutil.Process(process.pid)
    os.killpg(process.pid, signal.SIGSTOP)
    tree: dict[int, psutil.Process] = {root.pid: root}
    while True:
        found = {child.pid: child for child in root.children(recursive=True) if child.pid not in tree}
        if not found:
            break
        for child in found.values():
            try:
                child.suspend()
            except psutil.NoSuchProcess:
                pass
        tree.update(found)
    os.killpg(process.pid, signal.SIGKILL)
    for member in tree.values():
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()
    deadline = time.monotonic() + 60
    alive = list(tree.values())
    while alive and time.monotonic() < deadline:
        alive = [member for member in alive if running(member)]
        time.sleep(0.05)
    assert not alive, f"processes survived SIGKILL: {alive}"


def complete_steps(output_dir: Path) -> list[int]:
    return [step for step, _ in list_complete(output_dir / CHECKPOINTS_DIR)]


def temporary_folders(output_dir: Path) -> list[str]:
    folder = output_dir / CHECKPOINTS_DIR
    return sorted(entry.name for entry in folder.glob("step_*.tmp-*")) if folder.is_dir() else []


def start_events(output_dir: Path) -> list[dict]:
    return [record for record in read_metrics(output_dir) if record.get("event") == "start"]


def wait_for_kill_point(process: subprocess.Popen, output_dir: Path, point: KillPoint, starts_before: int,
                        launched: float) -> int | None:  # fmt: skip
    """Block until ``point`` is reached; returns the pid to kill first (a checkpoint writer) or None."""
    checkpoints = output_dir / CHECKPOINTS_DIR
    present = set(os.listdir(checkpoints)) if checkpoints.is_dir() else set()
    deadline = launched + ATTEMPT_TIMEOUT_S
    while True:
        assert process.poll() is None, f"the attempt ended (exit {process.returncode}) before its kill point {point}"
        assert time.monotonic() < deadline, f"kill point {point} not reached in {ATTEMPT_TIMEOUT_S} s"
        if point.kind == "startup":
            if time.monotonic() - launched >= point.delay_s:
                return None
        elif point.kind == "steps":
            records = read_metrics(output_dir)
            starts = [k for k, record in enumerate(records) if record.get("event") == "start"]
            if len(starts) > starts_before:
                target = records[starts[-1]]["resumed_from_step"] + point.steps
                if any(record.get("step", 0) >= target for record in records[starts[-1] + 1 :]):
                    time.sleep(point.delay_s)
                    return None
        else:
            new = set(os.listdir(checkpoints)) - present if checkpoints.is_dir() else set()
            if new:
                time.sleep(point.delay_s)
                writers = [name.rsplit("-", 1)[1] for name in new if ".tmp-" in name]
                return int(writers[0]) if writers else None
        time.sleep(POLL_S if point.kind == "checkpoint" else 10 * POLL_S)


def run_killed_attempt(config, world: Stage2World, point: KillPoint, arguments: Path, log_path: Path) -> KilledAttempt:
    output_dir = train_output_dir(config, world.train_sources)
    complete_at_launch = complete_steps(output_dir)
    starts_before = len(start_events(output_dir))
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(arguments)], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    launched, first = time.monotonic(), None
    try:
        first = wait_for_kill_point(process, output_dir, point, starts_before, launched)
    finally:
        kill_job(process, first)
    records = read_metrics(output_dir)
    starts = [k for k, record in enumerate(records) if record.get("event") == "start"]
    attempt_steps = [record["step"] for record in records[starts[-1] :] if "step" in record] if starts else []
    return KilledAttempt(
        point=point,
        complete_at_launch=complete_at_launch,
        starts_before=starts_before,
        starts_after=len(starts),
        last_step=max(attempt_steps) if len(starts) > starts_before and attempt_steps else None,
        complete_at_kill=complete_steps(output_dir),
        half_written=temporary_folders(output_dir),
        final_complete=is_complete(output_dir / FINAL_DIR),
        log=log_path.read_text(errors="replace"),
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Stage2World:
    return stage2_world(tmp_path_factory.getbasetemp() / "stage2")


@pytest.fixture(scope="module")
def reference(world, ray_cluster, tmp_path_factory) -> TrainResult:
    """The same training, uninterrupted."""
    config = world.config(work_dir=tmp_path_factory.mktemp("stage2-reference"), iterations=ITERATIONS,
                          checkpoint_every=CHECKPOINT_EVERY)  # fmt: skip
    return train(config, world.train_sources)


@pytest.fixture(scope="module")
def killed(world, ray_cluster, tmp_path_factory) -> KilledRun:
    """The training command (a subprocess with its own Ray cluster) SIGKILLed at each point of the plan and run again,
    then run to the end in this process."""
    folder = tmp_path_factory.mktemp("stage2-killed")
    config = world.config(work_dir=folder / "work", iterations=ITERATIONS, checkpoint_every=CHECKPOINT_EVERY)
    arguments = folder / "train-args.pkl"
    arguments.write_bytes(pickle.dumps((config, world.train_sources)))
    attempts = []
    for number, point in enumerate(kill_plan(PLAN_SEED)):
        attempts.append(run_killed_attempt(config, world, point, arguments, folder / f"attempt-{number}.log"))
    summary = [dataclasses.asdict(attempt) | {"log": f"attempt-{k}.log"} for k, attempt in enumerate(attempts)]
    (folder / "kills.json").write_text(json.dumps(summary, indent=1))  # beside the attempt logs, for a failing run
    output_dir = train_output_dir(config, world.train_sources)
    complete_before_rerun = complete_steps(output_dir)
    result = train(config, world.train_sources)
    return KilledRun(config, attempts, complete_before_rerun, result)


def test_the_kills_land_where_planned(killed):
    attempts = killed.attempts
    assert len(attempts) == KILLS and not any(attempt.final_complete for attempt in attempts)
    assert sorted(attempt.point.kind for attempt in attempts) == ["checkpoint", "startup", "startup", "steps", "steps"]
    for attempt in attempts:
        if attempt.point.kind == "steps":  # 6..10 steps past the resume point: a new checkpoint is complete
            assert attempt.last_step is not None, attempt.log[-3000:]
            resumed = max(attempt.complete_at_launch, default=0)
            assert attempt.last_step >= resumed + attempt.point.steps
            assert max(attempt.complete_at_kill) >= resumed + CHECKPOINT_EVERY
    after_a_checkpoint = [attempt for attempt in attempts if attempt.complete_at_kill]
    assert len(after_a_checkpoint) >= 2  # resume is exercised, not only restarts from scratch
    assert killed.complete_before_rerun and max(killed.complete_before_rerun) < ITERATIONS


def test_every_attempt_resumes_from_the_newest_complete_checkpoint(killed):
    """A kill leaves at most one start event; each start resumes from the newest checkpoint that was complete when
    the attempt was launched (never a half-written one, never from scratch when a checkpoint exists)."""
    records = read_metrics(killed.result.output_dir)
    starts = [record for record in records if record.get("event") == "start"]
    launched_with = []
    for attempt in killed.attempts:
        assert attempt.starts_after - attempt.starts_before in (0, 1)
        if attempt.starts_after > attempt.starts_before:
            launched_with.append(max(attempt.complete_at_launch, default=0))
    launched_with.append(max(killed.complete_before_rerun, default=0))
    assert len(starts) == len(launched_with) == killed.attempts[-1].starts_after + 1
    assert [start["resumed_from_step"] for start in starts] == launched_with
    for start in starts:
        assert start["resumed_from"] in ((None,) if start["resumed_from_step"] == 0 else ("stable", "ray"))


def test_each_attempt_logs_consecutive_steps_and_the_last_one_finishes(killed):
    records = read_metrics(killed.result.output_dir)
    lines = (killed.result.output_dir / METRICS_FILE).read_text().splitlines()
    assert len(lines) == len(records)  # no torn line: a kill never merged two records
    starts = [k for k, record in enumerate(records) if record.get("event") == "start"]
    for begin, end in zip(starts, starts[1:] + [len(records)]):
        resumed = records[begin]["resumed_from_step"]
        steps = [record["step"] for record in records[begin + 1 : end]]
        assert steps == list(range(resumed + 1, resumed + 1 + len(steps)))  # no gap, no duplicate, no restart
    last = records[starts[-1]]["resumed_from_step"]
    assert [record["step"] for record in records[starts[-1] + 1 :]] == list(range(last + 1, ITERATIONS + 1))
    result = killed.result
    assert (result.final_step, result.resumed_from_step, result.steps_done) == (ITERATIONS, last, ITERATIONS - last)
    assert read_meta(result.checkpoint_dir)["step"] == ITERATIONS


def test_redone_steps_repeat_the_uninterrupted_run_exactly(killed, reference):
    """Every step record of every attempt (steps redone after a kill included) has the loss, bce, dice and lr of the
    uninterrupted run's record for that step."""
    expected = {record["step"]: [record[key] for key in STEP_FIELDS] for record in read_metrics(reference.output_dir)
                if "step" in record}  # fmt: skip
    assert sorted(expected) == list(range(1, ITERATIONS + 1))
    steps = [record for record in read_metrics(killed.result.output_dir) if "step" in record]
    assert {record["step"] for record in steps} == set(expected)  # no lost step
    assert len(steps) > ITERATIONS  # some steps were redone
    for record in steps:
        assert [record[key] for key in STEP_FIELDS] == expected[record["step"]], record["step"]


def test_final_weights_equal_the_uninterrupted_run(killed, reference):
    assert killed.result.train_name == reference.train_name
    mine = load_file(str(killed.result.checkpoint_dir / WEIGHTS_FILE))
    theirs = load_file(str(reference.checkpoint_dir / WEIGHTS_FILE))
    assert set(mine) == set(theirs)
    assert [key for key in theirs if not torch.equal(mine[key], theirs[key])] == []


def test_only_complete_checkpoints_are_left(killed):
    """Half-written checkpoint folders of killed writers are cleaned up; the newest ``keep_checkpoints`` remain."""
    output_dir = killed.result.output_dir
    keep = killed.config.stage2.keep_checkpoints
    newest = list(range(ITERATIONS - CHECKPOINT_EVERY * (keep - 1), ITERATIONS + 1, CHECKPOINT_EVERY))
    assert sorted(os.listdir(output_dir / CHECKPOINTS_DIR)) == [step_dir_name(step) for step in newest]
    assert complete_steps(output_dir) == newest
    assert sorted(os.listdir(output_dir)) == sorted([CHECKPOINTS_DIR, FINAL_DIR, METRICS_FILE, "resolved_config.json"])
