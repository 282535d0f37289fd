"""Checkpoints edited by hand: every damage is refused with an error naming the file and the key, and a checkpoint
naming a SAM variant whose frozen weights are missing is refused instead of being run with random weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.config import PipelineConfig
from stage2_segment.checkpoint import META_FILE, WEIGHTS_FILE, CheckpointError, load_trained_model, write_checkpoint
from stage2_segment.modeling import build_adapted_sam

MODEL_ARGS = ("variant", "llm_dim", "adapter_blocks", "projector_hidden_dim", "seed")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = build_adapted_sam("tiny", 32, seed=0)
    meta = {"train_name": "edited", "step": 3, "model": {key: model.build_args[key] for key in MODEL_ARGS},
            "sam_checkpoint": None}  # fmt: skip
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "final", model, meta, PipelineConfig())


def _copy(checkpoint, tmp_path):
    return shutil.copytree(checkpoint, tmp_path / "edited")


def _edit_meta(folder, edit):
    meta = json.loads((folder / META_FILE).read_text())
    edit(meta)
    (folder / META_FILE).write_text(json.dumps(meta))


def test_the_untouched_checkpoint_loads(checkpoint):
    model, meta = load_trained_model(checkpoint)
    assert meta["step"] == 3 and model.image_size == 256


def test_checkpoint_json_without_model_names_the_file_and_key(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    _edit_meta(folder, lambda meta: meta.pop("model"))
    with pytest.raises(CheckpointError) as err:
        load_trained_model(folder)
    assert str(err.value) == f"{folder / META_FILE}: key model is missing, expected dict"


def test_a_model_key_of_the_wrong_type_is_named(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    _edit_meta(folder, lambda meta: meta["model"].update(llm_dim="32"))
    with pytest.raises(CheckpointError, match=r"checkpoint.json: key model.llm_dim is '32', expected int"):
        load_trained_model(folder)


def test_torn_checkpoint_json_names_the_file(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    text = (folder / META_FILE).read_text()
    (folder / META_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError) as err:
        load_trained_model(folder)
    assert str(err.value).startswith(f"{folder / META_FILE}: not valid JSON (")


def test_weights_of_another_model_name_the_file_and_the_keys(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    state = load_file(str(folder / WEIGHTS_FILE))
    dropped = sorted(key for key in state if key.startswith("projector."))[0]
    state.pop(dropped)
    state["projector.fc1.weight"] = torch.zeros(3, 3)
    save_file(state, str(folder / WEIGHTS_FILE))
    with pytest.raises(CheckpointError) as err:
        load_trained_model(folder)
    text = str(err.value)
    assert text.startswith(f"{folder / WEIGHTS_FILE}: does not match the model in checkpoint.json")
    assert dropped in text and "projector.fc1.weight (checkpoint (3, 3)" in text


def test_truncated_weights_name_the_file(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE}: unreadable trained weights"):
        load_trained_model(folder)


def test_a_sam_variant_without_its_frozen_weights_is_refused(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    _edit_meta(folder, lambda meta: meta["model"].update(variant="vit_b"))  # sam_checkpoint stays null
    with pytest.raises(CheckpointError) as err:
        load_trained_model(folder)
    assert "key sam_checkpoint is None, but model.variant 'vit_b' needs its frozen SAM weights" in str(err.value)
    gone = {"path": str(tmp_path / "sam_vit_b.pth"), "sha256": "0" * 64}
    _edit_meta(folder, lambda meta: meta.update(sam_checkpoint=gone))
    with pytest.raises(CheckpointError, match=r"frozen SAM weights this checkpoint was trained with are missing"):
        load_trained_model(folder)
    with pytest.raises(CheckpointError, match=r"checkpoint.json: the frozen SAM weights it names are missing"):
        load_trained_model(folder, verify_sam=False)
