"""End to end: the README's walkthrough commands on the default config (a smaller demo), as a user runs them.

``llavaseg run`` runs twice in subprocesses (the second reuses everything); ``evaluate``, ``infer``, ``train`` and
``segment`` run through the command line against the first run's outputs; ``segment`` is also checked in-process against
the batch pipeline's cached answer and prediction; ``ablate`` runs in-process with the session's engines.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_report import PROBE_PAGE, _ImageSources, run_chromium

REPO = Path(__file__).resolve().parents[1]
TRAIN_ITERATIONS = 10


def readme_walkthrough() -> dict[str, list[str]]:
    """subcommand -> argv (after ``llavaseg``) of each line of the README's walkthrough block."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("Walkthrough on the demo", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = {}
    for line in block.strip().splitlines():
        words = shlex.split(line, comments=True)
        assert words[0] == ".venv/bin/llavaseg", line
        commands[words[1]] = words[1:]
    return commands


def reduced_overrides(tiny_llava_dir: Path) -> list[str]:
    """The default config, smaller: fewer demo images, fewer training steps, the session's tiny LLaVA (the committed
    mini SAM stays)."""
    return [
        "data.demo_train_images=6",
        "data.demo_val_images=4",
        "stage1.shard_size=8",
        "stage1.max_embed_tokens=16",
        "stage1.max_new_tokens=48",
        f"stage1.model={tiny_llava_dir}",
        f"stage2.iterations={TRAIN_ITERATIONS}",
        "stage2.checkpoint_every=5",
    ]


@dataclass
class Project:
    root: Path  # a folder holding a copy of the repository's pipeline.toml; commands run here
    overrides: list[str]
    readme: dict[str, list[str]]
    first: subprocess.CompletedProcess
    second: subprocess.CompletedProcess
    mtimes_after_first: dict[str, float]

    @property
    def work(self) -> Path:
        return self.root / "work"

    def llavaseg(self, argv: list[str], *, expect: int = 0) -> subprocess.CompletedProcess:
        return llavaseg(self.root, argv + self.overrides, expect=expect)

    @property
    def checkpoint(self) -> Path:
        """The final checkpoint the first run printed ("stage 2: ... -> <folder>")."""
        return Path(re.search(r"^stage 2: .* -> (\S+)$", self.first.stdout, re.M).group(1))

    def argv(self, command: str) -> list[str]:
        name = self.checkpoint.parent.name
        return [word.replace("<name>", name) for word in self.readme[command]]


def llavaseg(cwd: Path, argv: list[str], *, expect: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "llavaseg.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == expect, f"llavaseg {' '.join(argv)} -> {done.returncode}\n{done.stdout[-4000:]}\n" \
                                      f"{done.stderr[-6000:]}"  # fmt: skip
    return done


def output_mtimes(work: Path) -> dict[str, float]:
    patterns = ["stage1/*/*/*.parquet", "stage2/*/final/*", "eval/*/metrics.json", "manifests/*.parquet"]
    return {str(p.relative_to(work)): p.stat().st_mtime for pattern in patterns for p in work.glob(pattern)}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_llava_dir) -> Project:
    root = tmp_path_factory.mktemp("project")
    shutil.copy(REPO / "pipeline.toml", root / "pipeline.toml")
    overrides = reduced_overrides(tiny_llava_dir)
    readme = readme_walkthrough()
    assert set(readme) == {"run", "status", "segment", "evaluate", "infer", "ablate"}
    first = llavaseg(root, readme["run"] + overrides)
    mtimes = output_mtimes(root / "work")
    second = llavaseg(root, readme["run"] + overrides)
    return Project(root, overrides, readme, first, second, mtimes)


def manifest_rows(project: Project, spec: str) -> int:
    return pq.read_metadata(project.work / "manifests" / f"{spec.replace('/', '-')}.parquet").num_rows


def report_dir(run: subprocess.CompletedProcess) -> Path:
    """The report folder a `llavaseg run` printed (each run gets its own under work/reports/)."""
    return Path(re.search(r"^report: (\S+) \(and report\.md\)$", run.stdout, re.M).group(1)).parent


