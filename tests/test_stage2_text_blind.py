"""The text-blind control: the same checkpoint evaluated with every sample's text taken from another image.

On a reduced configuration (the committed mini SAM, frozen; stage-1 shards whose embeddings carry the words of each
row's reference answer, "It is the green circle. ...", as a stage 1 that names its target writes them) the trained
model must lose at least 0.25 gIoU when its text is deranged: the test that fails when text stops reaching the mask.
Measured on this configuration (2026-12-02): normal 0.375, text-blind 0.104, gap 0.272. With the query's words instead
(sentences name the target only through knowledge: "the colour of fresh grass") the same schedule gave a gap of 0.06.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stage2_segment.data import ShardStore, Stage2Dataset, build_index
from stage2_segment.text_blind import TextBlindDataset, text_derangement
from stage2_fixtures import stage2_world

ROOT = Path(__file__).resolve().parents[1]
MINI_SAM = ROOT / "weights" / "mini-sam" / "mini_sam.safetensors"


def test_derangement_never_keeps_a_text_of_the_same_image():
    keys = [f"image-{i // 2}" for i in range(11)]  # two queries per image, one image with one
    for seed in range(20):
        permutation = text_derangement(keys, seed)
        assert sorted(permutation.tolist()) == list(range(11))
        assert all(keys[j] != keys[i] for i, j in enumerate(permutation))
    assert text_derangement(keys, 3).tolist() == text_derangement(keys, 3).tolist()
    assert text_derangement(keys, 3).tolist() != text_derangement(keys, 4).tolist()
    with pytest.raises(ValueError, match="at least two images"):
        text_derangement(["a", "a", "a"], 0)
    with pytest.raises(ValueError, match="more than half"):
        text_derangement(["a", "a", "a", "b"], 0)


def test_text_blind_dataset_serves_another_images_text(tmp_path_factory):
    world = stage2_world(tmp_path_factory.mktemp("text-blind-data"), n_train=4, n_val=6)
    index = build_index(world.val_sources)
    dataset = Stage2Dataset(index, world.data_root, 160, ShardStore())
    blind = TextBlindDataset(dataset, seed=0)
    paths = dataset.rows["image_path"]
    for i in range(len(dataset)):
        donor = int(blind.permutation[i])
        assert paths[donor] != paths[i]
        assert np.array_equal(blind.text_embedding(i), dataset.text_embedding(donor))
        assert blind.info(i)["target"] == dataset.info(donor)["target"]
        assert np.array_equal(blind.gt_mask(i), dataset.gt_mask(i))


@pytest.mark.skipif(not MINI_SAM.is_file(), reason="weights/mini-sam/mini_sam.safetensors not committed yet")
def test_text_blind_control_loses_a_quarter_of_the_giou(tmp_path_factory, ray_cluster):
    from stage2_segment.evaluate import evaluate
    from stage2_segment.train import train

    world = stage2_world(tmp_path_factory.mktemp("text-blind"), n_train=48, n_val=16, text="reference")
    config = world.config(sam_variant="mini", sam_checkpoint=str(MINI_SAM), iterations=200, warmup_iterations=5,
                          global_batch=8, micro_batch=4, checkpoint_every=200, lr=3e-3, eval_batch=8)  # fmt: skip
    result = train(config, world.train_sources)
    normal = evaluate(config, world.val_sources, result.checkpoint_dir)
    blind = evaluate(config, world.val_sources, result.checkpoint_dir, text_blind=True)
    assert blind["name"] == normal["name"] + "-textblind"
    assert blind["text_blind_seed"] == config.stage2.seed and "text_blind_seed" not in normal
    for metrics in (normal, blind):  # two evaluations side by side, neither overwrote the other
        stored = json.loads((config.work_dir / "eval" / metrics["name"] / "metrics.json").read_text())
        assert stored["results"] == metrics["results"]
    normal_giou = normal["results"]["reasonseg/val"]["gIoU"]
    blind_giou = blind["results"]["reasonseg/val"]["gIoU"]
    assert blind["results"]["reasonseg/val"]["count"] == normal["results"]["reasonseg/val"]["count"] > 0
    gap = normal_giou - blind_giou
    assert gap >= 0.25, f"text-blind gap {gap:.3f} < 0.25 (gIoU normal {normal_giou:.3f}, text-blind {blind_giou:.3f})"
