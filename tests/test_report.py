"""The run report: Markdown and HTML content, escaping, gallery choice, outlines readable on any target colour, the
breakdowns, stage-1 errors and provenance, the run folders and their index, rendering in headless Chromium."""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from llavaseg.report import (
    GT_OUTLINE,
    OUTLINE_DARK,
    PRED_OUTLINE,
    draw_outlines,
    outline_bands,
    segmentation_rows,
    select_cases,
    write_report,
)
from llavaseg.report.runs import new_run_folder, write_index

IOUS = [0.91, 0.12, 0.55, 0.73, 0.02, 0.40, 0.66]  # best: 0, 3, 6, 2; worst: 4, 1, 5
HOSTILE_QUERY = 'Which object holds water? <script>alert("x")</script> & co'


@pytest.fixture(scope="module")
def report_inputs(tmp_path_factory: pytest.TempPathFactory, draw_demo) -> dict:
    """Realistic inputs: demo photos, label-mask PNGs (0/1/255) as ground truth, RGB overlay PNGs as predictions."""
    folder = tmp_path_factory.mktemp("report_inputs")
    gallery = []
    for index, iou in enumerate(IOUS):
        image, phrase = draw_demo(index, (640, 480))
        image.save(folder / f"image{index}.jpg", quality=92)
        gt = np.zeros((480, 640), np.uint8)
        gt[100:300, 150:400] = 1
        gt[100:110, 150:400] = 255
        Image.fromarray(gt).save(folder / f"gt{index}.png")
        overlay = image.copy()
        ImageDraw.Draw(overlay, "RGBA").rectangle((150 + 25 * index, 130, 420, 320), fill=(230, 50, 50, 140))
        overlay.save(folder / f"pred{index}.png")
        gallery.append({
            "image": str(folder / f"image{index}.jpg"), "gt": str(folder / f"gt{index}.png"),
            "pred": str(folder / f"pred{index}.png"), "query": HOSTILE_QUERY if index == 0 else f"query {index}",
            "target": phrase, "attributes": f"attributes of case {index}", "reason_answer": f"answer {index}",
            "iou": iou, "sample_id": f"reasonseg/val/image{index}/0",
        })  # fmt: skip
    gallery[4]["pred"] = str(folder / "missing-prediction.png")
    gallery.append(dict(gallery[1], iou=float("nan"), sample_id="reasonseg/val/unscored/0"))
    return {
        "title": "Demo run <b>report</b>",
        "metrics": {
            "per_split": {
                "reasonseg/val": {"gIoU": 0.5912, "cIoU": 0.5281, "count": 200, "failed": 3, "by_query_kind": {
                    "short": {"gIoU": 0.55, "cIoU": 0.5, "count": 80, "failed": 1},
                    "long": {"gIoU": 0.61, "cIoU": 0.54, "count": 120, "failed": 2}}},
                "refcoco/val": {"gIoU": 0.7, "cIoU": 0.7214, "count": 8811},
            },
            "checkpoint": "work/stage2/checkpoint-12000",
        },  # fmt: skip
        "stage1": {
            "run_key": "tiny-llava-1a2b3c4d5e6f", "new_rows": 210, "reused_rows": 0, "errors": 2,
            "generated_samples": 210, "seconds": 42.0, "capped_rows": 21, "max_embed_tokens": 64,
            "per_manifest": {"reasonseg/val": {"rows": 200, "shards": 2, "new_rows": 200, "reused_rows": 0,
                                               "errors": 2, "capped_rows": 20, "generated_tokens": 24000,
                                               "embedded_tokens": 3100}},
        },  # fmt: skip
        "loss_curve": [{"step": s, "loss": 1.8 * math.exp(-s / 300) + 0.2, "lr": 1e-4 * (1 - s / 1200)}
                       for s in range(0, 1200, 20)],  # fmt: skip
        "gallery": gallery,
        "dialogue": {"ROUGE-L": 0.40123, "CIDEr": 0.81234, "count": 200},
        "notes": ["smoke run: tiny random models; numbers say nothing about the method"],
        "samples": [{**case, "spec": "reasonseg/val", "query_kind": ("sentence", "phrase")[i % 2],
                     "family": "reasoning", "parse_status": ("ok", "fallback")[i % 3 == 2], "status": "ok",
                     "intersection": 0 if math.isnan(case["iou"]) else round(100 * case["iou"]), "union": 100}
                    for i, case in enumerate(gallery)],
        "stage1_errors": [{"sample_id": "reasonseg/val/broken/0", "error": "image unreadable: <truncated JPEG>"},
                          {"sample_id": "reasonseg/val/long/0", "error": "prompt longer than max_model_len"},
                          {"sample_id": "reasonseg/val/long/1", "error": "prompt longer than max_model_len"}],
        "provenance": {"models": {"MLLM": "tiny-llava", "SAM variant": "tiny", "training step": 1200},
                       "stage 2 hyper-parameters": {"lr": 0.001, "adam_betas": [0.9, 0.999]},
                       "code": {"commit": "0123456789abcdef"}, "packages": {"torch": "2.14.1"}},
    }


