"""Stage 1 on a Ray cluster: a Ray Data actor pool of engines over shard tasks, the same exactly-once shard layout.

Each actor holds one engine (``stage1.replicas`` actors, each with ``tensor_parallel_size`` GPUs when ``ray.use_gpu``) and
processes whole shards with the same functions as the local path, writing the shard files itself (temp name + rename,
done file last), so a lost actor or a killed job costs at most the shards in flight. Generation runs as one pass and
embedding as a second pass, so each actor holds one engine at a time. An actor works on a shard only while it holds the
shard's lease (``shared.leases``, or ``shared.object_leases`` on an object store), and skips a shard another job
holds or finished, so concurrent jobs on one run folder write each shard once.

With an object-store work dir (``s3://``) every actor works in its node's mirror: it downloads the manifest and the
generation pass's intermediate file when its node lacks them, uploads that intermediate after generating (the
embedding pass may run on another node), and publishes each finished shard, data before done marker.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from shared.config import PipelineConfig
from shared.object_store import publish_shard, store_for
from shared.ray_cluster import ensure_ray
from stage1_reason.shard_phases import gen_path

log = logging.getLogger(__name__)


class _ShardWorker:
    """A Ray Data callable class: builds its engine once, then runs ``phase`` for each shard task in a batch."""

    def __init__(self, config: PipelineConfig, model_path: str, phase: str, metadata: dict[str, str], dim: int,
                 finished: Any = None):
        from shared.object_leases import leases_for
        from stage1_reason import backends, shard_phases

        self.config, self.phase, self.metadata, self.dim = config, phase, metadata, dim
        self.phases = shard_phases
        self.leases, self.finished = leases_for(config), finished
        self.store = store_for(config)  # an object-store work dir: this node's mirror is filled and published here
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
            manifest = Path(task.manifest_path)
            if self.store is not None and not manifest.is_file() and self.store.contains(manifest):
                self.store.pull_file(manifest)  # the driver prepared it on another node
            table = self.phases.read_manifest_rows(manifest)
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
            gen = gen_path(task)
            if self.store is not None and not gen.is_file():
                self.store.pull_file(gen)  # generated on another node
            to_do = gen.is_file()  # its generator died before finishing: a later round
        if not to_do:
            self.leases.release(Path(task.path))
        return to_do

    def _run(self, task: Any, rows: Any) -> str:
        import json

        if self.phase == "generate":
            generated = self.phases.generate_shard(task, rows, self.engine, self.config)
            if self.store is not None:  # for the embedding pass, which may run on another node
                self.store.push(gen_path(task))
            return json.dumps({"generated": generated})
        stats = self.phases.embed_shard(task, rows, self.engine, self.config, self.metadata, self.dim)
        if self.store is not None:
            publish_shard(self.store, Path(task.path))  # data, then its done marker
            self.store.delete(gen_path(task))
        return json.dumps(stats)


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

    store = store_for(config)
    if store is not None:  # what actors on other nodes read: this node's manifests, generations of an earlier job here
        for manifest in sorted({Path(t.manifest_path) for t in pending}):
            if store.contains(manifest):
                store.push(manifest)
        generating = {t.path for t in to_generate}
        for task in pending:
            gen = gen_path(task)
            if task.path not in generating and gen.is_file() and not store.exists(gen):
                store.push(gen)
    generated = sum(r["generated"] for r in pass_over(to_generate, "generate"))
    return [stats for stats in pass_over(pending, "embed") if "skipped" not in stats], generated