def test_run_prints_a_summary_and_writes_a_report_with_its_pictures(project):
    out = project.first.stdout
    train_rows, val_rows = manifest_rows(project, "reasonseg/train"), manifest_rows(project, "reasonseg/val")
    assert f"stage 1: {train_rows + val_rows} new samples, 0 reused" in out
    assert f"stage 2: {TRAIN_ITERATIONS} new steps, trained to step {TRAIN_ITERATIONS}" in out
    assert re.search(r"reasonseg/val: gIoU \d+\.\d%  cIoU \d+\.\d%  \(\d+ samples\)", out), out
    assert "note: Smoke run on tiny randomly initialised models" in out
    report_html = report_dir(project.first) / "report.html"
    assert report_html.is_file() and report_html.parent.parent == project.work / "reports"
    assert report_dir(project.second) != report_dir(project.first)  # the second run's report did not replace it
    index = (project.work / "reports" / "index.html").read_text(encoding="utf-8")
    assert all(f'href="{report_dir(run).name}/report.html"' in index for run in (project.first, project.second))
    assert (report_html.parent / "viewer" / "index.html").is_file()

    console = project.first.stdout + project.first.stderr
    noise = re.findall(r".*(?:\bINFO\b|\bWARNING\b|vllm|VLLM|EngineCore|Triton|triton|Warning:|Traceback|\x1b\[|\r).*",
                       console)  # fmt: skip
    assert noise == [], noise[:10]  # vLLM, Ray, torch and Triton lines go to the log file, not to the console
    log_file = Path(re.search(r"^log: (\S+)$", project.first.stderr, re.M).group(1))
    assert log_file.parent == project.work / "logs" and "vllm" in log_file.read_text()

    md = (report_html.parent / "report.md").read_text(encoding="utf-8")
    for heading in ("## Segmentation", "## Dialogue quality", "## Stage 1: MLLM reasoning", "## Training", "## Gallery"):
        assert heading in md
    assert "| reasonseg/val |" in md and "No segmentation results" not in md
    assert f"{TRAIN_ITERATIONS} logged steps" in md
    parser = _ImageSources()
    parser.feed(report_html.read_text(encoding="utf-8"))
    assert "report_files/loss_curve.png" in parser.sources
    gallery = [src for src in parser.sources if "/gallery/" in src]
    assert len(gallery) >= 6 and len(gallery) % 3 == 0  # image, ground truth, prediction per case
    for src in parser.sources:
        with Image.open(report_html.parent / src) as picture:
            assert picture.size[0] > 10 and picture.size[1] > 10, src


def test_run_metrics_are_in_range_and_count_every_val_sample(project):
    (metrics_path,) = project.work.glob("eval/*/metrics.json")
    metrics = json.loads(metrics_path.read_text())
    scores = metrics["results"]["reasonseg/val"]
    assert 0.0 <= scores["gIoU"] <= 1.0 and 0.0 <= scores["cIoU"] <= 1.0
    assert scores["count"] == manifest_rows(project, "reasonseg/val")
    by_length = scores["by_query_length"]
    assert sum(part["count"] for part in by_length.values()) == scores["count"]
    assert metrics["step"] == TRAIN_ITERATIONS
    per_sample = [json.loads(line) for line in (metrics_path.parent / "per_sample.jsonl").read_text().splitlines()]
    assert np.mean([record["iou"] for record in per_sample]) == pytest.approx(scores["gIoU"], abs=1e-9)


def test_second_run_reuses_everything(project):
    out = project.second.stdout
    rows = manifest_rows(project, "reasonseg/train") + manifest_rows(project, "reasonseg/val")
    assert f"stage 1: 0 new samples, {rows} reused" in out
    assert f"stage 2: 0 new steps, reusing the checkpoint at step {TRAIN_ITERATIONS}" in out
    assert re.search(r"evaluation \S+: reused", out), out
    assert output_mtimes(project.work) == project.mtimes_after_first  # nothing rewritten
    first_scores = re.findall(r"reasonseg/val: gIoU .*", project.first.stdout)
    assert first_scores and re.findall(r"reasonseg/val: gIoU .*", out) == first_scores


def test_cli_train_evaluate_infer_on_the_run_outputs(project):
    trained = project.llavaseg(["train"])
    assert f"trained to step {TRAIN_ITERATIONS}" in trained.stdout

    (metrics_path,) = project.work.glob("eval/*/metrics.json")
    before = json.loads(metrics_path.read_text())
    evaluated = project.llavaseg(project.argv("evaluate"))
    assert (metrics_path.parent / "metrics.md").read_text() in evaluated.stdout  # the table, printed
    after = json.loads(metrics_path.read_text())
    assert after["results"] == before["results"] and after["sources"] == before["sources"]  # same checkpoint, same numbers

    inferred = project.llavaseg(project.argv("infer"))
    summary = json.loads(inferred.stdout[inferred.stdout.index("{") :])
    assert summary["ok"] == manifest_rows(project, "reasonseg/val") and summary["errors"] == 0
    from stage2_segment.rle import decode_mask

    table = pq.read_table(sorted((project.work / "predictions" / "reasonseg-val").glob("*.parquet")))
    per_sample = {json.loads(line)["sample_id"]: json.loads(line)
                  for line in next(project.work.glob("eval/*/per_sample.jsonl")).read_text().splitlines()}  # fmt: skip
    for row in table.to_pylist():
        mask = decode_mask(row["rle"])
        assert mask.shape == (row["height"], row["width"])
        assert int(mask.sum()) >= per_sample[row["sample_id"]]["intersection"]  # the evaluated prediction's pixels

    missing = project.llavaseg(["evaluate", "--checkpoint", str(project.root / "no-such-checkpoint")], expect=2)
    assert "no-such-checkpoint" in missing.stderr