@pytest.fixture(scope="module")
def written_report(report_inputs: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_report(tmp_path_factory.mktemp("report") / "out", **report_inputs)


def test_markdown_holds_the_numbers(written_report: tuple[Path, Path]) -> None:
    md = written_report[0].read_text()
    assert "| split | gIoU (%) | cIoU (%) | samples | failed (scored empty) |" in md
    assert "| reasonseg/val | 59.1 | 52.8 | 200 | 3 |" in md  # failures (scored as empty predictions) beside the score
    assert "| &emsp;reasonseg/val · short | 55.0 | 50.0 | 80 | 1 |" in md
    assert "| &emsp;reasonseg/val · long | 61.0 | 54.0 | 120 | 2 |" in md
    assert "| refcoco/val | 70.0 | 72.1 | 8,811 | – |" in md
    assert "| LLaVASeg-13B | 59.1 | 52.8 | 0.393 | 0.796 |" in md  # the paper's row beside ours
    assert "| 0.401 | 0.812 | 200 |" in md
    assert "| run key | tiny-llava-1a2b3c4d5e6f |" in md and "| generation throughput | 5.00 samples/s |" in md
    # the stage-1 summary in words, not its raw keys
    assert "| samples | 210 (210 reasoned by this run, 0 reused from earlier runs) |" in md
    assert "| stage-1 errors | 2 (1.0%) |" in md and "| wall time of this run | 42.0 s |" in md
    assert "| new rows | 210 |" not in md and "| generated samples |" not in md and "| seconds |" not in md
    assert "| reasonseg/val | 200 | 2 | 200 | 0 | 2 | 20 | 24,000 | 3,100 |" in md
    assert "60 logged steps; loss 2.0000 at step 0 → 0.2352 at step 1180." in md
    assert "> **Note:** smoke run: tiny random models; numbers say nothing about the method" in md


def test_rows_cut_at_the_embedding_cap_are_reported(written_report: tuple[Path, Path]) -> None:
    md = written_report[0].read_text()
    assert r"| rows cut at max\_embed\_tokens | 21 of 210 (10.0%), cap 64 tokens |" in md
    assert "| capped rows | 21 |" not in md and "| max embed tokens | 64 |" not in md  # one row, not the raw keys
    assert r"21 rows had a seg\_text longer than stage1.max\_embed\_tokens" in md
    assert "| manifest | rows | shards | new rows | reused rows | errors | capped rows |" in md
    assert "| reasonseg/val | 200 | 2 | 200 | 0 | 2 | 20 |" in md


def test_every_link_is_relative_and_inside_the_folder(written_report: tuple[Path, Path]) -> None:
    md_path, html_path = written_report
    out_dir = md_path.parent
    md_links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_path.read_text())
    html_links = re.findall(r'<img [^>]*src="([^"]+)"', html_path.read_text())
    assert sorted(md_links) == sorted(html_links)
    assert len(html_links) == 2 + 3 * 7 - 1  # histogram, loss plot + 7 cases x 3 pictures, one prediction missing
    for link in html_links:
        assert not link.startswith(("/", "file:")) and ".." not in link, link
        assert (out_dir / link).is_file(), link


def test_gallery_shows_best_then_worst_by_iou(written_report: tuple[Path, Path], report_inputs: dict) -> None:
    md = written_report[0].read_text()
    headings = re.findall(r"^#### (\d)\\?\. IoU ([\d.]+)% — reasonseg/val/(\w+)/0$", md, re.MULTILINE)
    assert [(rank, iou, name) for rank, iou, name in headings] == [
        ("1", "91.0", "image0"), ("2", "73.0", "image3"), ("3", "66.0", "image6"), ("4", "55.0", "image2"),
        ("1", "2.0", "image4"), ("2", "12.0", "image1"), ("3", "40.0", "image5"),
    ]  # fmt: skip
    assert md.index("### Best cases") < md.index("### Worst cases")
    assert "unscored" not in md  # a NaN IoU is not ranked
    assert f"cannot read {report_inputs['gallery'][4]['pred']}".replace("_", "\\_") in md
    assert "- **target:** " + report_inputs["gallery"][3]["target"] in md
    assert "- **MLLM answer:** answer 6" in md


