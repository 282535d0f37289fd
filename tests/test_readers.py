"""A run folder as the ecosystem reads it: pandas, HF datasets, Ray Data and a glob see only final shards, mid-run
included; the README's "Reading the outputs" snippets run as written; the ragged embedding column pads for batching."""

from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared import shards
from shared.readers import collate_embeddings, pad_embeddings

REPO = Path(__file__).resolve().parents[1]
PLACEHOLDER = '"work/stage1/<run key>/reasonseg-val"'
DIM = 8
LENGTHS = [[3, 5, 1], [4, 2]]  # tokens per row, per shard


def shard_table(index: int, lengths: list[int]) -> pa.Table:
    schema = shards.shard_schema(DIM, {"llavaseg.run_key": "run-a"})
    ids = [f"reasonseg/val/img{index}_{row}/0" for row in range(len(lengths))]
    rng = np.random.default_rng(index)
    embeddings = [rng.standard_normal((n, DIM)).astype(np.float16) for n in lengths]
    columns = {field.name: [None] * len(ids) for field in schema}
    columns.update(sample_id=ids, status=["ok"] * len(ids), target=[f"the object {i}" for i in ids],
                   token_ids=[list(range(n)) for n in lengths])  # fmt: skip
    arrays = [
        shards.embeddings_to_arrow(embeddings, DIM) if f.name == "embedding" else pa.array(columns[f.name], type=f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


@pytest.fixture(scope="module")
def mid_run_folder(tmp_path_factory) -> Path:
    """Two done shards, plus what a writer at work leaves: a generation intermediate and a temporary file."""
    folder = tmp_path_factory.mktemp("run") / "reasonseg-val"
    for index, lengths in enumerate(LENGTHS):
        shards.write_shard(shard_table(index, lengths), folder / shards.shard_name(index), {})
    intermediate = shards.partial_path(folder / shards.shard_name(2), ".gen.parquet")
    intermediate.parent.mkdir(parents=True)
    pq.write_table(pa.table({"sample_id": ["half/done/0"]}), intermediate)
    pq.write_table(pa.table({"sample_id": ["being/written/0"]}), shards.temporary_path(folder / shards.shard_name(3)))
    return folder


def test_only_final_shards_end_in_parquet_outside_hidden_folders(mid_run_folder):
    visible = sorted(name for name in os.listdir(mid_run_folder) if not name.startswith("."))
    assert visible == ["00000.parquet", "00001.parquet"]
    assert [Path(p).name for p in sorted(glob.glob(str(mid_run_folder / "*.parquet")))] == visible
    assert shards.done_path(mid_run_folder / "00000.parquet").is_file()


def readme_snippets() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Reading the outputs\n", 1)[1].split("\n## ", 1)[0]
    blocks = [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]
    assert len(blocks) == 3
    for block in blocks:
        ast.parse(block)
        assert PLACEHOLDER in block
    return blocks


@pytest.mark.parametrize("which", ["pandas", "datasets", "ray"])
def test_readme_snippets_read_a_folder_mid_run(mid_run_folder, which, tmp_path):
    block = {"pandas": 0, "datasets": 1, "ray": 2}[which]
    code = readme_snippets()[block].replace(PLACEHOLDER, repr(str(mid_run_folder)))
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "hf"), RAY_DEDUP_LOGS="0")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if which == "pandas":
        assert lines == ["5 ['the object reasonseg/val/img0_0/0', 'the object reasonseg/val/img0_1/0'] float16 (3, 8)"]
    elif which == "datasets":
        assert lines == ["5 float16 (3, 8)"]
    else:  # Ray reads the two files in parallel: their order may vary
        (line,) = lines
        assert line.startswith("torch.float16 (5, 5, 8) [") and sorted(ast.literal_eval(line.split(") ", 1)[1])) == [
            1, 2, 3, 4, 5]  # fmt: skip


def test_pad_embeddings_accepts_every_readers_form():
    rng = np.random.default_rng(0)
    matrices = [rng.standard_normal((n, 4)).astype(np.float16) for n in (2, 0, 3)]
    arrow = shards.embeddings_to_arrow(matrices, 4)
    as_objects = np.empty(3, dtype=object)  # how pandas and Ray Data hand the column out
    for row, matrix in enumerate(matrices):
        cell = np.empty(len(matrix), dtype=object)
        for token, vector in enumerate(matrix):
            cell[token] = vector
        as_objects[row] = cell
    for cells in (matrices, arrow.to_pylist(), as_objects):
        padded, mask = pad_embeddings(cells)
        assert padded.dtype == np.float16 and padded.shape == (3, 3, 4)
        assert mask.sum(1).tolist() == [2, 0, 3]
        for row, matrix in enumerate(matrices):
            np.testing.assert_array_equal(padded[row, : len(matrix)], matrix)
            assert not padded[row, len(matrix):].any()
    padded, mask = pad_embeddings(matrices, max_tokens=2)
    assert padded.shape == (3, 2, 4) and mask.sum(1).tolist() == [2, 0, 2]
    with pytest.raises(ValueError, match=r"disagree on the embedding dim: \[4, 5\]"):
        pad_embeddings([matrices[0], np.zeros((1, 5), np.float16)])


def test_collate_embeddings_gives_torch_tensors():
    import torch

    batch = {"sample_id": np.array(["a", "b"], dtype=object), "seg_tokens": np.array([2, 1], np.int32),
             "embedding": [np.ones((2, 4), np.float16), np.ones((1, 4), np.float16)]}  # fmt: skip
    out = collate_embeddings(batch)
    assert out["embedding"].dtype == torch.float16 and tuple(out["embedding"].shape) == (2, 2, 4)
    assert out["embedding_mask"].tolist() == [[True, True], [True, False]]
    assert out["seg_tokens"].tolist() == [2, 1] and list(out["sample_id"]) == ["a", "b"]