def test_two_infer_jobs_at_once_write_each_prediction_once(project, tmp_path):
    """Two ``infer`` processes started together on one output folder (a retry beside a running job, or a job array
    started twice): both exit 0, every output shard is written once by one of them, and their summaries add up."""
    from shared.shards import done_path, list_shards

    out = tmp_path / "predictions"
    argv = [sys.executable, "-m", "llavaseg.cli", "infer", "--out", str(out), *project.overrides,
            'data.eval=["reasonseg/train", "reasonseg/val"]']  # 3 output shards: train 2, val 1 (shard_size 8)
    jobs = [subprocess.Popen(argv, cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]  # fmt: skip
    outputs = [job.communicate(timeout=900) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], [err[-3000:] for _, err in outputs]
    summaries = [json.loads(stdout[stdout.index("{"):]) for stdout, _ in outputs]
    shards = list_shards(out / "reasonseg-train") + list_shards(out / "reasonseg-val")
    assert len(shards) == 3 and all(done_path(path).is_file() for path in shards)
    ids = [sid for path in shards for sid in pq.read_table(path, columns=["sample_id"])["sample_id"].to_pylist()]
    expected = manifest_rows(project, "reasonseg/train") + manifest_rows(project, "reasonseg/val")
    assert len(ids) == len(set(ids)) == expected  # every sample once, none twice
    assert sum(s["shards_written"] for s in summaries) == 3 and sum(s["rows_written"] for s in summaries) == expected
    for summary in summaries:  # each job's own account: what it wrote + what the other wrote meanwhile + done before
        assert summary["shards_written"] + summary["shards_by_others"] + summary["shards_skipped"] == 3, summary
    from shared.leases import LEASE_SUFFIX
    from shared.shards import TMP_SUFFIX

    assert list(out.rglob(f"*{LEASE_SUFFIX}")) == [] and list(out.rglob(f"*{TMP_SUFFIX}")) == []  # nothing left held


def test_status_shows_what_the_run_made(project):
    out = project.llavaseg(project.argv("status")).stdout
    for spec in ("reasonseg/train", "reasonseg/val"):
        rows = manifest_rows(project, spec)
        shards = -(-rows // 8)  # stage1.shard_size=8
        assert re.search(rf"  {spec}: {rows} rows; stage 1 {shards}/{shards} shards done \({rows} rows, 0 errors, "
                         rf"\d+ parse fallbacks\)", out), out  # fmt: skip
    name = project.checkpoint.parent.name
    assert f"  {name}: step {TRAIN_ITERATIONS}/{TRAIN_ITERATIONS}, final checkpoint exported" in out
    assert re.search(r"evaluations:\n  \S+: reasonseg/val gIoU \d+\.\d cIoU \d+\.\d", out), out


def test_segment_command_writes_a_mask_of_the_image_size(project):
    argv = project.argv("segment")
    image_path = project.root / argv[argv.index("--image") + 1]
    done = project.llavaseg(argv)
    out = done.stdout
    for label in ("answer: ", "target: ", "attributes: ", "mask written to ", "overlay written to "):
        assert label in out, out
    mask_path = Path(re.search(r"mask written to (.+)", out).group(1))
    overlay_path = Path(re.search(r"overlay written to (.+)", out).group(1))
    with Image.open(image_path) as image, Image.open(mask_path) as mask, Image.open(overlay_path) as overlay:
        assert mask.size == image.size == overlay.size
        assert mask.mode == "L" and set(np.unique(np.asarray(mask))) <= {0, 255}


def test_segment_errors_are_clear_and_fail_before_loading_the_mllm(project, tmp_path):
    image = project.root / project.argv("segment")[2]
    missing = project.llavaseg(["segment", "--image", str(image), "--query", "x", "--checkpoint", str(tmp_path / "none")],
                               expect=2)  # fmt: skip
    assert "checkpoint folder" in missing.stderr and "none" in missing.stderr
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(image.read_bytes()[:200])
    unreadable = project.llavaseg(["segment", "--image", str(broken), "--query", "x"], expect=2)
    assert "broken.jpg" in unreadable.stderr
    overrides = [o if not o.startswith("stage1.model=") else "stage1.model=/no/such/model" for o in project.overrides]
    no_model = llavaseg(project.root, ["segment", "--image", str(image), "--query", "x", *overrides], expect=2)
    assert "/no/such/model" in no_model.stderr


def test_segment_equals_the_batch_pipeline_for_a_val_sample(project, vllm_generation_engine, vllm_pooling_engine):
    """One image + query through ``segment`` gives the answer stage 1 cached and the mask ``infer`` predicted."""
    from llavaseg.segment import segment_image
    from shared.config import load_config
    from shared.shards import read_shards
    from stage2_segment.rle import decode_mask

    config = load_config(project.root / "pipeline.toml", None, project.overrides)
    manifest = pq.read_table(project.work / "manifests" / "reasonseg-val.parquet").to_pylist()
    (shard_dir,) = project.work.glob("stage1/*/reasonseg-val")
    cached = {row["sample_id"]: row for row in read_shards(shard_dir).to_pylist()}
    predictions_dir = project.work / "predictions" / "reasonseg-val"
    if not predictions_dir.is_dir():
        project.llavaseg(project.argv("infer"))
    predicted = {row["sample_id"]: row for row in pq.read_table(sorted(predictions_dir.glob("*.parquet"))).to_pylist()}
    sample = next(row for row in manifest if cached[row["sample_id"]]["status"] == "ok")
    result = segment_image(
        config, config.data_root / sample["image_path"], sample["query"], out_dir=project.root / "single",
        query_kind=sample["query_kind"], backend=vllm_generation_engine, embedder=vllm_pooling_engine,
    )  # fmt: skip
    stage1 = cached[sample["sample_id"]]
    assert (result.reason_answer, result.target, result.attributes) == (
        stage1["reason_answer"], stage1["target"], stage1["attributes"])  # fmt: skip
    with Image.open(result.mask_path) as picture:
        mask = np.asarray(picture) > 0
    batch = decode_mask(predicted[sample["sample_id"]]["rle"]).astype(bool)
    assert mask.shape == batch.shape
    assert (mask != batch).mean() < 1e-3  # float16 embeddings through another batch shape: at most a few edge pixels


def test_ablate_writes_the_table_and_reuses_the_baseline(project, vllm_generation_engine, vllm_pooling_engine,
                                                         ray_cluster):  # fmt: skip
    from llavaseg.ablate import run_ablation
    from llavaseg.cli import parse_args

    args = parse_args([*project.argv("ablate"), *project.overrides])
    assert args.func.__name__ == "cmd_ablate"
    path, variants = run_ablation(project.root / args.config, args.profile, args.overrides,
                                  vllm_generation_engine, vllm_pooling_engine)  # fmt: skip
    table = path.read_text(encoding="utf-8")
    assert "Smoke run on tiny randomly initialised models" in table
    rows = {(v.table, v.label): v for v in variants}
    assert len(rows) == len(variants) == 7
    nors = rows[("d", "without ReasonSeg (nors)")]
    assert nors.skipped and "skipped" in table  # the demo trains on ReasonSeg alone
    baseline_train = project.checkpoint.parent.name
    ran = [v for v in variants if not v.skipped]
    assert {v.result["train_name"] for v in ran if v.label in ("steps 1+2+3", "with ReasonSeg")} == {baseline_train}
    assert len({v.result["train_name"] for v in ran}) == 4  # cot 1, cot 2, single-scale, and the shared baseline
    assert len({v.result["stage1_run_key"] for v in ran}) == 3  # cot steps 1, 2, 3
    for v in ran:
        scores = v.result["results"]["reasonseg/val"]
        assert 0.0 <= scores["gIoU"] <= 1.0 and 0.0 <= scores["cIoU"] <= 1.0
        assert re.search(rf"\| {re.escape(v.label)} \| {100 * scores['gIoU']:.1f} \| {100 * scores['cIoU']:.1f} \|", table)


def test_run_report_renders_with_its_images_in_chromium(project, tmp_path):
    import html

    probe = tmp_path / "probe"
    shutil.copytree(report_dir(project.first), probe / "report")
    (probe / "control.html").write_text('<!DOCTYPE html><img src="no-such-picture.png">')
    (probe / "probe.html").write_text(PROBE_PAGE)
    dom = run_chromium(["--dump-dom", (probe / "probe.html").as_uri()], tmp_path / "profile")
    status = re.search(r'<pre id="status">(.*?)</pre>', dom, re.DOTALL)
    assert status, dom[:500]
    report = json.loads(html.unescape(status.group(1)))["report"]
    assert report["headings"] == ["Segmentation", "Dialogue quality (step-1 answers)", "Stage 1: MLLM reasoning",
                                  "Training", "Gallery", "Provenance"]  # fmt: skip
    assert len(report["images"]) >= 7  # the loss plot and at least two gallery cases of three pictures
    broken = [img for img in report["images"] if not (img["complete"] and img["naturalWidth"] > 0)]
    assert not broken, broken
