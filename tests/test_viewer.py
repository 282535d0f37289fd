"""The sample viewer in headless Chromium (Playwright driving Debian's /usr/bin/chromium, no downloaded browser).

Two run folders: a synthetic evaluation of 2,000 samples built from the files a run leaves (manifests, stage-1 shards
written with ``shared.shards``, ``per_sample.jsonl``, ``predictions.parquet``) for filtering and paging, and the
report of the real small run data ``test_report`` uses (demo photos, label-mask ground truth, overlay predictions).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from stage2_fixtures import write_synthetic_shards
from test_report import CHROMIUM_FLAGS, HOSTILE_QUERY, chromium, report_inputs, written_report  # noqa: F401

from llavaseg.report.samples import PREDICTIONS_FILE, evaluated_samples
from llavaseg.report.viewer import CHUNK_SIZE, write_viewer
from shared.schema import MANIFEST_SCHEMA
from shared.shards import read_shards
from stage2_segment.data import Stage2Source
from stage2_segment.rle import encode_mask_json

SPLITS = {"val": 1400, "test": 600}  # 2,000 samples
N_IMAGES = 12
PAGE_SIZE = 24  # viewer.js


def _iou(n: int) -> float:
    return (n * 37 % 101) / 100


def _status(n: int) -> str:
    return "stage1_error" if n % 97 == 5 else "no_prediction" if n % 89 == 7 else "ok"


@pytest.fixture(scope="module")
def big_run(tmp_path_factory: pytest.TempPathFactory, draw_demo) -> dict:
    """2,000 evaluated samples over 12 small demo images, every file in its run format; returns the viewer folder,
    the sources and the expected per-sample table."""
    root = tmp_path_factory.mktemp("big_run")
    data_root = root / "data"
    (data_root / "images").mkdir(parents=True)
    for i in range(N_IMAGES):
        draw_demo(i, (64, 48))[0].save(data_root / "images" / f"{i}.jpg", quality=90)
    sources, expected, per_sample, predictions = [], [], [], {"sample_id": [], "rle": []}
    n = 0
    for split, count in SPLITS.items():
        rows = []
        for k in range(count):
            x = 4 + n % 20
            box = [[x, 8], [x + 24, 8], [x + 24, 36], [x, 36]]
            rows.append({
                "sample_id": f"reasonseg/{split}/img{k:05d}/0", "dataset": "reasonseg", "family": "reasoning",
                "split": split, "image_path": f"images/{n % N_IMAGES}.jpg", "image_id": f"img{k:05d}",
                "query": f"sample {n}: which shape is number {n}?" if n % 2 else f"shape number {n}",
                "query_kind": "sentence" if n % 2 else "phrase",
                "mask": json.dumps({"type": "reasonseg", "shapes": [{"label": "target", "points": box}]}),
                "height": 48, "width": 64, "reference_answer": f"reference {n}" if n % 3 == 0 else None,
            })  # fmt: skip
            expected.append({"n": n, **rows[-1], "spec": f"reasonseg/{split}", "iou": _iou(n), "status": _status(n)})
            per_sample.append({"sample_id": rows[-1]["sample_id"], "spec": f"reasonseg/{split}",
                               "query_kind": rows[-1]["query_kind"], "intersection": round(100 * _iou(n)),
                               "union": 100, "iou": _iou(n), "status": _status(n), "error": None})  # fmt: skip
            if _status(n) == "ok":
                prediction = np.zeros((48, 64), np.uint8)
                prediction[10:40, x + 6 : x + 30] = 1
                predictions["sample_id"].append(rows[-1]["sample_id"])
                predictions["rle"].append(encode_mask_json(prediction))
            n += 1
        manifest = root / "manifests" / f"reasonseg-{split}.parquet"
        manifest.parent.mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), manifest)
        errors = tuple(r["sample_id"] for r, e in zip(rows, expected[-count:]) if e["status"] == "stage1_error")
        folder = write_synthetic_shards(manifest, root / "stage1" / "run", f"reasonseg/{split}", shard_size=500,
                                        error_ids=errors)  # fmt: skip
        sources.append(Stage2Source(f"reasonseg/{split}", manifest, folder, "synthetic-0123456789ab"))
    eval_dir = root / "eval"
    eval_dir.mkdir()
    (eval_dir / "per_sample.jsonl").write_text("".join(json.dumps(r) + "\n" for r in per_sample))
    pq.write_table(pa.table(predictions), eval_dir / PREDICTIONS_FILE)
    samples = evaluated_samples(sources, eval_dir, data_root)
    counts = write_viewer(root / "viewer", samples, "Synthetic run")
    assert counts["samples"] == 2000 and counts["without_picture"] == 0
    return {"viewer": root / "viewer", "sources": sources, "expected": expected}


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="viewer-profile-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=chromium(), headless=True, args=CHROMIUM_FLAGS, viewport={"width": 1280,
                                                                                                "height": 900})
        yield context
        context.close()


class Page:
    """A viewer page with every console error, page error and dialog it raised."""

    def __init__(self, browser, url: str) -> None:
        self.page = browser.new_page()
        self.problems: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("dialog", lambda d: (self.problems.append(f"dialog: {d.message}"), d.dismiss()))
        self.page.goto(url)
        self.page.wait_for_function("document.querySelectorAll('#grid .card[data-sample-id]').length > 0")

    def summary(self) -> str:
        return self.page.inner_text("#summary")

    def cards(self) -> list[dict]:
        self.page.wait_for_function(
            "[...document.querySelectorAll('#grid .card')].every(c => c.dataset.sampleId)")
        return self.page.eval_on_selector_all("#grid .card", """cards => cards.map(c => ({
            n: Number(c.dataset.n), id: c.dataset.sampleId, iou: c.querySelector('.iou').textContent,
            query: c.querySelector('.query').textContent}))""")

    def chunks_loaded(self) -> int:
        return self.page.eval_on_selector_all("script[src*='chunk-']", "s => s.length")

    def open_sample(self, index: int) -> dict[str, str]:
        self.page.locator("#grid .card").nth(index).click()
        self.page.wait_for_selector("#detail.open")
        self.page.wait_for_function("document.getElementById('d-image').complete")
        return self.page.eval_on_selector_all("#d-fields dd", "dds => Object.fromEntries(dds.map(d => "
                                                                "[d.dataset.field, d.textContent]))")

    def detail_image_width(self) -> int:
        return self.page.eval_on_selector("#d-image", "img => img.naturalWidth")


def test_filter_sort_page_and_open_a_sample_of_thousands(big_run: dict, browser, tmp_path: Path) -> None:
    viewer = Page(browser, (big_run["viewer"] / "index.html").as_uri())
    page = viewer.page
    assert viewer.summary() == "2,000 of 2,000 samples match; showing 1–24"
    assert [c["n"] for c in viewer.cards()] == list(range(PAGE_SIZE))
    assert viewer.chunks_loaded() == 1  # the first page's texts only, not all 3000 / 100 chunks
    assert page.eval_on_selector_all("#grid img", "imgs => imgs.every(i => i.loading === 'lazy')")

    page.select_option("#f-spec", "reasonseg/test")
    page.select_option("#f-kind", "phrase")
    page.select_option("#f-status", "ok")
    page.fill("#f-min", "0.5")
    page.dispatch_event("#f-min", "change")
    page.fill("#f-max", "0.8")
    page.dispatch_event("#f-max", "change")
    page.select_option("#f-sort", "iou-desc")
    wanted = [e for e in big_run["expected"] if e["spec"] == "reasonseg/test" and e["query_kind"] == "phrase"
              and e["status"] == "ok" and 0.5 <= e["iou"] <= 0.8]  # fmt: skip
    wanted.sort(key=lambda e: (-e["iou"], e["n"]))
    assert len(wanted) > 2 * PAGE_SIZE
    assert viewer.summary() == f"{len(wanted)} of 2,000 samples match; showing 1–24"
    cards = viewer.cards()
    assert [c["n"] for c in cards] == [e["n"] for e in wanted[:PAGE_SIZE]]
    assert [c["iou"] for c in cards] == [f"IoU {100 * e['iou']:.1f}%" for e in wanted[:PAGE_SIZE]]
    page.click("#next")
    assert page.inner_text("#page-label") == f"page 2 of {-(-len(wanted) // PAGE_SIZE)}"
    assert [c["n"] for c in viewer.cards()] == [e["n"] for e in wanted[PAGE_SIZE : 2 * PAGE_SIZE]]
    assert viewer.chunks_loaded() < 2000 // CHUNK_SIZE / 2  # only the chunks of the samples shown

    fields = viewer.open_sample(3)
    sample = wanted[PAGE_SIZE + 3]
    shard = read_shards(big_run["sources"][1].shard_dir).to_pylist()
    row = next(r for r in shard if r["sample_id"] == sample["sample_id"])
    assert fields["sample_id"] == sample["sample_id"] and fields["query"] == sample["query"] == row["query"]
    assert fields["reason_answer"] == row["reason_answer"] and fields["target"] == row["target"]
    assert fields["attributes"] == row["attributes"] and fields["parse_status"] == row["parse_status"]
    assert fields["iou"] == f"{100 * sample['iou']:.1f}%" and fields["status"] == "ok"
    assert fields["spec"] == "reasonseg/test" and fields["query_kind"] == "phrase"
    assert fields.get("reference_answer") == sample["reference_answer"]
    assert viewer.detail_image_width() == 64  # 64x48 images are not scaled up
    shot = tmp_path / "viewer.png"
    page.screenshot(path=str(shot))
    pixels = np.asarray(Image.open(shot).convert("RGB"), np.int32)
    assert (np.abs(pixels - (255, 40, 220)).max(axis=-1) <= 40).sum() > 50  # prediction outlines on screen
    page.keyboard.press("Escape")
    assert not page.is_visible("#detail")

    page.select_option("#f-status", "stage1_error")
    errors = [e for e in big_run["expected"] if e["status"] == "stage1_error" and e["spec"] == "reasonseg/test"
              and e["query_kind"] == "phrase" and 0.5 <= e["iou"] <= 0.8]  # fmt: skip
    assert viewer.summary().startswith(f"{len(errors)} of 2,000" if errors else "no sample of 2,000")
    assert viewer.problems == []
    page.close()


def test_viewer_of_the_real_small_run(written_report, report_inputs: dict, browser) -> None:  # noqa: F811
    report_page = browser.new_page()
    report_page.goto(written_report[1].as_uri())
    report_page.click("#viewer-link")
    assert report_page.url.endswith("/viewer/index.html")
    report_page.close()
    viewer = Page(browser, (written_report[1].parent / "viewer" / "index.html").as_uri())
    page = viewer.page
    gallery = report_inputs["gallery"]
    assert viewer.summary() == f"{len(gallery)} of {len(gallery)} samples match; showing 1–{len(gallery)}"
    cards = viewer.cards()
    assert [c["id"] for c in cards] == [case["sample_id"] for case in gallery]
    assert cards[0]["query"] == HOSTILE_QUERY  # shown as text: no script ran (no dialog, see problems)
    assert page.eval_on_selector_all("#grid img", "imgs => imgs.length") == len(gallery)

    page.select_option("#f-sort", "iou-asc")
    ids = [c["id"] for c in viewer.cards()]
    assert ids[0] == "reasonseg/val/image4/0" and ids[-1] == "reasonseg/val/unscored/0"  # no IoU: last
    page.fill("#f-min", "0.5")
    page.dispatch_event("#f-min", "change")
    assert [re.sub(r"IoU ", "", c["iou"]) for c in viewer.cards()] == ["55.0%", "66.0%", "73.0%", "91.0%"]

    page.fill("#f-min", "0")
    page.dispatch_event("#f-min", "change")
    page.select_option("#f-sort", "order")
    fields = viewer.open_sample(4)  # its prediction file is missing: the image with the ground truth, and why
    case = gallery[4]
    assert fields["query"] == case["query"] and fields["target"] == case["target"]
    assert fields["attributes"] == case["attributes"] and fields["reason_answer"] == case["reason_answer"]
    assert viewer.detail_image_width() == 384
    assert "missing-prediction.png" in page.inner_text("#d-noimage")
    assert viewer.problems == []
    page.close()


def test_viewer_of_inference_predictions(tmp_path: Path, draw_demo) -> None:
    """`infer --input` writes a viewer of its predictions table: no ground truth, no IoU, error rows with their text."""
    from llavaseg.report.samples import inferred_samples
    from stage2_segment.infer import PREDICTION_SCHEMA

    draw_demo(0, (80, 60))[0].save(tmp_path / "photo.jpg")
    mask = np.zeros((60, 80), np.uint8)
    mask[10:40, 20:60] = 1
    rows = [{"sample_id": "mine/inference/photo/0", "image_path": "photo.jpg", "query": "the red circle",
             "reason_answer": "a red circle", "target": "red circle", "attributes": "round", "score": 0.9,
             "rle": encode_mask_json(mask), "height": 60, "width": 80, "status": "ok", "error": None},
            {"sample_id": "mine/inference/gone/0", "image_path": "gone.jpg", "query": "q", "status": "error",
             "error": "image file missing under data_root"}]  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA)
    counts = write_viewer(tmp_path / "viewer", inferred_samples(table, "mine/inference", tmp_path), "Inference")
    assert counts == {"samples": 2, "without_picture": 1, "index": tmp_path / "viewer" / "index.html"}
    index = json.loads(re.search(r"llavasegIndex\((.*)\);", (tmp_path / "viewer" / "data" / "index.js").read_text())[1])
    assert index["rows"] == [[0, 0, 1, None], [0, 0, 0, None]] and index["statuses"] == ["error", "ok"]
    chunk = (tmp_path / "viewer" / "data" / "chunk-00000.js").read_text()
    assert "image file missing under data_root" in chunk and "a red circle" in chunk
    picture = np.asarray(Image.open(tmp_path / "viewer" / "images" / "00000" / "000000.jpg").convert("RGB"), np.int32)
    assert picture.shape == (60, 80, 3)
    assert (np.abs(picture - (255, 40, 220)).max(axis=-1) <= 60).sum() > 50  # the prediction outlined