def test_html_escapes_every_text(written_report: tuple[Path, Path]) -> None:
    page = written_report[1].read_text()
    assert "<script" not in page and "<b>report</b>" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; co" in page  # markupsafe writes " as &#34;
    assert "<title>Demo run &lt;b&gt;report&lt;/b&gt;</title>" in page
    md = written_report[0].read_text()
    assert "&lt;script&gt;" in md and "<script" not in md


def test_label_mask_is_outlined_over_the_image(written_report: tuple[Path, Path], report_inputs: dict) -> None:
    gallery_dir = written_report[0].parent / "report_files" / "gallery"
    gt = np.asarray(Image.open(gallery_dir / "best-01-gt.png").convert("RGB"), np.int32)
    source = Image.open(report_inputs["gallery"][0]["image"]).convert("RGB")
    source.thumbnail((512, 512), Image.LANCZOS)
    photo = np.asarray(source, np.int32)
    assert gt.shape == photo.shape == (384, 512, 3)  # 640x480 scaled to the 512 thumbnail side
    # the 1-region, rows 100..299 of 640x480, is rows 80..239 of the thumbnail: its lower edge at row 239 carries a
    # 3-pixel light core (rows 238..240) between 2-pixel dark bands (236..237, 241..242)
    assert [tuple(gt[row, 220]) for row in range(235, 244)] == [
        tuple(photo[235, 220]), *[OUTLINE_DARK] * 2, *[GT_OUTLINE] * 3, *[OUTLINE_DARK] * 2, tuple(photo[243, 220])]
    assert np.array_equal(gt[190, 220], photo[190, 220])  # inside: the image itself, no tint hides the target
    assert np.array_equal(gt[340, 100], photo[340, 100])  # background untouched
    ignored = gt[82, 220]  # rows 100..110 are 255: tinted grey
    assert np.abs(ignored - np.round(0.5 * photo[82, 220] + 0.5 * np.asarray((150, 150, 150)))).max() <= 1


def test_outlines_stand_out_on_a_green_target() -> None:
    green = (40, 200, 80)  # the colour the ground truth was once tinted in, invisible on green targets
    image = Image.new("RGB", (200, 160), (128, 128, 128))
    ImageDraw.Draw(image).rectangle((50, 40, 150, 120), fill=green)
    mask = np.zeros((160, 200), np.uint8)
    mask[40:121, 50:151] = 1
    prediction = np.zeros_like(mask)
    prediction[60:140, 80:180] = 1
    drawn = np.asarray(draw_outlines(image, [(mask, GT_OUTLINE), (prediction, PRED_OUTLINE)]), np.int32)
    for labels in (mask, prediction):
        dark, light = outline_bands(labels == 1)
        assert dark.sum() > 300 and light.sum() > 300
        outline = dark | light
        on_target = outline & (np.asarray(image, np.int32) == green).all(axis=-1)
        assert on_target.sum() > 100  # part of each outline lies on the green object...
        distance = np.abs(drawn[on_target] - np.asarray(green)).max(axis=-1)
        assert distance.min() >= 120, "outline pixels too close to the object's colour"  # ...and differs from it
    assert (np.abs(drawn - np.asarray(PRED_OUTLINE)).max(axis=-1) == 0).sum() > 300  # prediction drawn in its colour
    assert (np.abs(drawn - np.asarray(GT_OUTLINE)).max(axis=-1) == 0).sum() > 200  # ground truth still visible


