"""Stage 1 end to end on the demo data: exactly-once shards, provenance, resume after SIGKILL, run keys, error rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared import shards
from shared.config import load_config
from shared.schema import MANIFEST_SCHEMA

from conftest import TINY_MAX_EMBED_TOKENS, TINY_MAX_NEW_TOKENS

REPO = Path(__file__).resolve().parents[1]
ROWS = 15  # 6 train images x 1-2 queries (11) + 4 val images x first query


def toml_value(value: object) -> str:
    """A TOML literal: JSON for scalars and lists, an inline table for dicts."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def write_config(folder: Path, data_root: Path, work_dir: Path, **stage1: object) -> Path:
    """A pipeline.toml for the demo data with the shared test engines' settings."""
    settings = {"max_new_tokens": TINY_MAX_NEW_TOKENS, "max_embed_tokens": TINY_MAX_EMBED_TOKENS, "shard_size": 4, **stage1}
    lines = [
        "[paths]", f'data_root = "{data_root}"', f'work_dir = "{work_dir}"',
        "[data]", "demo_train_images = 6", "demo_val_images = 4",
        "[stage1]", *(f"{k} = {toml_value(v)}" for k, v in settings.items()),
    ]
    path = folder / "pipeline.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def demo_setup(tmp_path_factory, tiny_llava_dir):
    """Demo data + manifests, shared by the tests of this module; the tiny model is linked into each work dir."""
    from llavaseg.pipeline import prepare

    root = tmp_path_factory.mktemp("stage1")
    data_root = root / "data"
    config = load_config(write_config(root, data_root, root / "work-prepare"))
    manifests = prepare(config, build_models=False)
    return root, data_root, [(m.spec, m.path) for m in manifests]


def make_config(root: Path, data_root: Path, name: str, tiny_llava_dir: Path, **stage1: object):
    work = root / name
    (work / "models").mkdir(parents=True, exist_ok=True)
    link = work / "models" / "tiny-llava"
    if not link.exists():
        link.symlink_to(tiny_llava_dir, target_is_directory=True)
    folder = root / f"{name}-config"
    folder.mkdir(exist_ok=True)
    return load_config(write_config(folder, data_root, work, **stage1))


def all_rows(run_dir: Path, run_key: str) -> pa.Table:
    tables = [shards.read_shards(folder, expected_run_key=run_key) for folder in sorted(run_dir.iterdir()) if folder.is_dir()]
    return pa.concat_tables(tables).sort_by("sample_id")


@pytest.fixture(scope="module")
def reference_run(demo_setup, tiny_llava_dir, vllm_generation_engine, vllm_pooling_engine):
    from stage1_reason.run import run_stage1

    root, data_root, manifests = demo_setup
    config = make_config(root, data_root, "work-reference", tiny_llava_dir)
    summary = run_stage1(config, manifests, backend=vllm_generation_engine, embedder=vllm_pooling_engine)
    return config, summary


def test_every_manifest_row_once_with_embeddings_and_provenance(demo_setup, reference_run, tiny_llava_dir):
    _, _, manifests = demo_setup
    config, summary = reference_run
    expected_ids = sorted(sid for _, path in manifests for sid in pq.read_table(path).column("sample_id").to_pylist())
    assert len(expected_ids) == ROWS
    rows = all_rows(summary.run_dir, summary.run_key)
    assert rows.column("sample_id").to_pylist() == expected_ids
    assert summary.new_rows == ROWS and summary.reused_rows == 0 and summary.generated_samples == ROWS
    assert rows.column("status").to_pylist() == ["ok"] * ROWS
    assert rows.schema.field("embedding").type == pa.list_(pa.list_(pa.float16(), 128))
    for i in range(rows.num_rows):
        emb = shards.embedding_from_arrow(rows.column("embedding"), i)
        token_ids = rows.column("token_ids")[i].as_py()
        assert emb.dtype == np.float16 and emb.shape == (len(token_ids), 128)
        assert 0 < len(token_ids) <= TINY_MAX_EMBED_TOKENS
        assert np.isfinite(emb.astype(np.float32)).all() and np.abs(emb).sum() > 0
    for name in ("reason_prompt", "reason_answer", "seg_answer", "seg_text", "seg_prompt"):
        assert all(rows.column(name).to_pylist()), name
    assert rows.column("seg_prompt")[0].as_py().startswith("Follow these guidelines strictly")
    assert rows.column("reason_source").to_pylist() == ["mllm"] * ROWS
    # the cap: token_ids keep the first max_embed_tokens of seg_tokens; rows over it are counted everywhere
    seg_tokens = rows.column("seg_tokens").to_pylist()
    assert [len(ids) for ids in rows.column("token_ids").to_pylist()] == [min(n, TINY_MAX_EMBED_TOKENS) for n in seg_tokens]
    capped = sum(n > TINY_MAX_EMBED_TOKENS for n in seg_tokens)
    assert 0 < capped < ROWS  # the demo's merged answers straddle the test cap of 16 tokens
    assert summary.capped_rows == capped
    assert f"{capped} rows cut at max_embed_tokens" in summary.describe()
    written = json.loads((summary.run_dir / "summary.json").read_text())
    assert (written["capped_rows"], written["max_embed_tokens"]) == (capped, TINY_MAX_EMBED_TOKENS)
    assert sum(m["capped_rows"] for m in written["per_manifest"].values()) == capped
    meta = pq.read_schema(next(summary.run_dir.glob("reasonseg-val/00000.parquet"))).metadata
    meta = {k.decode(): v.decode() for k, v in meta.items()}
    assert meta["llavaseg.run_key"] == summary.run_key
    assert meta["llavaseg.prompt_version"] == "v1" and meta["llavaseg.embed_mode"] == "hidden"
    assert meta["llavaseg.embedding_dim"] == "128" and meta["llavaseg.embedding_dtype"] == "float16"
    assert meta["llavaseg.weights_fingerprint"].startswith("sha256:")
    assert meta["llavaseg.package_version"]
    assert (summary.run_dir / "resolved_config.json").is_file() and (summary.run_dir / "run.json").is_file()
    assert not list(summary.run_dir.rglob("*.gen.parquet")) and not list(summary.run_dir.rglob("*.tmp"))


