"""Stage-1 generation work saved by the simulated step 1 (paper Sec. 3.4) on refCOCO-format data.

Writes a refCOCO-format fixture (``refs(unc).p`` + COCO ``instances.json`` + JPEGs of drawn shapes, one referring phrase
per object), builds its manifest with the real adapter, then runs the chain of thought over the same samples twice on
one vLLM engine: ``stage1.step1_source.referring = "mllm"`` (both turns generated) and ``"template"`` (Q-A templates
for step 1; only the merged step-2/3 turn is generated). Reports generated tokens and generation seconds of each, as the
median of ``--rounds`` alternating rounds.

    .venv/bin/python bench/step1_templates.py --images 32
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import statistics
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logger = logging.getLogger("bench.step1_templates")

COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 200), "yellow": (240, 200, 30)}
COCO_DIR = "refer_seg/images/mscoco/images/train2014"


def write_refcoco_fixture(data_root: Path, images: int, seed: int = 0) -> None:
    """``images`` COCO-named JPEGs with 2-3 shapes each; one ref (one sentence) per shape, split "train"."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    coco_images, annotations, refs = [], [], []
    for image_id in range(1, images + 1):
        width, height = int(rng.integers(200, 480)), int(rng.integers(160, 360))
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        picture = Image.new("RGB", (width, height), (128, 128, 128))
        draw = ImageDraw.Draw(picture)
        for _ in range(int(rng.integers(2, 4))):
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            shape = ("circle", "square")[int(rng.integers(2))]
            x, y = int(rng.integers(0, width - 60)), int(rng.integers(0, height - 60))
            box = (x, y, x + 50, y + 50)
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
            ann_id = len(annotations) + 1
            side = "left" if x + 25 < width / 2 else "right"
            sentence = f"the {colour} {shape} on the {side}"
            polygon = [x, y, x + 50, y, x + 50, y + 50, x, y + 50]
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": 1, "segmentation": [polygon]})
            refs.append({
                "ref_id": ann_id, "ann_id": ann_id, "image_id": image_id, "split": "train", "category_id": 1,
                "file_name": file_name, "sent_ids": [ann_id],
                "sentences": [{"sent": sentence, "raw": sentence, "tokens": sentence.split(), "sent_id": ann_id}],
            })  # fmt: skip
        (data_root / COCO_DIR).mkdir(parents=True, exist_ok=True)
        picture.save(data_root / COCO_DIR / file_name, format="JPEG", quality=90)
        coco_images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
    folder = data_root / "refer_seg" / "refcoco"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "refs(unc).p").open("wb") as handle:
        pickle.dump(refs, handle, protocol=2)
    (folder / "instances.json").write_text(json.dumps(
        {"images": coco_images, "annotations": annotations, "categories": [{"id": 1, "name": "shape"}]}
    ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="pipeline.toml", type=Path)
    parser.add_argument("--work-dir", default=Path("work/bench_step1_templates"), type=Path)
    parser.add_argument("--images", default=32, type=int)
    parser.add_argument("--rounds", default=3, type=int)
    parser.add_argument("--out", type=Path, help="also write the summary as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import pyarrow.parquet as pq

    from manifests.registry import build_manifest
    from shared.config import load_config
    from stage1_reason.chain import run_chain_of_thought
    from stage1_reason.backends import make_generation_backend
    from stage1_reason.shard_phases import MANIFEST_COLUMNS, load_samples
    from stage1_reason.tiny_model import resolve_model

    work = args.work_dir.resolve()
    data_root = work / "data"
    write_refcoco_fixture(data_root, args.images)
    manifest = work / "refcoco-train.parquet"
    build_manifest("refcoco", data_root, "train", manifest)
    rows = pq.read_table(manifest, columns=MANIFEST_COLUMNS).sort_by("sample_id")
    base = [f"paths.data_root={json.dumps(str(data_root))}", f"paths.work_dir={json.dumps(str(work))}",
            "data.generate_demo=false"]
    configs = {
        source: load_config(args.config, overrides=[*base, f'stage1.step1_source={{ referring = "{source}" }}'])
        for source in ("mllm", "template")
    }
    config = configs["mllm"]
    s1 = config.stage1
    backend = make_generation_backend(config, resolve_model(s1.model, config.work_dir))
    samples = {source: load_samples(rows, cfg) for source, cfg in configs.items()}
    run_chain_of_thought(backend, samples["mllm"][:2], s1.cot_steps, s1.prompt_version)  # warm-up
    seconds: dict[str, list[float]] = {"mllm": [], "template": []}
    tokens: dict[str, int] = {}
    for _ in range(args.rounds):
        for source in ("mllm", "template"):
            started = time.perf_counter()
            outputs = run_chain_of_thought(backend, samples[source], s1.cot_steps, s1.prompt_version)
            seconds[source].append(time.perf_counter() - started)
            tokens[source] = sum(out.generated_tokens for out in outputs)
            errors = sum(out.status == "error" for out in outputs)
            if errors:
                raise SystemExit(f"{errors} error rows with step1_source {source}")
    backend.close()
    summary = {
        "model": s1.model, "samples": rows.num_rows, "cot_steps": s1.cot_steps, "max_new_tokens": s1.max_new_tokens,
        "rounds": args.rounds,
        "generated_tokens": tokens,
        "generate_seconds_median": {k: round(statistics.median(v), 3) for k, v in seconds.items()},
        "generate_seconds_all": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
    }
    med = summary["generate_seconds_median"]
    summary["tokens_saved"] = tokens["mllm"] - tokens["template"]
    summary["tokens_saved_percent"] = round(100 * summary["tokens_saved"] / tokens["mllm"], 1)
    summary["seconds_saved_percent"] = round(100 * (med["mllm"] - med["template"]) / med["mllm"], 1)
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