def test_breakdowns_errors_and_provenance(written_report: tuple[Path, Path]) -> None:
    md = written_report[0].read_text()
    assert "### Scores by query kind" in md and "### Scores by stage-1 parse status" in md
    assert "### Scores by dataset family" in md
    # query kind: cases 0, 2, 4, 6 sentence (IoU 91, 55, 2, 66 -> mean 53.5, cIoU (91+55+2+66)/400 = 53.5)
    assert "| sentence | 53.5 | 53.5 | 4 | 0 |" in md
    assert "| phrase | 41.7 | 41.7 | 3 | 0 |" in md  # cases 1, 3, 5 (the NaN case is not scored)
    assert "| fallback | 47.5 | 47.5 | 2 | 0 |" in md  # cases 2, 5 (IoU 55, 40)
    assert "| reasoning | 48.4 | 48.4 | 7 | 0 |" in md
    assert "![per-sample IoU histogram of 7 samples](report_files/iou_histogram.png)" in md
    assert "| prompt longer than max\\_model\\_len | 2 |" in md
    assert "| image unreadable: &lt;truncated JPEG&gt; | 1 |" in md
    assert "| reasonseg/val/broken/0 | image unreadable: &lt;truncated JPEG&gt; |" in md
    assert "### Models" in md and "| SAM variant | tiny |" in md and "| adam\\_betas | 0.9, 0.999 |" in md
    assert "| commit | 0123456789abcdef |" in md and "| torch | 2.14.1 |" in md
    summary = json.loads((written_report[0].parent / "report.json").read_text())
    assert summary["samples"] == 8 and summary["stage1_errors"] == 3
    assert summary["segmentation"][0] == {"split": "reasonseg/val", "gIoU": 0.5912, "cIoU": 0.5281, "count": 200,
                                          "failed": 3}  # fmt: skip


def test_each_run_gets_a_folder_and_the_index_compares_them(tmp_path: Path, report_inputs: dict) -> None:
    reports = tmp_path / "reports"
    first = new_run_folder(reports, "demo-step000200")
    second = new_run_folder(reports, "demo-step000200")
    assert first != second and first.is_dir() and second.is_dir()
    inputs = {k: v for k, v in report_inputs.items() if k not in ("gallery", "samples")}
    write_report(first, **inputs, gallery=[], samples=[])
    write_report(second, **{**inputs, "metrics": {"per_split": {"reasonseg/val": {"gIoU": 0.25, "cIoU": 0.125}}}},
                 gallery=[], samples=[])  # fmt: skip
    page = write_index(reports).read_text()
    rows = re.findall(r'<tr><td class="left"><a href="([^"]+)">', page)
    assert rows == [f"{second.name}/report.html", f"{first.name}/report.html"]  # newest first, both kept
    assert "<th colspan=\"2\">reasonseg/val</th>" in page and "refcoco/val" in page
    assert "<td>25.0</td><td>12.5</td>" in page and "<td>59.1</td><td>52.8</td>" in page
    assert page.count("<code>0123456789</code>") == 2 and f'href="{first.name}/viewer/index.html"' in page


def test_missing_parts_are_said_not_crashed(tmp_path: Path) -> None:
    md_path, html_path = write_report(tmp_path / "empty", title="Nothing yet", metrics={}, stage1={}, loss_curve=[],
                                      gallery=[], dialogue=None)  # fmt: skip
    md, page = md_path.read_text(), html_path.read_text()
    for text in ("No segmentation results.", "No reference answers", "No stage-1 summary.",
                 "No training steps recorded.", "No scored cases."):  # fmt: skip
        assert text in md and text in page
    assert not (tmp_path / "empty" / "report_files" / "loss_curve.png").exists()
    md_path, _ = write_report(tmp_path / "zero", title="t", metrics={}, stage1={}, loss_curve=[], gallery=[],
                              dialogue={"ROUGE-L": math.nan, "CIDEr": math.nan, "count": 0})  # fmt: skip
    assert "No reference answers" in md_path.read_text()


def test_segmentation_rows_tolerate_any_nesting() -> None:
    metrics = {"per_split": {"a/val": {"gIoU": 0.5, "by_query_kind": {"short": {"cIoU": 0.25}, "odd": {"x": 1}}},
                             "b/test": {"count": 3, "note": "text"}, "c": "not a dict"}, "gIoU": 0.9}  # fmt: skip
    rows = [(label, depth, scores.get("gIoU"), scores.get("cIoU"), scores.get("count")) for label, depth, scores in
            segmentation_rows(metrics)]  # fmt: skip
    assert rows == [("a/val", 0, 0.5, None, None), ("a/val · short", 1, None, 0.25, None), ("b/test", 0, None, None, 3)]


def test_select_cases_never_overlap() -> None:
    cases = [{"iou": v, "sample_id": str(i)} for i, v in enumerate([0.3, 0.9, 0.1, float("nan"), 0.5, None])]
    best, worst = select_cases(cases, per_side=4)
    assert [c["sample_id"] for c in best] == ["1", "4"] and [c["sample_id"] for c in worst] == ["2", "0"]
    best, worst = select_cases(cases, per_side=1)
    assert [c["sample_id"] for c in best] == ["1"] and [c["sample_id"] for c in worst] == ["2"]


