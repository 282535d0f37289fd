"""Stage-2 training on Ray Train (2 CPU workers, tiny SAM): trained-parts-only checkpoints, metrics, SIGKILL + resume,
batch-size checks, and no LLM code in the stage-2 process."""

from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.config import RayConfig
from stage2_fixtures import DIM, killed_and_resumed_run, stage2_world
from stage2_segment.checkpoint import (
    COMPLETE_MARKER,
    META_FILE,
    TRAINING_STATE_FILE,
    WEIGHTS_FILE,
    list_complete,
    load_training_state,
    read_meta,
)
from stage2_segment.modeling import build_adapted_sam
from stage2_segment.train import CHECKPOINTS_DIR, gradient_accumulation, lr_schedule, read_metrics, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return stage2_world(tmp_path_factory.getbasetemp() / "stage2")


@pytest.fixture(scope="module")
def run(world, ray_cluster):
    return killed_and_resumed_run(world)


def test_checkpoints_hold_only_the_trained_parts(run):
    result = run.result
    fresh = build_adapted_sam("tiny", DIM, seed=0)
    expected = fresh.trainable_state_dict()
    folders = [result.checkpoint_dir] + [folder for _, folder in list_complete(result.output_dir / CHECKPOINTS_DIR)]
    assert len(folders) == 1 + run.config.stage2.keep_checkpoints
    for folder in folders:
        weights = load_file(str(folder / WEIGHTS_FILE))
        assert set(weights) == set(expected)
        assert not [key for key in weights if key.startswith(("image_encoder.", "prompt_encoder."))]
        assert {key: tuple(value.shape) for key, value in weights.items()} == {
            key: tuple(value.shape) for key, value in expected.items()
        }
        assert (folder / COMPLETE_MARKER).is_file()
    trained = sum(value.numel() for value in expected.values())
    total = sum(value.numel() for value in fresh.state_dict().values())
    assert trained < 0.5 * total
    assert (result.checkpoint_dir / WEIGHTS_FILE).stat().st_size < 4 * trained + 64 * 1024  # float32 + header only
    assert not (result.checkpoint_dir / TRAINING_STATE_FILE).exists()

    final = load_file(str(result.checkpoint_dir / WEIGHTS_FILE))
    assert any(not torch.equal(final[key], expected[key]) for key in expected)  # training changed the weights

    meta = read_meta(result.checkpoint_dir)
    assert json.loads((result.checkpoint_dir / META_FILE).read_text()) == meta
    assert meta["format"] == "llavaseg-stage2-checkpoint-v1" and meta["trainable_keys"] == len(expected)
    assert meta["step"] == 30 and meta["train_name"] == result.train_name
    assert meta["model"] == {"variant": "tiny", "llm_dim": DIM, "adapter_blocks": [1, 3], "projector_hidden_dim": DIM,
                             "seed": 0}  # fmt: skip
    assert meta["sam_checkpoint"] is None
    assert meta["sampler"]["next_step"] == 31 and meta["sampler"]["world_size"] == 2
    assert meta["sampler"]["accumulation"] == 1
    resolved = json.loads((result.checkpoint_dir / "resolved_config.json").read_text())
    assert resolved == json.loads(json.dumps(run.config.to_dict()))

    step, latest = list_complete(result.output_dir / CHECKPOINTS_DIR)[-1]
    state = load_training_state(latest)
    assert step == 30 and state["scheduler"]["last_epoch"] == 30
    assert all(entry["step"].item() == 30 for entry in state["optimizer"]["state"].values())


