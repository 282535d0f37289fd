"""Stage 1 on a Ray cluster: a Ray Data actor pool of engines over shard tasks, the same exactly-once shard layout.

Each actor holds one engine (``stage1.replicas`` actors, each with ``tensor_parallel_size`` GPUs when ``ray.use_gpu``) and
processes whole shards with the same functions as the local path, writing the shard files itself (temp name + rename,
done file last), so a lost actor or a killed job costs at most the shards in flight. Generation runs as one pass and
embedding as a second pass, so each actor holds one engine at a time. An actor works on a shard only while it holds the
shard's lease (``shared.leases``), and skips a shard another job holds or finished, so concurrent jobs on one run
folder write each shard once.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from shared.config import PipelineConfig
from shared.ray_cluster import ensure_ray

log = logging.getLogger(__name__)


class _ShardWorker:
    """A Ray Data callable class: builds its engine once, then runs ``phase`` for each shard task in a batch."""

    def __init__(self, config: PipelineConfig, model_path: str, phase: str, metadata: dict[str, str], dim: int,
                 finished: Any = None):
        from shared.leases import ShardLeases
        from stage1_reason import backends, shard_phases

        self.config, self.phase, self.metadata, self.dim = config, phase, metadata, dim
        self.phases = shard_phases
        self.leases, self.finished = ShardLeases(config.stage1.lease_timeout_s), finished
        if phase == "generate":
            self.engine = backends.make_generation_backend(config, model_path)
        else:
            self.engine = backends.make_embedder_for(config, model_path)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import json

        import pyarrow as pa
        import pyarrow.compute as pc

        out = []
        for task_json in batch["task"]:
            task = self.phases.ShardTask(**json.loads(task_json))
            table = self.phases.read_manifest_rows(Path(task.manifest_path))
            rows = table.filter(pc.is_in(table["sample_id"], pa.array(task.sample_ids)))
            if not self._claim(task):
                out.append(json.dumps({"skipped": task.path, "generated": 0}))
                continue
            try:
                out.append(self._run(task, rows))
            finally:
                self.leases.release(Path(task.path))
        return {"result": np.array(out, dtype=object)}

    def _claim(self, task: Any) -> bool:
        """The shard's lease, when no live job holds it and it is still to do in this phase."""
        if not self.leases.acquire(Path(task.path)):
            return False
        to_do = not (self.finished and self.finished(task))
        if to_do and self.phase == "embed":
            to_do = self.phases.gen_path(task).is_file()  # its generator died before finishing: a later round
        if not to_do:
            self.leases.release(Path(task.path))
        return to_do

    def _run(self, task: Any, rows: Any) -> str:
        import json

        if self.phase == "generate":
            return json.dumps({"generated": self.phases.generate_shard(task, rows, self.engine, self.config)})
        return json.dumps(self.phases.embed_shard(task, rows, self.engine, self.config, self.metadata, self.dim))


def run_phases_on_ray(
    config: PipelineConfig, model_path: str, pending: list[Any], to_generate: list[Any], metadata: dict[str, str], dim: int,
    finished: Any = None,
) -> tuple[list[dict[str, Any]], int]:
    """Both phases over the pending shard tasks; returns the done stats of each shard this job wrote (shards skipped
    for another job's lease left out) and the rows generated. ``finished(task)``: whether a shard needs no more work."""
    import json

    import ray

    ensure_ray(config)
    s1 = config.stage1
    gpus = float(s1.tensor_parallel_size) if config.ray.use_gpu else 0.0

    def pass_over(tasks: list[Any], phase: str) -> list[dict[str, Any]]:
        if not tasks:
            return []
        dataset = ray.data.from_items([{"task": json.dumps(asdict(t))} for t in tasks], override_num_blocks=len(tasks))
        results = dataset.map_batches(
            _ShardWorker,
            fn_constructor_kwargs=dict(config=config, model_path=model_path, phase=phase, metadata=metadata, dim=dim,
                                       finished=finished),
            batch_size=1,
            concurrency=min(s1.replicas, len(tasks)),
            num_gpus=gpus,
            num_cpus=config.ray.cpus_per_worker,
        ).take_all()
        return [json.loads(r["result"]) for r in results]

    generated = sum(r["generated"] for r in pass_over(to_generate, "generate"))
    return [stats for stats in pass_over(pending, "embed") if "skipped" not in stats], generated