# ----------------------------------------------------------------------------------------------- headless Chromium

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
    "--allow-file-access-from-files",
]  # fmt: skip

# Loads the report and a control page with a broken image in iframes; on load, writes what each document holds and
# every image's load status into <pre id="status"> as JSON, which --dump-dom returns.
PROBE_PAGE = """<!DOCTYPE html><html><body>
<iframe id="report" src="report/report.html" style="width:1200px;height:900px"></iframe>
<iframe id="control" src="control.html"></iframe>
<pre id="status">not loaded</pre>
<script>
window.addEventListener("load", () => {
  const result = {};
  for (const id of ["report", "control"]) {
    const doc = document.getElementById(id).contentDocument;
    result[id] = doc && {
      title: doc.title,
      headings: [...doc.querySelectorAll("h2")].map(h => h.textContent),
      text: doc.body.innerText.length,
      images: [...doc.images].map(img => ({src: img.getAttribute("src"), complete: img.complete,
        naturalWidth: img.naturalWidth, renderedWidth: img.getBoundingClientRect().width})),
    };
  }
  document.getElementById("status").textContent = JSON.stringify(result);
});
</script></body></html>
"""


def chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)
    if path is None:
        pytest.fail("Chromium is needed to render the HTML report and was not found (looked for `chromium` on PATH "
                    "and /usr/bin/chromium). Install it: apt-get update && apt-get install -y chromium "
                    "(`make test` does this).")  # fmt: skip
    return path


def run_chromium(args: list[str], profile: Path) -> str:
    done = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, f"chromium exited with {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


class _ImageSources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"] or "")


def test_html_renders_with_all_images_in_chromium(written_report: tuple[Path, Path], tmp_path: Path) -> None:
    # Move the folder away from where it was written: it must stand on its own.
    moved = tmp_path / "probe" / "report"
    shutil.copytree(written_report[1].parent, moved)
    (tmp_path / "probe" / "control.html").write_text('<!DOCTYPE html><img src="no-such-picture.png">')
    (tmp_path / "probe" / "probe.html").write_text(PROBE_PAGE)

    dom = run_chromium(["--dump-dom", (tmp_path / "probe" / "probe.html").as_uri()], tmp_path / "profile-dom")
    status = re.search(r'<pre id="status">(.*?)</pre>', dom, re.DOTALL)
    assert status, f"no status element in the dumped DOM: {dom[:500]}"
    result = json.loads(html.unescape(status.group(1)))  # --dump-dom serialises the text escaped

    report = result["report"]
    assert report is not None, "the report's document was not reachable from the probe page"
    assert report["title"] == "Demo run <b>report</b>"
    assert report["headings"] == ["Segmentation", "Dialogue quality (step-1 answers)", "Stage 1: MLLM reasoning",
                                  "Training", "Gallery", "Provenance"]  # fmt: skip
    assert report["text"] > 1000
    parser = _ImageSources()
    parser.feed((moved / "report.html").read_text())
    assert [img["src"] for img in report["images"]] == parser.sources and len(parser.sources) == 22
    broken = [img for img in report["images"] if not (img["complete"] and img["naturalWidth"] > 0)]
    assert not broken, f"images that did not load: {broken}"
    assert all(img["renderedWidth"] > 100 for img in report["images"]), report["images"]
    assert report["images"][0]["naturalWidth"] == report["images"][1]["naturalWidth"] == 880  # 8 in x 110 dpi
    # The probe tells a broken image from a loaded one.
    assert result["control"]["images"][0]["naturalWidth"] == 0

    shot = tmp_path / "report.png"
    run_chromium(["--window-size=1200,5200", f"--screenshot={shot}", (moved / "report.html").as_uri()],
                 tmp_path / "profile-shot")  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB"), np.int32)
    # the outlines' dark band: nothing else on the page (text #1d2330, grey demo photos) is this dark
    assert (pixels.max(axis=-1) <= 24).sum() > 1500, "ground-truth outlines not on screen"
    loss_blue = np.asarray((0x1F, 0x5F, 0xBF))
    assert (np.abs(pixels - loss_blue).max(axis=-1) <= 20).sum() > 200, "loss curve not on screen"