def test_unchanged_config_reuses_shards_without_generation(demo_setup, reference_run, vllm_generation_engine,
                                                          vllm_pooling_engine):
    from stage1_reason.run import run_stage1

    _, _, manifests = demo_setup
    config, first = reference_run
    before = {p: p.stat().st_mtime_ns for p in first.run_dir.rglob("*.parquet")}
    again = run_stage1(config, manifests, backend=vllm_generation_engine, embedder=vllm_pooling_engine)
    assert again.run_key == first.run_key
    assert again.generated_samples == 0 and again.embedded_samples == 0
    assert again.new_rows == 0 and again.reused_rows == ROWS
    assert {p: p.stat().st_mtime_ns for p in first.run_dir.rglob("*.parquet")} == before
    assert f"stage 1: 0 new samples, {ROWS} reused" in again.describe()
    assert again.capped_rows == first.capped_rows  # counted from the done files of reused shards


def test_run_key_changes_with_what_changes_rows(demo_setup, tiny_llava_dir):
    from stage1_reason.run import run_dir_for

    root, data_root, _ = demo_setup
    base = make_config(root, data_root, "work-keys", tiny_llava_dir)
    key = run_dir_for(base, str(tiny_llava_dir))[1]
    assert key == run_dir_for(make_config(root, data_root, "work-keys", tiny_llava_dir), str(tiny_llava_dir))[1]
    changes = (
        {"prompt_version": "v2"}, {"embed_mode": "input"}, {"cot_steps": 2}, {"max_new_tokens": 8},
        {"max_embed_tokens": 32}, {"conversation_format": "llava_v1"}, {"image_pad_to_square": True},
        {"step1_source": {"referring": "template"}},
    )
    for change in changes:
        assert run_dir_for(make_config(root, data_root, "work-keys", tiny_llava_dir, **change), str(tiny_llava_dir))[1] != key
    other_model = root / "other-model"
    if not other_model.exists():
        import shutil

        shutil.copytree(tiny_llava_dir, other_model)
        weights = next(other_model.glob("*.safetensors"))
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF  # other weights, same shapes and sizes
        weights.write_bytes(bytes(data))
    assert run_dir_for(base, str(other_model))[1] != key


