"""The text-blind control: evaluate a checkpoint with every sample's text embedding taken from another image's sample.

A seeded derangement of the samples in which no sample keeps the text of its own image (two queries of one image name
the same target, so a plain derangement would leak it). Everything else (image, ground truth, model) is unchanged, so
the gap between the normal and the text-blind gIoU is what the text contributes to the mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stage2_segment.data import Stage2Dataset

TEXT_BLIND_SUFFIX = "-textblind"


def text_derangement(image_keys: Sequence[str], seed: int) -> np.ndarray:
    """A permutation ``p`` of ``range(len(image_keys))`` with ``image_keys[p[i]] != image_keys[i]`` for every i,
    drawn from ``seed``: sample i gets the text of sample p[i].

    Raises:
        ValueError: fewer than two images, or one image holding more than half the samples (no such permutation).
    """
    keys = np.asarray(list(image_keys), dtype=object)
    count = len(keys)
    _, sizes = np.unique(keys, return_counts=True) if count else (None, np.zeros(0, int))
    if count and (len(sizes) < 2 or sizes.max() * 2 > count):
        raise ValueError(
            f"text-blind evaluation needs samples of at least two images, none holding more than half of them "
            f"(got {count} samples of {len(sizes)} image(s), the largest holding {sizes.max()})"
        )
    rng = np.random.default_rng([seed, 7919])
    permutation = rng.permutation(count)
    for _ in range(100 * max(1, count)):
        clashes = np.flatnonzero(keys[permutation] == keys)
        if clashes.size == 0:
            return permutation
        i = int(clashes[0])
        j = int(rng.integers(count))
        # Swap the texts of i and j when that leaves both with another image's text.
        if keys[permutation[j]] != keys[i] and keys[permutation[i]] != keys[j]:
            permutation[i], permutation[j] = permutation[j], permutation[i]
    raise ValueError("text-blind evaluation: no derangement found")  # not reached for inputs that pass the check


class TextBlindDataset(Stage2Dataset):
    """A ``Stage2Dataset`` whose sample i carries the text embedding of sample ``permutation[i]`` (a
    ``text_derangement`` of the rows whose stage-1 status is ok)."""

    def __init__(self, dataset: Stage2Dataset, seed: int) -> None:
        super().__init__(dataset.index, dataset.data_root, dataset.image_size, dataset.store, dataset.image_cache_size)
        self.seed = seed
        # Only rows with a stage-1 text (status ok) give and take texts; error rows keep their own (never predicted).
        usable = np.array([status == "ok" for status in self.rows.get("status", ["ok"] * len(self))], bool)
        self.permutation = np.arange(len(self))
        members = np.flatnonzero(usable)
        keys = [self.rows["image_path"][i] for i in members]
        self.permutation[members] = members[text_derangement(keys, seed)]

    def text_embedding(self, i: int) -> np.ndarray:
        return super().text_embedding(int(self.permutation[i]))

    def info(self, i: int) -> dict:
        """Row i's columns, with ``target``/``attributes`` of the sample whose text it was given."""
        info = super().info(i)
        donor = int(self.permutation[i])
        info["target"], info["attributes"] = self.value("target", donor), self.value("attributes", donor)
        info["text_from"] = self.rows["sample_id"][donor]
        return info
