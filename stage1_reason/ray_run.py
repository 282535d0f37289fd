"""Stage 1 on a Ray cluster: a Ray Data actor pool of engines over shard tasks, the same exactly-once shard layout.

Each actor holds one engine (``stage1.replicas`` actors, each with ``tensor_parallel_size`` GPUs when ``ray.use_gpu``) and
processes whole shards with the same functions as the local path, writing the shard files itself (temp name + rename,
done file last), so a lost actor or a killed job costs at most the shards in flight. Generation runs as one pass and
embedding as a second pass, so each actor holds one engine at a time.
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

    def __init__(self, config: PipelineConfig, model_path: str, phase: str, metadata: dict[str, str], dim: int):
        from stage1_reason import backends, shard_phases

        self.config, self.phase, self.metadata, self.dim = config, phase, metadata, dim
        self.phases = shard_phases
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
            if self.phase == "generate":
                out.append(json.dumps({"generated": self.phases.generate_shard(task, rows, self.engine, self.config)}))
            else:
                stats = self.phases.embed_shard(task, rows, self.engine, self.config, self.metadata, self.dim)
                out.append(json.dumps(stats))
        return {"result": np.array(out, dtype=object)}


def run_phases_on_ray(
    config: PipelineConfig, model_path: str, pending: list[Any], to_generate: list[Any], metadata: dict[str, str], dim: int
) -> tuple[list[dict[str, Any]], int]:
    """Both phases over the pending shard tasks; returns the done stats of each shard and the rows generated."""
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
            fn_constructor_kwargs=dict(config=config, model_path=model_path, phase=phase, metadata=metadata, dim=dim),
            batch_size=1,
            concurrency=min(s1.replicas, len(tasks)),
            num_gpus=gpus,
            num_cpus=config.ray.cpus_per_worker,
        ).take_all()
        return [json.loads(r["result"]) for r in results]

    generated = sum(r["generated"] for r in pass_over(to_generate, "generate"))
    return pass_over(pending, "embed"), generated