def test_sigkill_mid_run_then_rerun_equals_uninterrupted(demo_setup, reference_run, tiny_llava_dir,
                                                         vllm_generation_engine, vllm_pooling_engine):
    """Kill the CLI with SIGKILL once the first shard is done; the rerun completes the rest; rows equal the reference."""
    from stage1_reason.run import run_stage1

    root, data_root, manifests = demo_setup
    config = make_config(root, data_root, "work-killed", tiny_llava_dir)
    manifest_dir = config.work_dir / "manifests"
    manifest_dir.mkdir(parents=True, exist_ok=True)
    for _, path in manifests:
        (manifest_dir / Path(path).name).write_bytes(Path(path).read_bytes())
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log_path = root / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llavaseg.cli", "reason", "--config", str(Path(config.base_dir) / "pipeline.toml")],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    run_dir = config.work_dir / "stage1"
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if list(run_dir.rglob("*.done.json")):
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, log_path.read_text()[-3000:]
    done_before = list(run_dir.rglob("*.done.json"))
    all_shards = 4  # train: 11 rows in shards of 4, 4, 3; val: 4 rows in one shard
    assert 1 <= len(done_before) < all_shards, log_path.read_text()[-3000:]

    resumed = run_stage1(config, manifests, backend=vllm_generation_engine, embedder=vllm_pooling_engine)
    _, reference = reference_run
    assert resumed.run_key == reference.run_key
    rows_done = sum(json.loads(path.read_text())["rows"] for path in done_before)
    assert resumed.reused_rows == rows_done and resumed.new_rows == ROWS - resumed.reused_rows
    got, expected = all_rows(resumed.run_dir, resumed.run_key), all_rows(reference.run_dir, reference.run_key)
    assert got.column("sample_id").to_pylist() == expected.column("sample_id").to_pylist()  # no duplicates, none lost
    for name in ("reason_answer", "seg_answer", "target", "attributes", "seg_text", "token_ids", "status"):
        assert got.column(name).to_pylist() == expected.column(name).to_pylist(), name
    for i in range(got.num_rows):
        np.testing.assert_allclose(
            shards.embedding_from_arrow(got.column("embedding"), i).astype(np.float32),
            shards.embedding_from_arrow(expected.column("embedding"), i).astype(np.float32), atol=2e-3,
        )


