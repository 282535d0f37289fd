"""Shard I/O: atomic writes, done markers, validated reads, zero-copy float16 embeddings."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared import shards

DIM = 8


def _table(ids, dim=DIM, run="run-a", lengths=None):
    rng = np.random.default_rng(0)
    lengths = lengths or [i % 3 + 1 for i in range(len(ids))]
    embeddings = [rng.standard_normal((n, dim)).astype(np.float16) for n in lengths]
    schema = shards.shard_schema(dim, {"llavaseg.run_key": run})
    columns = {name: [None] * len(ids) for name in schema.names}
    columns["sample_id"] = ids
    columns["status"] = ["ok"] * len(ids)
    columns["token_ids"] = [list(range(n)) for n in lengths]
    arrays = [
        shards.embeddings_to_arrow(embeddings, dim) if f.name == "embedding" else pa.array(columns[f.name], type=f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema), embeddings


def test_write_read_roundtrip_zero_copy(tmp_path):
    ids = [f"demo/val/img{i}/0" for i in range(5)]
    table, embeddings = _table(ids)
    path = tmp_path / "m" / shards.shard_name(0)
    shards.write_shard(table, path, {"errors": 0})
    assert path.name == "00000.parquet"
    done = json.loads(shards.done_path(path).read_text())
    assert done["rows"] == 5 and done["errors"] == 0 and done["ids_digest"] == shards.ids_digest(ids)
    assert shards.is_done(path, ids)
    assert not shards.is_done(path, ids[:4])  # a changed manifest invalidates the shard
    read = shards.read_shards(path.parent, expected_run_key="run-a")
    assert read.column("sample_id").to_pylist() == ids
    for row, expected in enumerate(embeddings):
        got = shards.embedding_from_arrow(read.column("embedding"), row)
        assert got.dtype == np.float16 and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
    assert not list(path.parent.glob("*.tmp"))


def test_undone_foreign_and_old_shards_are_refused(tmp_path):
    ids = ["a/b/c/0"]
    table, _ = _table(ids)
    folder = tmp_path / "m"
    path = folder / shards.shard_name(0)
    folder.mkdir()
    pq.write_table(table, path)  # no done marker: a killed writer's leftover
    with pytest.raises(shards.ShardError, match="no done marker"):
        shards.read_shards(folder)
    shards.write_shard(table, path, {})
    with pytest.raises(shards.ShardError, match="belongs to run 'run-a', expected 'run-b'"):
        shards.read_shards(folder, expected_run_key="run-b")
    old = table.replace_schema_metadata({b"llavaseg.shard_schema_version": b"0"})
    shards.write_shard(old, path, {})
    with pytest.raises(shards.ShardError, match="shard schema version '0'"):
        shards.read_shards(folder)


def test_truncated_shard_is_named(tmp_path):
    table, _ = _table(["a/b/c/0", "a/b/c/1"])
    path = tmp_path / "m" / shards.shard_name(3)
    shards.write_shard(table, path, {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(shards.ShardError, match=r"00003.parquet: refused, its content sha256 .* differs"):
        shards.read_shards(path.parent)
    assert not shards.is_done(path, ["a/b/c/0", "a/b/c/1"])
    # Without a checksum to catch it first, an undecodable file is still named.
    done = json.loads(shards.done_path(path).read_text())
    done["content_sha256"] = shards.file_sha256(path)
    shards.done_path(path).write_text(json.dumps(done))
    with pytest.raises(shards.ShardError, match=r"00003.parquet: unreadable Parquet"):
        shards.read_shards(path.parent)


def test_every_single_bit_flip_is_caught(tmp_path):
    """Flip one real bit at 40 seeded positions of a done shard: each time the shard stops counting as done, and
    reading it raises a ShardError that names the file (never a decoder error or silently different data)."""
    ids = [f"demo/val/img{i}/0" for i in range(6)]
    table, _ = _table(ids, lengths=[4] * 6)
    path = tmp_path / "m" / shards.shard_name(0)
    shards.write_shard(table, path, {})
    pristine = path.read_bytes()
    rng = np.random.default_rng(7)
    positions = rng.choice(len(pristine) * 8, size=40, replace=False)
    for bit in positions:
        damaged = bytearray(pristine)
        damaged[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(damaged))
        assert not shards.is_done(path, ids), bit
        with pytest.raises(shards.ShardError, match=r"00000.parquet: refused, its content sha256"):
            shards.read_shards(path.parent)
    path.write_bytes(pristine)
    assert shards.is_done(path, ids)
    assert shards.read_shards(path.parent).column("sample_id").to_pylist() == ids


def test_done_marker_without_checksum_is_not_done(tmp_path):
    ids = ["a/b/c/0"]
    table, _ = _table(ids)
    path = tmp_path / "m" / shards.shard_name(0)
    shards.write_shard(table, path, {})
    done = json.loads(shards.done_path(path).read_text())
    del done["content_sha256"]
    shards.done_path(path).write_text(json.dumps(done))
    assert not shards.is_done(path, ids)
    with pytest.raises(shards.ShardError, match="records no content checksum"):
        shards.read_shards(path.parent)


def test_stale_temp_files_are_cleaned(tmp_path):
    (tmp_path / "m").mkdir()
    stale = tmp_path / "m" / ("00001.parquet" + shards.TMP_SUFFIX)
    stale.write_bytes(b"half a shard")
    assert shards.clean_stale_temp_files(tmp_path) == [stale]
    assert not stale.exists()


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    table, _ = _table(["a/b/c/0"])
    path = tmp_path / "m" / shards.shard_name(0)

    class Boom(RuntimeError):
        pass

    def exploding_replace(*args, **kwargs):
        raise Boom("disk full")

    monkeypatch.setattr(shards.os, "replace", exploding_replace)
    with pytest.raises(Boom):
        shards.write_shard(table, path, {})
    assert not path.exists() and not shards.done_path(path).exists()
    assert not list(path.parent.iterdir())


def test_run_key_changes_with_settings():
    base = {"model": "m", "prompt_version": "v1", "embed_mode": "hidden"}
    key = shards.run_key(base, "tiny-llava")
    assert key.startswith("tiny-llava-") and key == shards.run_key(dict(base), "tiny-llava")
    for change in ({"model": "n"}, {"prompt_version": "v2"}, {"embed_mode": "input"}):
        assert shards.run_key({**base, **change}, "tiny-llava") != key


def test_embedding_dim_mismatch():
    with pytest.raises(ValueError, match="does not match dim 8"):
        shards.embeddings_to_arrow([np.zeros((2, 4), np.float16)], DIM)
