"""Prompted mIoU of the committed mini SAM: tight-box and one-point prompts on every object of demo scenes.

Scored at the original image resolution (logits > 0), like stage 2. Two scene sets: the demo world's val split (seed 0,
the scenes stage 2 evaluates on) and fresh scenes of a seed that neither the pretraining nor the tests use.

    .venv/bin/python bench/mini_sam.py                                   # weights/mini-sam/mini_sam.safetensors
    .venv/bin/python bench/mini_sam.py --val-scenes 200 --fresh-seed 9001 --fresh-scenes 200
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from manifests.demo import generate_demo_dataset
from stage2_segment.mini_sam import WEIGHTS_FILE, load_mini_parts, load_objects, prompt_miou
from stage2_segment.modeling import get_variant

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(ROOT / "weights" / "mini-sam" / WEIGHTS_FILE))
    parser.add_argument("--val-scenes", type=int, default=100, help="scenes of the demo val split (seed 0)")
    parser.add_argument("--fresh-seed", type=int, default=9001, help="demo seed of the fresh scenes")
    parser.add_argument("--fresh-scenes", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    parts = load_mini_parts(Path(args.weights))
    image_size = get_variant("mini").image_size
    results = {"weights": args.weights}
    with tempfile.TemporaryDirectory() as temporary:
        for name, seed, count in (("val", 0, args.val_scenes), ("fresh", args.fresh_seed, args.fresh_scenes)):
            started = time.perf_counter()
            root = generate_demo_dataset(Path(temporary) / name, n_train=0, n_val=count, seed=seed)
            figures = prompt_miou(parts, load_objects(root / "val", image_size), image_size, seed=0)
            results[f"{name} (seed {seed}, {count} scenes)"] = {
                **{key: round(value, 4) for key, value in figures.items()}, "seconds": round(time.perf_counter() - started, 1)
            }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
