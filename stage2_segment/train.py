"""Stage-2 training on Ray Train: SAM adapters, projector and mask decoder from cached stage-1 shards.

``train(config, sources)`` runs one ``TorchTrainer`` whose workers each execute ``train_func``. Every optimizer step
accumulates ``global_batch / (micro_batch * num_workers)`` micro-batches per worker, averages the gradients of the
trained parameters across workers (one all-reduce per step; the frozen encoder never takes part), then steps AdamW
and a warmup + linear-decay schedule. Outputs under ``<work_dir>/stage2/<train name>/``::

    resolved_config.json
    metrics.jsonl               rank 0: one line per optimizer step (loss, bce, dice, lr, samples/s) and one
                                {"event": "start"} line per attempt, saying where it resumed from
    checkpoints/step_NNNNNN/    rank 0, every ``checkpoint_every`` steps and at the end (see ``checkpoint.py``)
    final/                      the trained parts at the last step: what ``evaluate`` and ``infer`` read
    diverged.json               only after a non-finite step: the step and its values (nothing is exported then)

``train`` holds ``<work_dir>/stage2/train.lock`` (``train_lock``) and refuses unfinished stage-1 data unless
``allow_partial`` (``train_inputs``).

The train name is a hash of everything that changes the trained weights (stage-2 settings, sources and their stage-1
run keys, the training mix), so rerunning the same command resumes: within a run Ray restores the last reported
checkpoint after a worker failure (``ray.train.get_checkpoint()``, ``FailureConfig``); across process restarts the
newest complete checkpoint in ``checkpoints/`` is used. Whichever has the higher step wins; the step count continues.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from shared.config import PipelineConfig
from shared.paths import resolve_sam_checkpoint
from shared.ray_cluster import ensure_ray
from shared.shards import run_key
from stage2_segment.checkpoint import (
    find_latest,
    is_complete,
    prune,
    publish_checkpoint,
    read_meta,
    restore_newest,
    sam_provenance,
    step_dir_name,
    write_checkpoint,
)
from stage2_segment.data import (
    ExampleError,
    MixtureSampler,
    ShardStore,
    Stage2Dataset,
    Stage2Source,
    build_index,
)
from stage2_segment.modeling import AdaptedSam, build_adapted_sam, get_variant
from stage2_segment.optim import (
    DIVERGED_FILE,
    NonFiniteLossError,
    build_optimizer,
    divergence_error,
    lr_schedule,
    optimizer_step,
    record_divergence,
)
from stage2_segment.train_inputs import require_complete, shard_set
from stage2_segment.train_log import METRICS_FILE, read_metrics
from stage2_segment.train_progress import watch_training
from stage2_segment.train_log import append_jsonl as _append_jsonl
from stage2_segment.train_lock import store_train_lock, train_lock

logger = logging.getLogger(__name__)

FINAL_DIR = "final"
CHECKPOINTS_DIR = "checkpoints"
RAY_CHECKPOINTS_KEPT = 2
MAX_SUBSTITUTIONS = 16
# Settings that do not change the trained weights, left out of the train name.
NAME_EXCLUDED_KEYS = ("eval_batch", "checkpoint_every", "loader_workers", "keep_checkpoints")


@dataclass(frozen=True)
class TrainResult:
    """What a ``train`` call produced."""

    train_name: str
    output_dir: Path  # <work_dir>/stage2/<train name>
    checkpoint_dir: Path  # output_dir / "final": pass to evaluate() and infer()
    final_step: int
    steps_done: int  # optimizer steps run by this call (0 when the run was already complete)
    resumed_from_step: int
    final_loss: float | None
    samples_per_s: float | None


def sam_checkpoint_path(config: PipelineConfig) -> Path | None:
    """``stage2.sam_checkpoint``: a committed name (``"mini-sam"``) or a path resolved against the config's folder;
    None for a random SAM."""
    return resolve_sam_checkpoint(config.stage2.sam_checkpoint, config.base_dir)


def train_settings(config: PipelineConfig, sources: list[Stage2Source]) -> dict[str, Any]:
    """Everything that changes the trained weights: the train name is a hash of it."""
    stage2 = {k: v for k, v in dataclasses.asdict(config.stage2).items() if k not in NAME_EXCLUDED_KEYS}
    return {
        "stage2": stage2,
        "sources": [{"spec": source.spec, "run_key": source.run_key, "manifest": Path(source.manifest).name}
                    for source in sources],  # the name tells a training view without held-out images apart
        "sample_rates": dict(sorted(config.data.sample_rates.items())),
        "max_samples_per_manifest": config.data.max_samples_per_manifest,
        "shards": shard_set(sources),  # the done shards read, by content: new data means a new training
    }


def train_name(config: PipelineConfig, sources: list[Stage2Source]) -> str:
    """``<variant>-<12 hex>``, stable for the same training settings."""
    return run_key(train_settings(config, sources), label=config.stage2.sam_variant)


def train_output_dir(config: PipelineConfig, sources: list[Stage2Source]) -> Path:
    return config.work_dir / "stage2" / train_name(config, sources)


def gradient_accumulation(config: PipelineConfig) -> int:
    """Micro-batches per worker per optimizer step; raises ValueError naming the keys when they do not divide."""
    s2, workers = config.stage2, config.ray.num_workers
    per_pass = s2.micro_batch * workers
    if s2.global_batch % per_pass:
        raise ValueError(
            f"stage2.global_batch ({s2.global_batch}) must be a multiple of stage2.micro_batch ({s2.micro_batch}) "
            f"x ray.num_workers ({workers}) = {per_pass}"
        )
    return s2.global_batch // per_pass


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch ``k`` of one worker: step ``first_step + k // accumulation``, slice ``k % accumulation`` of that
    step's draw. A sample whose image or mask cannot be used is replaced by the next index (and logged)."""

    def __init__(
        self, dataset: Stage2Dataset, sampler: MixtureSampler, rank: int, first_step: int, last_step: int,
        micro_batch: int, accumulation: int,
    ) -> None:  # fmt: skip
        self.dataset, self.sampler, self.rank = dataset, sampler, rank
        self.first_step, self.last_step = first_step, last_step
        self.micro_batch, self.accumulation = micro_batch, accumulation

    def __len__(self) -> int:
        return max(0, self.last_step - self.first_step + 1) * self.accumulation

    def __getitem__(self, k: int) -> dict[str, Any]:
        step, part = self.first_step + k // self.accumulation, k % self.accumulation
        draw = self.sampler.draw(step, self.rank, self.micro_batch * self.accumulation)
        indices = [int(i) for i in draw[part * self.micro_batch : (part + 1) * self.micro_batch]]
        for _ in range(MAX_SUBSTITUTIONS):
            try:
                return self.dataset.load_batch(indices)
            except ExampleError as error:
                logger.warning("skipping a training sample: %s", error)
                indices = [(i + 1) % len(self.dataset) if i == error.index else i for i in indices]
        raise RuntimeError(f"step {step}: {MAX_SUBSTITUTIONS} unusable samples in a row; check the data")