def test_metrics_log_every_step_and_the_loss_goes_down(run):
    records = read_metrics(run.result.output_dir)
    latest = {record["step"]: record for record in records if "step" in record}
    assert sorted(latest) == list(range(1, 31))
    losses = [latest[step]["loss"] for step in range(1, 31)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05
    assert all(record["samples_per_s"] > 0 and record["lr"] > 0 for record in latest.values())
    factor = lr_schedule(2, 30)
    assert [latest[step]["lr"] for step in (1, 2, 3, 30)] == pytest.approx([1e-3 * factor(k) for k in (0, 1, 2, 29)])


def test_sigkill_then_rerun_resumes_from_the_last_complete_checkpoint(world, run):
    assert not run.final_complete_at_kill, "the first run finished before it was killed; the test needs a longer run"
    assert run.complete_steps_at_kill, run.killed_log[-3000:]
    last = max(run.complete_steps_at_kill)
    assert last % run.config.stage2.checkpoint_every == 0

    records = read_metrics(run.result.output_dir)
    starts = [k for k, record in enumerate(records) if record.get("event") == "start"]
    assert len(starts) == 2
    assert records[starts[0]]["resumed_from_step"] == 0
    assert records[starts[1]]["resumed_from_step"] == last
    assert records[starts[1]]["resumed_from"] in ("stable", "ray")
    after = [record["step"] for record in records[starts[1] + 1 :]]
    assert after == list(range(last + 1, 31))  # continues, does not restart

    result = run.result
    assert (result.final_step, result.resumed_from_step, result.steps_done) == (30, last, 30 - last)
    # The killed attempt and the resumed one draw the same data from the same state: equal losses where both ran.
    killed = {record["step"]: record["loss"] for record in records[starts[0] + 1 : starts[1]]}
    resumed = {record["step"]: record["loss"] for record in records[starts[1] + 1 :]}
    for step in set(killed) & set(resumed):
        assert resumed[step] == pytest.approx(killed[step], rel=1e-4), step

    again = train(run.config, world.train_sources)  # a third run finds the final export and does nothing
    assert (again.steps_done, again.final_step, again.checkpoint_dir) == (0, 30, result.checkpoint_dir)


def test_batch_sizes_must_divide(world):
    config = world.config(global_batch=10, micro_batch=4)
    with pytest.raises(ValueError) as error:
        gradient_accumulation(config)
    for key in ("stage2.global_batch (10)", "stage2.micro_batch (4)", "ray.num_workers (2)"):
        assert key in str(error.value)
    config = dataclasses.replace(world.config(global_batch=24, micro_batch=3), ray=RayConfig(num_workers=4))
    assert gradient_accumulation(config) == 2


def test_stage2_never_imports_llm_code(world, tmp_path):
    """A stage-2 process imports train/evaluate/infer and takes a real optimizer step with no vLLM, transformers or
    stage-1 module loaded."""
    config = world.config(work_dir=tmp_path / "work")
    arguments = tmp_path / "args.pkl"
    arguments.write_bytes(pickle.dumps((config, world.train_sources)))
    script = textwrap.dedent(
        """
        import json, pickle, sys
        import torch
        torch.set_num_threads(1)
        import stage2_segment.evaluate, stage2_segment.infer, stage2_segment.train
        from stage2_segment.data import ShardStore, Stage2Dataset, build_index
        from stage2_segment.modeling import build_adapted_sam
        from stage2_segment.train import optimizer_step

        config, sources = pickle.load(open(sys.argv[1], "rb"))
        index = build_index(sources)
        dataset = Stage2Dataset(index, config.data_root, 256, ShardStore())
        model = build_adapted_sam("tiny", index.llm_dim, seed=0)
        optimizer = torch.optim.AdamW(list(model.trainable_parameters()), lr=1e-3)
        before = model.projector.fc1.weight.detach().clone()
        losses = optimizer_step(model, optimizer, [dataset.load_batch([0, 1])], config.stage2, torch.device("cpu"))
        llm_modules = sorted(m for m in sys.modules if m.split(".")[0] in ("vllm", "transformers", "stage1_reason"))
        changed = not torch.equal(before, model.projector.fc1.weight)
        print(json.dumps({"llm_modules": llm_modules, "loss": losses["loss"], "samples": losses["samples"],
                          "changed": changed}))
        """
    )
    completed = subprocess.run([sys.executable, "-c", script, str(arguments)], cwd=REPO, capture_output=True, text=True,
                               timeout=300)  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["llm_modules"] == []
    assert report["samples"] == 2 and report["loss"] > 0 and report["changed"]


def test_a_killed_worker_is_replaced_and_training_continues_exactly(world, run, tmp_path):
    """SIGKILL one Ray Train worker after the first checkpoint: FailureConfig restarts the worker group, which resumes
    from the last checkpoint, and the final weights equal those of the SIGKILLed-and-rerun run (same settings, same
    data order), bit for bit."""
    import threading
    import time

    import psutil

    from stage2_segment.train import train_output_dir

    config = world.config(work_dir=tmp_path / "work")
    config = dataclasses.replace(config, ray=dataclasses.replace(config.ray, max_failures=3))  # not in the train name
    output_dir = train_output_dir(config, world.train_sources)
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = train(config, world.train_sources)
        except BaseException as error:  # reported below
            outcome["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    killed = None
    while thread.is_alive():
        if killed is None and list_complete(output_dir / CHECKPOINTS_DIR):
            workers = []
            for process in psutil.Process().children(recursive=True):
                try:
                    if "RayTrainWorker" in " ".join(process.cmdline()):
                        workers.append(process)
                except psutil.Error:  # exited meanwhile
                    continue
            if workers:
                killed = max(workers, key=lambda process: process.pid)
                killed.kill()
        time.sleep(0.02)
    thread.join()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    records = read_metrics(output_dir)
    starts = [record for record in records if record.get("event") == "start"]
    assert killed is not None and len(starts) == 2 and starts[1]["resumed_from_step"] >= 5
    assert result.final_step == 30 and sorted({r["step"] for r in records if "step" in r}) == list(range(1, 31))
    mine = load_file(str(result.checkpoint_dir / WEIGHTS_FILE))
    theirs = load_file(str(run.result.checkpoint_dir / WEIGHTS_FILE))
    assert result.train_name == run.result.train_name
    assert all(torch.equal(mine[key], theirs[key]) for key in theirs)


def test_a_torn_metrics_line_loses_only_itself(tmp_path):
    from stage2_segment.train import METRICS_FILE, _append_jsonl

    path = tmp_path / METRICS_FILE
    _append_jsonl(path, {"step": 1, "loss": 1.0})
    with path.open("a") as handle:
        handle.write('{"step": 2, "lo')  # a writer killed mid-line
    _append_jsonl(path, {"event": "start", "resumed_from_step": 0})
    _append_jsonl(path, {"step": 1, "loss": 1.0})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"event": "start", "resumed_from_step": 0},
                                      {"step": 1, "loss": 1.0}]  # fmt: skip
