"""Evaluation scores every manifest row, as LISA does: a stage-1 error row, a missing image and a row that stage 1 has
not produced count as empty predictions, and their number is shown beside the score.

The model is the tiny adapted SAM with its decoder set so that every logit is positive (the last upscaling
convolution and the hypernetwork's last layer zeroed, biases 1): it predicts the whole image, so every number below
is computed by hand from 10x10 label masks.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from llavaseg.pipeline import RunSummary
from shared.config import DataConfig, PathsConfig, PipelineConfig, Stage2Config
from shared.masks import mask_ref_json
from shared.schema import MANIFEST_SCHEMA
from stage2_fixtures import DIM, RUN_KEY, write_synthetic_shards
from stage2_segment.checkpoint import write_checkpoint
from stage2_segment.data import Stage2Source
from stage2_segment.evaluate import evaluate
from stage2_segment.modeling import build_adapted_sam

SIZE = 10
# name: (query kind, foreground rows, ignored pixels, what goes wrong)
SAMPLES = {
    "a": ("sentence", 2, 0, None),  # predicted: I 20, U 100
    "b": ("phrase", 1, 5, None),  # predicted: I 10, U 100 - 5 ignored = 95
    "c": ("sentence", 3, 0, "missing image"),  # empty prediction: I 0, U 30
    "d": ("phrase", 0, 0, "stage-1 error"),  # 25 px foreground set below: I 0, U 25
    "e": ("sentence", 0, 0, "no stage-1 row"),  # empty GT, empty prediction: IoU 1, U 0
}
EPS = 1e-5  # LISA's I / (U + 1e-5)


def _label(name: str) -> np.ndarray:
    _, rows, ignored, _ = SAMPLES[name]
    label = np.zeros((SIZE, SIZE), np.uint8)
    label[:rows] = 1
    if name == "d":
        label[5:10, 5:10] = 1
    label[SIZE - 1, :ignored] = 255
    return label


@pytest.fixture(scope="module")
def failing_eval(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-failures")
    data_root, work = root / "data", root / "work"
    (data_root / "images").mkdir(parents=True)
    (data_root / "labels").mkdir()
    rows = []
    for name, (kind, _, _, fault) in SAMPLES.items():
        if fault != "missing image":
            Image.fromarray(np.full((SIZE, SIZE, 3), 90, np.uint8)).save(data_root / "images" / f"{name}.png")
        Image.fromarray(_label(name)).save(data_root / "labels" / f"{name}.png")
        mask = mask_ref_json({"type": "label_png", "path": f"labels/{name}.png", "class_values": [1],
                              "ignore_values": [255]})  # fmt: skip
        rows.append({"sample_id": f"reasonseg/val/{name}/0", "dataset": "reasonseg", "family": "reasoning",
                     "split": "val", "image_path": f"images/{name}.png", "image_id": name,
                     "query": f"the {name} part", "query_kind": kind, "mask": mask, "height": SIZE, "width": SIZE,
                     "reference_answer": None})  # fmt: skip
    manifest = work / "manifests" / "reasonseg-val.parquet"
    manifest.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), manifest)
    produced = root / "produced.parquet"  # stage 1 has not reached sample e
    pq.write_table(pa.Table.from_pylist(rows[:4], schema=MANIFEST_SCHEMA), produced)
    shard_dir = write_synthetic_shards(produced, work / "stage1" / RUN_KEY, "reasonseg/val",
                                       error_ids=("reasonseg/val/d/0",))  # fmt: skip
    source = Stage2Source("reasonseg/val", manifest, shard_dir, RUN_KEY)

    model = build_adapted_sam("tiny", llm_dim=DIM, seed=0)
    with torch.no_grad():
        model.mask_decoder.output_upscaling[3].weight.zero_()
        model.mask_decoder.output_upscaling[3].bias.fill_(1.0)
        last = model.mask_decoder.output_hypernetworks_mlps[0].layers[-1]
        last.weight.zero_()
        last.bias.fill_(1.0)
    config = PipelineConfig(paths=PathsConfig(data_root=str(data_root), work_dir=str(work)),
                            data=DataConfig(generate_demo=False), stage2=Stage2Config(sam_variant="tiny", eval_batch=2),
                            base_dir=str(root))  # fmt: skip
    model_args = ("variant", "llm_dim", "adapter_blocks", "projector_hidden_dim", "seed")
    meta = {"train_name": "whole-image", "step": 1, "model": {key: model.build_args[key] for key in model_args},
            "sam_checkpoint": None}  # fmt: skip
    checkpoint = write_checkpoint(root / "checkpoint", model, meta, config)
    metrics = evaluate(config, [source], checkpoint, name="failures")
    return metrics, work / "eval" / "failures"


def test_every_manifest_row_is_scored_failures_as_empty_predictions(failing_eval):
    metrics, _ = failing_eval
    scores = metrics["results"]["reasonseg/val"]
    assert (scores["count"], scores["failed"]) == (5, 3)
    assert (scores["intersection"], scores["union"]) == (30, 100 + 95 + 30 + 25 + 0)
    assert scores["cIoU"] == pytest.approx(30 / 250)
    assert scores["gIoU"] == pytest.approx((20 / (100 + EPS) + 10 / (95 + EPS) + 0 + 0 + 1) / 5, abs=1e-12)
    long, short = scores["by_query_length"]["long"], scores["by_query_length"]["short"]
    assert (long["count"], long["failed"], long["intersection"], long["union"]) == (3, 2, 20, 130)
    assert long["gIoU"] == pytest.approx((20 / (100 + EPS) + 0 + 1) / 3, abs=1e-12)
    assert (short["count"], short["failed"], short["intersection"], short["union"]) == (2, 1, 10, 120)
    assert short["gIoU"] == pytest.approx(10 / (95 + EPS) / 2, abs=1e-12)
    assert metrics["failures"] == {"reasonseg/val": {"stage1_error": 1, "no_stage1_row": 1, "no_prediction": 1}}


def test_per_sample_records_name_each_failure(failing_eval):
    _, out = failing_eval
    records = {r["sample_id"].split("/")[2]: r for r in map(json.loads, (out / "per_sample.jsonl").open())}
    assert {name: (r["status"], r["intersection"], r["union"]) for name, r in records.items()} == {
        "a": ("ok", 20, 100), "b": ("ok", 10, 95), "c": ("no_prediction", 0, 30), "d": ("stage1_error", 0, 25),
        "e": ("no_stage1_row", 0, 0),
    }  # fmt: skip
    assert "images/c.png" in records["c"]["error"] and "synthetic failure" in records["d"]["error"]
    assert records["e"]["iou"] == pytest.approx(1.0)


def test_the_failed_count_is_beside_the_score_in_markdown_and_run_summary(failing_eval):
    metrics, out = failing_eval
    markdown = (out / "metrics.md").read_text()
    giou = 100 * metrics["results"]["reasonseg/val"]["gIoU"]
    assert f"| reasonseg/val | all | 5 | {giou:.1f} | 12.0 | 3 |" in markdown
    assert "| reasonseg/val | short | 2 | 5.3 | 8.3 | 1 |" in markdown
    assert "'stage1_error': 1, 'no_stage1_row': 1, 'no_prediction': 1" in markdown
    trained = SimpleNamespace(final_loss=0.5, steps_done=0, final_step=1, checkpoint_dir="c", samples_per_s=None)
    summary = RunSummary({}, SimpleNamespace(describe=lambda: "stage 1"), trained, metrics, None, False,
                         out / "report.md", out / "report.html")  # fmt: skip
    text = summary.describe()
    assert f"reasonseg/val: gIoU {giou:.1f}%  cIoU 12.0%  (5 samples)  3 failed (scored as empty predictions)" in text
    assert "short queries: gIoU 5.3%  cIoU 8.3%  (2 samples)  1 failed (scored as empty predictions)" in text