def train_func(loop_config: dict[str, Any]) -> None:
    """Ray Train worker loop; ``loop_config`` is built by ``train``."""
    import ray.train
    import ray.train.torch

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config: PipelineConfig = loop_config["config"]
    s2 = config.stage2
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, config.ray.cpus_per_worker))
    use_bf16 = s2.precision == "bf16" and device.type == "cuda"
    output_dir = Path(loop_config["output_dir"])
    checkpoints_dir = output_dir / CHECKPOINTS_DIR
    accumulation = loop_config["accumulation"]

    index = build_index(loop_config["sources"], config.data.max_samples_per_manifest)
    image_size = get_variant(s2.sam_variant).image_size
    dataset = Stage2Dataset(index, config.data_root, image_size, ShardStore(loop_config["shard_cache_dir"]))
    # the node's workers split the shard cache's first build between them (a worker builds the rest on first use)
    part = (context.get_local_rank(), context.get_local_world_size())
    dataset.store.warm(index.shards, config.ray.cpus_per_worker, part)
    sampler = MixtureSampler(dataset.rows["family"], dataset.rows["dataset"], config.data.sample_rates, s2.seed)
    model = build_adapted_sam(
        s2.sam_variant, index.llm_dim, s2.adapter_blocks, loop_config["sam_checkpoint"], s2.seed, device="cpu"
    ).to(device)
    model.train()
    optimizer = build_optimizer(model.trainable_parameters(), s2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(s2.warmup_iterations, s2.iterations))
    if config.work_store is not None:  # an object-store work dir: what this node's mirror lacks to resume from
        config.work_store.pull(output_dir)
    start_step, origin, restored = restore_newest(model, optimizer, scheduler, checkpoints_dir)
    if world > 1:
        steps = torch.tensor([start_step, -start_step], dtype=torch.int64, device=device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if steps[0].item() != -steps[1].item():
            raise RuntimeError(f"workers found different checkpoints to resume from (steps {-steps[1]}..{steps[0]}); "
                               f"{output_dir} must be on storage every node sees")  # fmt: skip
        for parameter in model.trainable_parameters():
            dist.broadcast(parameter.data, src=0)
    metrics_path = output_dir / METRICS_FILE
    if rank == 0:
        start_event = {"event": "start", "resumed_from_step": start_step, "resumed_from": origin, "world_size": world,
                       "accumulation": accumulation, "time": time.time()}  # fmt: skip
        _append_jsonl(metrics_path, start_event)
        logger.info("training %s: steps %d..%d, %d workers x %d micro-batches of %d; mix: %s", loop_config["name"],
                    start_step + 1, s2.iterations, world, accumulation, s2.micro_batch, sampler.describe())  # fmt: skip

    plan = MicroBatches(dataset, sampler, rank, start_step + 1, s2.iterations, s2.micro_batch, accumulation)
    loader = iter(torch.utils.data.DataLoader(plan, batch_size=None, num_workers=s2.loader_workers,
                                              pin_memory=device.type == "cuda"))  # fmt: skip
    log_every = max(1, s2.iterations // 20)
    metrics: dict[str, Any] = restored.get("metrics") or {}
    for step in range(start_step + 1, s2.iterations + 1):
        started = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        try:
            losses = optimizer_step(model, optimizer, (next(loader) for _ in range(accumulation)), s2, device,
                                    use_bf16, world)  # fmt: skip
        except NonFiniteLossError as error:  # every worker sees the same all-reduced values and stops here
            logger.error("step %d: %s; stopping without exporting", step, error)
            if rank == 0:
                record_divergence(output_dir, step, error, find_latest(checkpoints_dir))
            return
        scheduler.step()
        seconds = time.perf_counter() - started
        metrics = {"step": step, "loss": losses["loss"], "bce": losses["bce"], "dice": losses["dice"], "lr": lr,
                   "samples_per_s": losses["samples"] / seconds, "step_s": seconds, "time": time.time()}  # fmt: skip
        if rank == 0:
            _append_jsonl(metrics_path, metrics)
            if step == start_step + 1 or step % log_every == 0 or step == s2.iterations:
                logger.info("step %d/%d loss %.4f (bce %.4f dice %.4f) lr %.2e %.1f samples/s", step, s2.iterations,
                            metrics["loss"], metrics["bce"], metrics["dice"], lr, metrics["samples_per_s"])  # fmt: skip
        if step % s2.checkpoint_every == 0 or step == s2.iterations:
            checkpoint = None
            if rank == 0:
                folder = write_checkpoint(
                    checkpoints_dir / step_dir_name(step), model, _meta(loop_config, model, step, world, metrics),
                    config, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                )  # fmt: skip
                dropped = prune(checkpoints_dir, s2.keep_checkpoints)
                publish_checkpoint(config.work_store, folder, metrics_path, dropped)
                checkpoint = ray.train.Checkpoint.from_directory(str(folder))
            ray.train.report(
                {"step": step, "loss": metrics["loss"]}, checkpoint=checkpoint, checkpoint_dir_name=step_dir_name(step),
                delete_local_checkpoint_after_upload=False,
            )  # fmt: skip
    if rank == 0:
        final_meta = _meta(loop_config, model, max(start_step, s2.iterations), world, metrics)
        write_checkpoint(output_dir / FINAL_DIR, model, final_meta, config)
        publish_checkpoint(config.work_store, output_dir / FINAL_DIR, metrics_path)
        logger.info("exported the trained parts to %s", output_dir / FINAL_DIR)


def _meta(loop_config: dict[str, Any], model: AdaptedSam, step: int, world: int, metrics: dict) -> dict[str, Any]:
    config: PipelineConfig = loop_config["config"]
    args = model.build_args
    return {
        "train_name": loop_config["name"],
        "step": step,
        "iterations": config.stage2.iterations,
        "model": {key: args[key] for key in ("variant", "llm_dim", "adapter_blocks", "projector_hidden_dim", "seed")},
        "sam_checkpoint": loop_config["sam"],
        "sampler": {"scheme": "numpy default_rng([seed, rank, step]) per step", "seed": config.stage2.seed,
                    "next_step": step + 1, "world_size": world, "micro_batch": config.stage2.micro_batch,
                    "accumulation": loop_config["accumulation"]},  # fmt: skip
        "sources": [{"spec": s.spec, "run_key": s.run_key, "manifest": str(s.manifest), "shard_dir": str(s.shard_dir)}
                    for s in loop_config["sources"]],  # fmt: skip
        "metrics": metrics,
    }


def _result(output_dir: Path, steps_done: int) -> TrainResult:
    meta = read_meta(output_dir / FINAL_DIR)
    records = read_metrics(output_dir)
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    attempt = records[starts[-1] + 1 :] if starts else records
    steps = [r for r in attempt if "step" in r]
    seconds = sum(r["step_s"] for r in steps)
    return TrainResult(
        train_name=meta["train_name"],
        output_dir=output_dir,
        checkpoint_dir=output_dir / FINAL_DIR,
        final_step=meta["step"],
        steps_done=steps_done,
        resumed_from_step=records[starts[-1]]["resumed_from_step"] if starts else 0,
        final_loss=(meta.get("metrics") or {}).get("loss"),
        samples_per_s=sum(r["samples_per_s"] * r["step_s"] for r in steps) / seconds if seconds else None,
    )


def train(config: PipelineConfig, sources: list[Stage2Source], allow_partial: bool = False) -> TrainResult:
    """Train (or resume training) the adapted SAM on ``sources``; returns where the trained parts are. One ``train``
    per work dir at a time (``train_lock``).

    Raises:
        ValueError: batch sizes that do not divide (naming the keys), sources without usable samples, a family
            without a sample rate; ``PartialDataError``: unfinished stage-1 shards (unless ``allow_partial``);
            ``TrainingDivergedError``: a non-finite step (the last finite checkpoint is kept, nothing exported).
        TrainLockedError: another ``train`` is running in this work dir.
        ray.train.TrainingFailedError: the workers failed more than ``ray.max_failures`` times.
    """
    with train_lock(config.work_dir), store_train_lock(config):
        return _train(config, sources, allow_partial)


def _train(config: PipelineConfig, sources: list[Stage2Source], allow_partial: bool) -> TrainResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    accumulation = gradient_accumulation(config)
    name = train_name(config, sources)
    output_dir = config.work_dir / "stage2" / name
    final = output_dir / FINAL_DIR
    store = config.work_store  # an object-store work dir: the mirror gets the shards it reads and the run so far
    for folder in sorted({s.shard_dir.parent for s in sources} | {output_dir}) if store is not None else []:
        if store.contains(folder):
            store.pull(folder)
    if is_complete(final) and read_meta(final)["step"] >= config.stage2.iterations:
        logger.info("stage 2 %s is already trained to step %d: %s", name, read_meta(final)["step"], final)
        return _result(output_dir, 0)
    for stale in output_dir.glob(f"{FINAL_DIR}.tmp-*"):  # an export cut short by a kill; the rerun exports again
        logger.warning("removing %s, left by a killed export", stale)
        shutil.rmtree(stale, ignore_errors=True)
    index = build_index(sources, config.data.max_samples_per_manifest)  # data problems fail here, before Ray starts
    require_complete(index.reports, allow_partial)
    (output_dir / DIVERGED_FILE).unlink(missing_ok=True)
    mix = MixtureSampler(index.table["family"].to_pylist(), index.table["dataset"].to_pylist(),
                         config.data.sample_rates, config.stage2.seed)  # fmt: skip
    logger.info("stage 2 %s: %d training samples; mix %s", name, len(index), mix.describe())
    sam_path = sam_checkpoint_path(config)
    config.write_resolved(output_dir)
    before = read_metrics(output_dir)
    loop_config = {
        "config": config,
        "sources": list(sources),
        "name": name,
        "output_dir": str(output_dir),
        "accumulation": accumulation,
        "sam_checkpoint": str(sam_path) if sam_path else None,
        "sam": sam_provenance(sam_path),
        "shard_cache_dir": str(config.work_dir / "stage2" / "shard_cache"),
    }
    storage = f"{store.uri}/ray_results" if store is not None else str(config.work_dir / "ray_results")
    if "://" in config.ray.storage_path:  # cloud storage URI (s3://, gs://, ...): as given
        storage = config.ray.storage_path
    elif config.ray.storage_path:
        storage = str(Path(config.base_dir, config.ray.storage_path).resolve())
    started_ray = ensure_ray(config)
    try:
        trainer = TorchTrainer(
            train_func,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=config.ray.num_workers, use_gpu=config.ray.use_gpu,
                                         resources_per_worker={"CPU": config.ray.cpus_per_worker}),
            run_config=RunConfig(name=name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=config.ray.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=RAY_CHECKPOINTS_KEPT)),
        )  # fmt: skip
        done_before = max((r["step"] for r in before if "step" in r), default=0)
        with watch_training(output_dir / METRICS_FILE, config.stage2.iterations, done_before):
            trainer.fit()
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    if store is not None:  # rank 0 published the export, perhaps from another node
        store.pull(output_dir)
    diverged = divergence_error(output_dir, name)
    if diverged is not None:
        raise diverged
    if not is_complete(final):
        raise RuntimeError(f"stage-2 training {name} ended without exporting {final}")
    new_steps = [r for r in read_metrics(output_dir)[len(before) :] if "step" in r]
    result = _result(output_dir, len({r["step"] for r in new_steps}))
    logger.info("stage 2 %s: step %d, loss %s, %.1f samples/s -> %s", name, result.final_step, result.final_loss,
                result.samples_per_s or 0.0, result.checkpoint_dir)  # fmt: skip
    return result
