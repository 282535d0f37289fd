"""Stage-2 test data: the demo dataset (ReasonSeg format), its manifests, and synthetic stage-1 shards.

Shards are written with ``shared.shards`` exactly as stage 1 writes them, but the embeddings are synthetic: each query
word maps to a fixed pseudo-random vector (dim 128, float16), so the text carries the target's colour and shape words
and stage-2 tests never run an LLM. With ``text="reference"`` the embedded words are those of the row's explanatory
reference answer instead ("It is the green circle. ..."): the text of a stage 1 that names the target. ``input`` mode shards hold word ids instead, with the matching table in the run
folder's ``input_embeddings.safetensors``.

Built once per test session and shared across the stage-2 test modules through a module-level cache (pytest fixtures
outside conftest.py are per module).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from manifests.demo import generate_demo_dataset
from manifests.registry import build_manifest
from shared.config import DataConfig, PathsConfig, PipelineConfig, RayConfig, Stage2Config
from shared.schema import MANIFEST_SCHEMA
from shared.shards import embeddings_to_arrow, shard_name, shard_schema, write_shard
from stage2_segment.data import INPUT_EMBEDDINGS_FILE, INPUT_EMBEDDINGS_TENSOR, Stage2Source

DIM = 128
VOCAB = 512
RUN_KEY = "synthetic-0123456789ab"
MAX_TOKENS = 12


def word_id(word: str) -> int:
    return int(hashlib.sha256(word.encode()).hexdigest()[:8], 16) % VOCAB


def vocabulary_table(dim: int = DIM) -> np.ndarray:
    """VOCABxdim float16: the vector of every word id."""
    return np.random.default_rng(1234).normal(0.0, 1.0, (VOCAB, dim)).astype(np.float16)


def query_token_ids(query: str) -> list[int]:
    words = re.findall(r"[a-z]+", query.lower())[:MAX_TOKENS] or ["empty"]
    return [word_id(word) for word in words]


def write_synthetic_shards(
    manifest_path: Path,
    run_dir: Path,
    spec: str,
    run_key: str = RUN_KEY,
    shard_size: int = 8,
    error_ids: tuple[str, ...] = (),
    extra_ids: tuple[str, ...] = (),
    embed_mode: str = "hidden",
    texts: dict[str, str] | None = None,
) -> Path:
    """Stage-1-format shards for every manifest row (``error_ids`` as error rows, plus rows for ``extra_ids`` that are
    not in the manifest); returns the shard folder ``run_dir/<dataset>-<split>``. ``texts`` (sample id -> text)
    replaces the query as the embedded text of the rows it names."""
    manifest = pq.read_table(manifest_path).sort_by("sample_id")
    rows = manifest.select(["sample_id", "dataset", "split", "image_path", "query"]).to_pylist()
    for row in rows:
        row["text"] = (texts or {}).get(row["sample_id"], row["query"])
    rows += [{"sample_id": extra, "dataset": rows[0]["dataset"], "split": rows[0]["split"], "query": "the red circle",
              "text": "the red circle"} for extra in extra_ids]  # fmt: skip
    rows.sort(key=lambda row: row["sample_id"])
    table = vocabulary_table()
    if embed_mode == "input":
        from safetensors.numpy import save_file

        run_dir.mkdir(parents=True, exist_ok=True)
        save_file({INPUT_EMBEDDINGS_TENSOR: table}, str(run_dir / INPUT_EMBEDDINGS_FILE))
    metadata = {"llavaseg.run_key": run_key, "llavaseg.embed_mode": embed_mode, "llavaseg.embedding_dim": str(DIM)}
    schema = shard_schema(DIM, metadata)
    folder = run_dir / spec.replace("/", "-")
    for number, start in enumerate(range(0, len(rows), shard_size)):
        chunk = rows[start : start + shard_size]
        failed = [row["sample_id"] in error_ids for row in chunk]
        ids = [query_token_ids(row["text"]) for row in chunk]
        embeddings = [
            None if bad or embed_mode == "input" else table[token_ids] for bad, token_ids in zip(failed, ids)
        ]
        columns = {
            "sample_id": [row["sample_id"] for row in chunk],
            "dataset": [row["dataset"] for row in chunk],
            "split": [row["split"] for row in chunk],
            "image_path": [row.get("image_path") for row in chunk],
            "query": [row["query"] for row in chunk],
            "reason_prompt": ["" for _ in chunk],
            "reason_answer": [None if bad else "It is the object the query describes." for bad in failed],
            "seg_prompt": ["" for _ in chunk],
            "seg_answer": [None if bad else row["text"] for bad, row in zip(failed, chunk)],
            "target": [None if bad else row["text"] for bad, row in zip(failed, chunk)],
            "attributes": [None if bad else "flat, coloured" for bad in failed],
            "parse_status": [None if bad else "ok" for bad in failed],
            "seg_text": [None if bad else row["text"] for bad, row in zip(failed, chunk)],
            "token_ids": [[] if bad else token_ids for bad, token_ids in zip(failed, ids)],
            "seg_tokens": [None if bad else len(token_ids) for bad, token_ids in zip(failed, ids)],
            "reason_source": [None if bad else "mllm" for bad in failed],
            "embedding": embeddings_to_arrow(embeddings, DIM),
            "generated_tokens": [0 for _ in chunk],
            "status": ["error" if bad else "ok" for bad in failed],
            "error": ["engine error: synthetic failure" if bad else None for bad in failed],
        }
        shard = pa.table(columns, schema=schema)
        write_shard(shard, folder / shard_name(number), {"synthetic": True})
    return folder


def reference_texts(data_root: Path, manifest_path: Path) -> dict[str, str]:
    """Sample id -> the explanatory reference answer of its (image, query) (``explanatory/<split>.json``)."""
    import json

    answers = {}
    for file in (Path(data_root) / "reason_seg" / "ReasonSeg" / "explanatory").glob("*.json"):
        answers.update({(entry["image"], entry["query"]): entry["outputs"] for entry in json.loads(file.read_text())})
    rows = pq.read_table(manifest_path, columns=["sample_id", "image_path", "query"]).to_pylist()
    return {row["sample_id"]: answers[(Path(row["image_path"]).name, row["query"])] for row in rows
            if (Path(row["image_path"]).name, row["query"]) in answers}  # fmt: skip


def relabel_manifest(manifest_path: Path, out_path: Path, dataset: str, family: str) -> Path:
    """A copy of a manifest presented as another dataset of another family (new sample ids, same images and masks)."""
    table = pq.read_table(manifest_path)
    rows = table.to_pylist()
    for row in rows:
        row["sample_id"] = row["sample_id"].replace(row["dataset"], dataset, 1)
        row["dataset"], row["family"] = dataset, family
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), out_path)
    return out_path


@dataclass(frozen=True)
class Stage2World:
    root: Path
    data_root: Path
    work_dir: Path
    train_sources: list[Stage2Source]
    val_sources: list[Stage2Source]

    def config(self, work_dir: Path | None = None, **stage2: object) -> PipelineConfig:
        """The demo config pointing at this world: 2 CPU workers, a tiny SAM, a short schedule."""
        settings = dict(global_batch=4, micro_batch=2, iterations=30, warmup_iterations=2, checkpoint_every=5,
                        lr=1e-3, eval_batch=4)  # fmt: skip
        settings.update(stage2)
        return PipelineConfig(
            paths=PathsConfig(data_root=str(self.data_root), work_dir=str(work_dir or self.work_dir)),
            data=DataConfig(generate_demo=False),
            stage2=dataclasses.replace(Stage2Config(), **settings),
            ray=RayConfig(num_workers=2, cpus_per_worker=1, max_failures=1),
            base_dir=str(self.root),
        )


_WORLDS: dict[Path, Stage2World] = {}


def stage2_world(base: Path, n_train: int = 8, n_val: int = 4, text: str = "query") -> Stage2World:
    """Demo data (n_train + n_val images), manifests and synthetic hidden-mode shards under ``base``, built once;
    ``text``: what the shards embed, ``"query"`` or ``"reference"`` (see the module's docstring)."""
    base = Path(base)
    if base in _WORLDS:
        return _WORLDS[base]
    data_root = base / "data"
    generate_demo_dataset(data_root, n_train=n_train, n_val=n_val, seed=0)
    run_dir = base / "work" / "stage1" / RUN_KEY
    sources = {}
    for split in ("train", "val"):
        manifest = base / "work" / "manifests" / f"reasonseg-{split}.parquet"
        build_manifest("reasonseg", data_root, split, manifest)
        spec = f"reasonseg/{split}"
        texts = reference_texts(data_root, manifest) if text == "reference" else None
        sources[split] = Stage2Source(spec, manifest, write_synthetic_shards(manifest, run_dir, spec, texts=texts),
                                      RUN_KEY)  # fmt: skip
    world = Stage2World(base, data_root, base / "work", [sources["train"]], [sources["val"]])
    _WORLDS[base] = world
    return world


@dataclass(frozen=True)
class ResumedRun:
    """A training run SIGKILLed (process group and every descendant) after its first complete checkpoint, then rerun
    in-process to the end."""

    config: PipelineConfig
    result: object  # stage2_segment.train.TrainResult
    complete_steps_at_kill: list[int]
    final_complete_at_kill: bool
    killed_log: str


_RUNS: dict[Path, ResumedRun] = {}
KILL_SCRIPT = (
    "import logging, pickle, sys\n"
    "logging.basicConfig(level=logging.INFO)\n"
    "from stage2_segment.train import train\n"
    "config, sources = pickle.load(open(sys.argv[1], 'rb'))\n"
    "train(config, sources)\n"
)


def kill_tree(process) -> None:
    """SIGKILL a training process and everything it started. Ray's workers run in their own sessions: every descendant
    is killed by pid, not only the process group, and waited for."""
    import os
    import signal

    import psutil

    descendants = psutil.Process(process.pid).children(recursive=True) if process.poll() is None else []
    os.killpg(process.pid, signal.SIGKILL)
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()
    psutil.wait_procs(descendants, timeout=30)


def killed_and_resumed_run(world: Stage2World) -> ResumedRun:
    """Start ``train`` in a subprocess (its own local Ray cluster), SIGKILL it once a checkpoint is complete, then run
    ``train`` again in this process (which must have Ray initialised). Built once per world."""
    import os
    import pickle
    import subprocess
    import sys
    import time

    from stage2_segment.checkpoint import is_complete, list_complete
    from stage2_segment.train import CHECKPOINTS_DIR, FINAL_DIR, train, train_output_dir

    if world.root in _RUNS:
        return _RUNS[world.root]
    config = world.config(work_dir=world.root / "work-train")
    output_dir = train_output_dir(config, world.train_sources)
    arguments = world.root / "train-args.pkl"
    arguments.write_bytes(pickle.dumps((config, world.train_sources)))
    log_path = world.root / "killed-train.log"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(arguments)], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if list_complete(output_dir / CHECKPOINTS_DIR):
                break
            time.sleep(0.02)
    finally:
        kill_tree(process)
    complete = [step for step, _ in list_complete(output_dir / CHECKPOINTS_DIR)]
    final_done = is_complete(output_dir / FINAL_DIR)
    result = train(config, world.train_sources)
    run = ResumedRun(config, result, complete, final_done, log_path.read_text())
    _RUNS[world.root] = run
    return run
