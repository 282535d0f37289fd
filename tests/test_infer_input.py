"""``infer --input`` end to end on the user's own table: real vLLM stage 1 (tiny LLaVA), real Ray Data stage 2 (tiny SAM).

Eight rows, one image missing and one query empty: six decodable RLE masks at their images' sizes, two error rows
naming the cause, and a rerun that does nothing.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask_api

from conftest import TINY_MAX_EMBED_TOKENS, TINY_MAX_NEW_TOKENS
from llavaseg.infer_input import REJECTED_SHARD, infer_input
from shared.config import DataConfig, PathsConfig, PipelineConfig, RayConfig, Stage1Config, Stage2Config
from stage2_segment.checkpoint import write_checkpoint
from stage2_segment.infer import PREDICTION_SCHEMA
from stage2_segment.modeling import build_adapted_sam

MODEL_ARGS = ("variant", "llm_dim", "adapter_blocks", "projector_hidden_dim", "seed")


def whole_image_checkpoint(folder: Path, llm_dim: int) -> Path:
    """A tiny adapted SAM whose decoder predicts every pixel (logit 1 everywhere): masks with known contents."""
    model = build_adapted_sam("tiny", llm_dim=llm_dim, seed=0)
    with torch.no_grad():
        model.mask_decoder.output_upscaling[3].weight.zero_()
        model.mask_decoder.output_upscaling[3].bias.fill_(1.0)
        last = model.mask_decoder.output_hypernetworks_mlps[0].layers[-1]
        last.weight.zero_()
        last.bias.fill_(1.0)
    meta = {"train_name": "whole-image", "step": 1, "model": {key: model.build_args[key] for key in MODEL_ARGS},
            "sam_checkpoint": None}  # fmt: skip
    return write_checkpoint(folder, model, meta, PipelineConfig())


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_llava_dir, draw_demo):
    base = tmp_path_factory.mktemp("own-images")
    photos = base / "photos"
    photos.mkdir()
    rows, sizes = [], {}
    for k in range(8):
        width, height = 90 + 11 * k, 70 + 5 * k
        image, phrase = draw_demo(k, (width, height))
        name = f"img{k}.png"
        if k != 3:  # row 4's image is missing
            image.save(photos / name)
            sizes[name] = (height, width)
        rows.append({"id": f"mine-{k}", "image": name, "query": "" if k == 5 else f"where is {phrase}?"})
    table = base / "queries.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "image", "query"])
        writer.writeheader()
        writer.writerows(rows)
    config = PipelineConfig(
        paths=PathsConfig(data_root=str(photos), work_dir=str(base / "work")),
        data=DataConfig(generate_demo=False),
        stage1=Stage1Config(model=str(tiny_llava_dir), max_new_tokens=TINY_MAX_NEW_TOKENS, shard_size=4,
                            max_embed_tokens=TINY_MAX_EMBED_TOKENS),
        stage2=Stage2Config(sam_variant="tiny", eval_batch=4),
        ray=RayConfig(num_workers=1, cpus_per_worker=1),
        base_dir=str(base),
    )  # fmt: skip
    checkpoint = whole_image_checkpoint(base / "checkpoint", llm_dim=128)
    return base, table, config, checkpoint, sizes


def test_infer_input_end_to_end_and_rerun(project, ray_cluster, vllm_generation_engine, vllm_pooling_engine):
    base, table, config, checkpoint, sizes = project
    engines = dict(root=base / "photos", backend=vllm_generation_engine, embedder=vllm_pooling_engine)
    summary = infer_input(config, table, checkpoint, png_dir=base / "png", **engines)
    assert (summary["rows"], summary["ok"], summary["errors"], summary["rejected_rows"]) == (8, 6, 2, 2)
    assert (summary["stage1_new_rows"], summary["stage1_reused_rows"]) == (6, 0)
    assert (summary["stage2_shards_written"], summary["pngs_written"]) == (2, 6)

    folder = Path(summary["predictions"])
    assert folder == config.work_dir / "predictions" / "queries-inference"
    assert sorted(p.name for p in folder.glob("*.parquet")) == ["00000.parquet", "00001.parquet", REJECTED_SHARD]
    predictions = pq.read_table(folder)  # the folder as any reader takes it: every row once
    assert predictions.schema.remove_metadata().equals(PREDICTION_SCHEMA)
    rows = {row["sample_id"]: row for row in predictions.to_pylist()}
    assert sorted(rows) == [f"mine-{k}" for k in range(8)]
    for k in (0, 1, 2, 4, 6, 7):
        row = rows[f"mine-{k}"]
        assert (row["status"], row["error"]) == ("ok", None), row
        assert row["image_path"] == f"img{k}.png" and row["query"].startswith("where is ")
        assert row["reason_answer"] and row["target"] is not None and row["attributes"] is not None
        rle = json.loads(row["rle"])
        mask = coco_mask_api.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert mask.shape == sizes[f"img{k}.png"] == (row["height"], row["width"])
        assert int(mask.sum()) == mask.size  # the whole-image decoder
        assert 0.5 < row["score"] <= 1.0  # mean sigmoid inside a mask of positive logits
        with Image.open(base / "png" / f"mine-{k}-{_digest(f'mine-{k}')}-mask.png") as picture:
            assert picture.size == (row["width"], row["height"])
    missing, empty = rows["mine-3"], rows["mine-5"]
    assert missing["status"] == "error" and missing["rle"] is None
    photos = base / "photos"
    assert missing["error"] == f"queries.csv row 4 (img3.png): image missing: img3.png not found under {photos}"
    assert empty["error"] == "queries.csv row 6 (img5.png): empty query: the query is empty"

    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("*.parquet")}
    again = infer_input(config, table, checkpoint, png_dir=base / "png", **engines)
    assert (again["stage1_new_rows"], again["stage1_reused_rows"], again["stage1_generated_samples"]) == (0, 6, 0)
    assert (again["stage2_shards_written"], again["stage2_rows_written"], again["rejected_written"]) == (0, 0, False)
    assert again["pngs_written"] == 0 and (again["rows"], again["ok"]) == (8, 6)
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*.parquet")} == stamps


def _digest(sample_id: str) -> str:
    return hashlib.sha256(sample_id.encode()).hexdigest()[:8]


def test_a_missing_default_checkpoint_is_a_clear_error(project, capfd):
    from llavaseg import cli

    base, table, _, _, _ = project
    code = cli.main(["infer", "--input", str(table), f"paths.work_dir={base / 'empty-work'}",
                     f"paths.data_root={base / 'photos'}", "data.generate_demo=false"])  # fmt: skip
    assert code == 2
    assert "run `llavaseg run` or `llavaseg train` first, or pass --checkpoint DIR" in capfd.readouterr().err


def test_two_replicas_answer_every_row_once(project, ray_cluster, vllm_generation_engine, vllm_pooling_engine):
    """``--replicas 2``: stage 2 on a pool of two Ray Data actors writes the same answers, each row once."""
    import dataclasses

    base, table, config, checkpoint, sizes = project
    two = dataclasses.replace(config, ray=dataclasses.replace(config.ray, num_workers=2),
                              stage1=dataclasses.replace(config.stage1, replicas=2))  # fmt: skip
    summary = infer_input(two, table, checkpoint, out_dir=base / "predictions-2-replicas", root=base / "photos",
                          backend=vllm_generation_engine, embedder=vllm_pooling_engine)  # fmt: skip
    assert (summary["rows"], summary["ok"], summary["errors"], summary["stage2_shards_written"]) == (8, 6, 2, 2)
    predictions = pq.read_table(summary["predictions"]).sort_by("sample_id")
    assert predictions.column("sample_id").to_pylist() == [f"mine-{k}" for k in range(8)]
    for row in predictions.to_pylist():
        if row["status"] == "ok":
            rle = json.loads(row["rle"])
            mask = coco_mask_api.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            assert mask.shape == sizes[row["image_path"]] and int(mask.sum()) == mask.size  # the whole-image decoder
