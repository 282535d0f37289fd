"""Stage-2 data: manifest/shard join with counted skips, embeddings as stored, the family mix, shared image loads."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from shared.shards import done_path
from stage2_fixtures import (
    DIM,
    RUN_KEY,
    query_token_ids,
    relabel_manifest,
    stage2_world,
    vocabulary_table,
    write_synthetic_shards,
)
from stage2_segment.data import (
    ExampleError,
    MixtureSampler,
    ShardStore,
    Stage2Dataset,
    Stage2Source,
    build_index,
    collate,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return stage2_world(tmp_path_factory.getbasetemp() / "stage2")


def test_join_skips_and_counts_errors_strays_and_unfinished_shards(world, tmp_path):
    manifest = world.train_sources[0].manifest
    ids = sorted(pq.read_table(manifest, columns=["sample_id"])["sample_id"].to_pylist())
    assert len(ids) == 15  # 8 demo train images, one or two queries each
    errors = (ids[1], ids[5])
    folder = write_synthetic_shards(manifest, tmp_path / "run", "reasonseg/train", shard_size=6, error_ids=errors,
                                    extra_ids=("reasonseg/train/not_in_manifest/0",))  # fmt: skip
    # 16 shard rows in shards of 6: the last shard (rows 12..15) loses its done marker, as if stage 1 were killed.
    done_path(folder / "00002.parquet").unlink()
    last_shard_ids = sorted(ids + ["reasonseg/train/not_in_manifest/0"])[12:]
    source = Stage2Source("reasonseg/train", manifest, folder, RUN_KEY)

    index = build_index([source])
    (report,) = index.reports
    assert report.unfinished_shards == 1
    assert report.stage1_errors == 2 and report.error_examples == {"engine error: synthetic failure": 2}
    expected_not_in_manifest = 0 if "reasonseg/train/not_in_manifest/0" in last_shard_ids else 1
    assert report.not_in_manifest == expected_not_in_manifest
    in_manifest_last = [sample_id for sample_id in last_shard_ids if sample_id in ids]
    assert report.without_stage1_row == len(in_manifest_last)
    expected = sorted(set(ids) - set(errors) - set(in_manifest_last))
    assert index.table["sample_id"].to_pylist() == expected
    assert report.joined == len(expected) and index.llm_dim == DIM
    assert "2 stage-1 error rows" in report.describe()

    with_errors = build_index([source], keep_errors=True)
    assert with_errors.table.num_rows == len(expected) + 2
    rows = with_errors.table.select(["sample_id", "status"]).to_pylist()
    assert sorted(row["sample_id"] for row in rows if row["status"] != "ok") == sorted(errors)


@pytest.mark.parametrize("cache", [True, False])
def test_embeddings_stay_float16_and_input_mode_looks_up_the_same_rows(world, tmp_path, cache):
    manifest = world.train_sources[0].manifest
    hidden = world.train_sources[0]
    input_folder = write_synthetic_shards(manifest, tmp_path / "input-run", "reasonseg/train", embed_mode="input")
    input_source = Stage2Source("reasonseg/train", manifest, input_folder, RUN_KEY)
    store = ShardStore(tmp_path / "cache" if cache else None)
    for source in (hidden, input_source):
        index = build_index([source])
        dataset = Stage2Dataset(index, world.data_root, 256, store)
        table = vocabulary_table()
        for i in (0, 7, len(dataset) - 1):
            embedding = dataset.text_embedding(i)
            assert embedding.dtype == np.float16 and embedding.shape[1] == DIM
            np.testing.assert_array_equal(embedding, table[query_token_ids(dataset.value("query", i))])
    if cache:
        copies = sorted(path.parent.name for path in (tmp_path / "cache" / RUN_KEY).rglob("*.arrow"))
        assert len(copies) == 4 and len(set(copies)) == 2  # 2 shards of each of 2 shard folders of the same name


def test_warming_builds_each_shard_copy_once_and_reads_the_same_rows(world, tmp_path):
    index = build_index(world.train_sources)
    assert len(index.shards) >= 2
    cold = Stage2Dataset(index, world.data_root, 256, ShardStore(tmp_path / "cold"))
    store = ShardStore(tmp_path / "warm")
    assert store.warm(index.shards, threads=2, part=(1, 2)) == len(index.shards) // 2  # the second of two workers
    assert len(list((tmp_path / "warm").rglob("*.arrow"))) == len(index.shards) // 2
    assert store.warm(index.shards, threads=2) == len(index.shards)
    copies = sorted((tmp_path / "warm").rglob("*.arrow"))
    stamps = [path.stat().st_mtime_ns for path in copies]
    assert len(copies) == len(index.shards)
    assert store.warm(index.shards, threads=2) == len(index.shards)  # built copies are reused, not rewritten
    assert [path.stat().st_mtime_ns for path in copies] == stamps
    warm = Stage2Dataset(index, world.data_root, 256, store)
    for i in range(len(warm)):
        np.testing.assert_array_equal(warm.text_embedding(i), cold.text_embedding(i))
    assert ShardStore(None).warm(index.shards) == 0  # no cache: nothing to build


def test_mixing_rates_follow_families_and_renormalise(world, tmp_path):
    train = world.train_sources[0]
    sources = [train]
    for dataset, family in (("refcoco", "referring"), ("ade20k", "semantic")):
        manifest = relabel_manifest(train.manifest, tmp_path / f"{dataset}-train.parquet", dataset, family)
        folder = write_synthetic_shards(manifest, tmp_path / "run", f"{dataset}/train")
        sources.append(Stage2Source(f"{dataset}/train", manifest, folder, RUN_KEY))
    index = build_index(sources)
    families = index.table["family"].to_pylist()
    datasets = index.table["dataset"].to_pylist()
    rates = {"semantic": 9.0, "referring": 3.0, "reasoning": 1.0}

    sampler = MixtureSampler(families, datasets, rates, seed=0)
    draws = np.concatenate([sampler.draw(step, rank=0, count=100) for step in range(200)])
    shares = {family: np.mean(np.asarray(families)[draws] == family) for family in rates}
    assert shares == pytest.approx({"semantic": 9 / 13, "referring": 3 / 13, "reasoning": 1 / 13}, abs=0.015)
    assert np.array_equal(sampler.draw(7, 1, 8), MixtureSampler(families, datasets, rates, seed=0).draw(7, 1, 8))
    assert not np.array_equal(sampler.draw(7, 0, 8), sampler.draw(7, 1, 8))
    assert not np.array_equal(sampler.draw(7, 0, 8), MixtureSampler(families, datasets, rates, seed=1).draw(7, 0, 8))

    without_semantic = [k for k, family in enumerate(families) if family != "semantic"]
    sampler = MixtureSampler([families[k] for k in without_semantic], [datasets[k] for k in without_semantic], rates, 0)
    assert sampler.mix == pytest.approx({"referring": 0.75, "reasoning": 0.25})
    draws = np.concatenate([sampler.draw(step, 0, 100) for step in range(100)])
    referring = np.mean([families[without_semantic[d]] == "referring" for d in draws])
    assert referring == pytest.approx(0.75, abs=0.02)

    with pytest.raises(ValueError, match="data.sample_rates has no rate for family semantic"):
        MixtureSampler(families, datasets, {"referring": 1.0, "reasoning": 1.0}, 0)


def test_queries_of_one_image_share_one_load_and_text_is_padded(world):
    dataset = Stage2Dataset(build_index(world.train_sources), world.data_root, 256, image_cache_size=0)
    paths = dataset.rows["image_path"]
    first_pair = next(path for path in paths if sum(p == path for p in paths) == 2)  # an image with two queries
    same = [i for i in range(len(dataset)) if paths[i] == first_pair]
    other = next(i for i in range(len(dataset)) if paths[i] != first_pair)
    assert len(same) == 2

    batch = dataset.load_batch([same[0], other, same[1]])
    assert dataset.image_loads == 2
    assert batch["images"].shape == (3, 3, 256, 256)
    assert np.array_equal(batch["images"][0].numpy(), batch["images"][2].numpy())
    lengths = [len(query_token_ids(dataset.value("query", i))) for i in (same[0], other, same[1])]
    assert batch["text_embeds"].dtype.is_floating_point and str(batch["text_embeds"].dtype) == "torch.float16"
    assert batch["text_embeds"].shape == (3, max(lengths), DIM)
    assert batch["text_mask"].sum(1).tolist() == lengths
    for row, length in enumerate(lengths):
        assert not batch["text_embeds"][row, length:].any()
    assert batch["targets"].shape == (3, 256, 256)
    assert set(np.unique(batch["targets"].numpy())) <= {0, 1, 255}
    assert batch["input_sizes"][0] == batch["input_sizes"][2] and max(batch["input_sizes"][0]) == 256

    cached = Stage2Dataset(build_index(world.train_sources), world.data_root, 256, image_cache_size=4)
    cached.load_batch([same[0]])
    cached.load_batch([same[1], other])
    assert cached.image_loads == 2  # the second batch reused the first batch's decode


def test_unusable_image_is_an_example_error_naming_the_sample(world, tmp_path):
    index = build_index(world.val_sources)
    dataset = Stage2Dataset(index, tmp_path / "empty-data-root", 256)
    with pytest.raises(ExampleError) as error:
        dataset.load_batch([1])
    assert error.value.index == 1
    assert dataset.rows["sample_id"][1] in str(error.value) and "image file missing" in str(error.value)
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