def test_in_process_engines_with_a_kv_cache_in_tokens_give_the_reference_rows(demo_setup, reference_run, tiny_llava_dir):
    """The demo's engine settings (``engine_in_process``, ``kv_cache_tokens``) through the CLI: one engine start per
    phase for all shards, no engine process of its own, and the rows of the shared multi-process engines."""
    root, data_root, manifests = demo_setup
    config = make_config(root, data_root, "work-in-process", tiny_llava_dir, engine_in_process=True,
                         kv_cache_tokens=4096)  # fmt: skip
    manifest_dir = config.work_dir / "manifests"
    manifest_dir.mkdir(parents=True, exist_ok=True)
    for _, path in manifests:
        (manifest_dir / Path(path).name).write_bytes(Path(path).read_bytes())
    done = subprocess.run(
        [sys.executable, "-m", "llavaseg.cli", "reason", "--config", str(Path(config.base_dir) / "pipeline.toml")],
        cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    _, reference = reference_run
    run_dir = config.work_dir / "stage1" / reference.run_key  # the engine settings do not change the rows
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {phase: e["starts"] for phase, e in summary["engines"].items()} == {"generate": 1, "embed": 1}
    assert summary["new_rows"] == ROWS and "engines: generate 1 start(s)" in done.stdout + done.stderr
    log_text = next((config.work_dir / "logs").glob("reason-*.log")).read_text()
    assert "EngineCore" not in log_text and "VLLM_ENABLE_V1_MULTIPROCESSING is set to False" in log_text
    got, expected = all_rows(run_dir, reference.run_key), all_rows(reference.run_dir, reference.run_key)
    for name in ("sample_id", "reason_answer", "seg_answer", "target", "attributes", "seg_text", "token_ids", "status"):
        assert got.column(name).to_pylist() == expected.column(name).to_pylist(), name
    for i in range(got.num_rows):
        np.testing.assert_allclose(
            shards.embedding_from_arrow(got.column("embedding"), i).astype(np.float32),
            shards.embedding_from_arrow(expected.column("embedding"), i).astype(np.float32), atol=2e-3,
        )


def test_bad_rows_become_error_rows(tmp_path, demo_setup, tiny_llava_dir, vllm_generation_engine, vllm_pooling_engine):
    """Missing image, corrupt JPEG, over-long query, empty query: error rows with messages; every other row ok."""
    from stage1_reason.run import run_stage1

    root, data_root, manifests = demo_setup
    good = pq.read_table(dict(manifests)["reasonseg/val"]).to_pylist()
    (data_root / "bad").mkdir(exist_ok=True)
    corrupt = data_root / "bad" / "corrupt.jpg"
    corrupt.write_bytes((data_root / good[0]["image_path"]).read_bytes()[:300])
    rows = []
    for i, row in enumerate(good):
        rows.append(dict(row, sample_id=f"bad/val/{i}/0", dataset="bad"))
    rows.append(dict(good[0], sample_id="bad/val/missing/0", dataset="bad", image_path="bad/missing.jpg"))
    rows.append(dict(good[0], sample_id="bad/val/corrupt/0", dataset="bad", image_path="bad/corrupt.jpg"))
    rows.append(dict(good[0], sample_id="bad/val/long/0", dataset="bad", query="the red circle " * 800))
    rows.append(dict(good[0], sample_id="bad/val/empty/0", dataset="bad", query="   "))
    manifest = tmp_path / "bad-val.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), manifest)
    config = make_config(root, data_root, "work-bad", tiny_llava_dir, shard_size=64)
    summary = run_stage1(config, [("bad/val", manifest)], backend=vllm_generation_engine, embedder=vllm_pooling_engine)
    table = all_rows(summary.run_dir, summary.run_key)
    by_id = {r["sample_id"]: r for r in table.to_pylist()}
    assert len(by_id) == len(rows)
    assert summary.errors == 4
    assert "missing" in by_id["bad/val/missing/0"]["error"] and "bad/missing.jpg" in by_id["bad/val/missing/0"]["error"]
    assert "corrupt" in by_id["bad/val/corrupt/0"]["error"] or "truncated" in by_id["bad/val/corrupt/0"]["error"]
    assert "max_model_len" in by_id["bad/val/long/0"]["error"]
    assert "empty query" in by_id["bad/val/empty/0"]["error"]
    for i in range(len(good)):
        row = by_id[f"bad/val/{i}/0"]
        assert row["status"] == "ok" and row["error"] is None and row["token_ids"]
    for sid in ("bad/val/missing/0", "bad/val/corrupt/0", "bad/val/long/0", "bad/val/empty/0"):
        assert by_id[sid]["status"] == "error" and by_id[sid]["token_ids"] == [] and by_id[sid]["embedding"] == []


def test_templated_step1_rows(demo_setup, tiny_llava_dir, vllm_generation_engine, vllm_pooling_engine):
    """step1_source: a family sent to templates gets the template pair of each sample's id, and no step-1 generation."""
    from stage1_reason.run import run_stage1
    from stage1_reason.step1_templates import simulated_step1

    root, data_root, manifests = demo_setup
    config = make_config(root, data_root, "work-templated", tiny_llava_dir, step1_source={"reasoning": "template"})
    summary = run_stage1(config, manifests[:1], backend=vllm_generation_engine, embedder=vllm_pooling_engine)
    rows = all_rows(summary.run_dir, summary.run_key).to_pylist()
    manifest = {r["sample_id"]: r for r in pq.read_table(manifests[0][1]).to_pylist()}
    assert len(rows) == len(manifest) and {r["status"] for r in rows} == {"ok"}
    sources = []
    for row in rows:
        source = manifest[row["sample_id"]]
        assert (row["image_path"], row["query"]) == (source["image_path"], source["query"])  # a row says what it read
        step1 = simulated_step1(row["sample_id"], source["query"], source["query_kind"], seed=0)
        sources.append(row["reason_source"])
        if step1 is None:  # a sentence or question query: the MLLM reasons
            assert row["reason_source"] == "mllm" and row["reason_prompt"] == source["query"]
            continue
        assert (row["reason_prompt"], row["reason_answer"], row["reason_source"]) == (
            step1.question, step1.answer, "template"
        )
        assert 0 < row["generated_tokens"] <= TINY_MAX_NEW_TOKENS  # the second turn only
    assert sources.count("template") == sum(r["query_kind"] != "sentence" for r in manifest.values()) > 0


def test_passed_engines_must_render_as_the_config_says(demo_setup, tiny_llava_dir, vllm_generation_engine):
    from stage1_reason.run import run_stage1

    root, data_root, manifests = demo_setup
    config = make_config(root, data_root, "work-mismatch", tiny_llava_dir, conversation_format="llava_v1")
    with pytest.raises(ValueError, match="generation engine renders conversation_format 'chat_template'"):
        run_stage1(config, manifests, backend=vllm_generation_engine)


def test_ray_data_actor_pool_gives_the_same_shards(demo_setup, reference_run, tiny_llava_dir, ray_cluster):
    """stage1.use_ray: one CPU replica on the local Ray cluster writes the same exactly-once shards as the local path."""
    from stage1_reason.run import run_stage1

    root, data_root, manifests = demo_setup
    config = make_config(root, data_root, "work-ray", tiny_llava_dir, use_ray=True, replicas=1)
    summary = run_stage1(config, manifests)
    _, reference = reference_run
    assert summary.run_key == reference.run_key
    assert summary.new_rows == ROWS and summary.generated_samples == ROWS
    got, expected = all_rows(summary.run_dir, summary.run_key), all_rows(reference.run_dir, reference.run_key)
    assert got.column("sample_id").to_pylist() == expected.column("sample_id").to_pylist()
    for name in ("reason_answer", "seg_answer", "seg_text", "token_ids", "status"):
        assert got.column(name).to_pylist() == expected.column(name).to_pylist(), name
    again = run_stage1(config, manifests)
    assert again.generated_samples == 0 and again.reused_rows == ROWS
