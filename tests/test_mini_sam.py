"""The mini SAM: its promptable pretraining learns, the committed weights match their hashes and still segment
the demo world's objects from a box, and stage 2 loads them frozen, tensor for tensor."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from manifests.demo import generate_demo_dataset
from shared.config import ConfigError, load_config
from stage2_segment.mini_sam import INFO_FILE, WEIGHTS_FILE, build_mini_sam, load_mini_parts, load_objects, prompt_miou
from stage2_segment.modeling import build_adapted_sam, get_variant

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights"
MINI_SAM = WEIGHTS / "mini-sam" / WEIGHTS_FILE


def test_first_pretraining_steps_make_the_loss_fall(tmp_path):
    torch.set_num_threads(1)
    result = build_mini_sam(tmp_path / "mini-sam", seed=3, steps=24, progress=False, train_scenes=40, val_scenes=3,
                            scenes_dir=tmp_path / "scenes")  # fmt: skip
    losses = [record["loss"] for record in result["losses"]]
    assert len(losses) == 24 and [record["step"] for record in result["losses"]] == list(range(1, 25))
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.9 * first, f"loss did not fall: first steps {losses[:4]}, last steps {losses[-4:]}"
    assert result["train_objects"] == 40 and result["val_objects"] == 3
    assert 0.0 <= result["box_miou"] <= 1.0 and 0.0 <= result["point_miou"] <= 1.0
    # The file is a SAM checkpoint of the mini variant: stage 2 builds on it.
    model = build_adapted_sam("mini", llm_dim=32, sam_checkpoint=tmp_path / "mini-sam" / WEIGHTS_FILE)
    assert model.image_size == get_variant("mini").image_size
    assert (tmp_path / "mini-sam" / INFO_FILE).is_file()


def test_pretraining_is_deterministic_for_a_seed(tmp_path):
    torch.set_num_threads(1)
    digests = []
    for run, seed in enumerate((1, 1, 2)):
        build_mini_sam(tmp_path / f"run{run}", seed=seed, steps=2, progress=False, train_scenes=12, val_scenes=2,
                       scenes_dir=tmp_path / "scenes")  # fmt: skip
        digests.append(hashlib.sha256((tmp_path / f"run{run}" / WEIGHTS_FILE).read_bytes()).hexdigest())
    assert digests[0] == digests[1] != digests[2]


def _sums() -> dict[str, str]:
    lines = (WEIGHTS / "SHA256SUMS").read_text(encoding="utf-8").splitlines()
    return {name.strip(): digest for digest, name in (line.split(maxsplit=1) for line in lines if line.strip())}


def test_committed_weights_match_their_hashes():
    sums = _sums()
    assert f"mini-sam/{WEIGHTS_FILE}" in sums and f"mini-sam/{INFO_FILE}" in sums
    for name, digest in sums.items():
        path = WEIGHTS / name
        assert path.is_file(), f"{name} is listed in weights/SHA256SUMS but missing"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{name}: sha256 differs from SHA256SUMS"
    assert MINI_SAM.stat().st_size < 8 * 2**20


def test_committed_mini_sam_segments_val_objects_from_a_box(tmp_path):
    torch.set_num_threads(1)
    root = generate_demo_dataset(tmp_path, n_train=0, n_val=24, seed=0)
    image_size = get_variant("mini").image_size
    figures = prompt_miou(load_mini_parts(MINI_SAM), load_objects(root / "val", image_size), image_size, seed=0)
    assert figures["val_objects"] == 24
    assert figures["box_miou"] >= 0.85


def test_stage2_model_with_the_mini_checkpoint_keeps_the_file_frozen():
    model = build_adapted_sam("mini", llm_dim=64, sam_checkpoint=MINI_SAM, seed=5)
    state = load_file(str(MINI_SAM))
    model_state = model.state_dict()
    assert {key for key in model_state if key.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder."))} == set(
        state
    )
    for key, tensor in state.items():
        assert torch.equal(model_state[key], tensor), key
    frozen = [name for name, p in model.named_parameters() if name.startswith(("image_encoder.", "prompt_encoder."))]
    assert frozen and not any(p.requires_grad for name, p in model.named_parameters() if name in frozen)
    trained = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {"projector", "adapters", "mask_decoder"}
    assert model.adapter_blocks == list(get_variant("mini").encoder_global_attn_indexes)


def test_config_takes_the_mini_variant_with_its_checkpoint_only(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "mini_sam.safetensors").write_bytes(MINI_SAM.read_bytes())
    toml = tmp_path / "pipeline.toml"
    toml.write_text('[stage2]\nsam_variant = "mini"\nsam_checkpoint = "weights/mini_sam.safetensors"\n')
    config = load_config(toml)
    assert (config.stage2.sam_variant, config.stage2.sam_checkpoint) == ("mini", "weights/mini_sam.safetensors")
    with pytest.raises(ConfigError, match="stage2.sam_checkpoint: required for sam_variant 'mini'"):
        load_config(toml, overrides=['stage2.sam_checkpoint=""'])


def test_the_name_mini_sam_resolves_to_the_committed_weights_from_any_config_folder(tmp_path):
    from stage2_segment.train import sam_checkpoint_path

    toml = tmp_path / "elsewhere" / "pipeline.toml"
    toml.parent.mkdir()
    toml.write_text('[stage2]\nsam_variant = "mini"\nsam_checkpoint = "mini-sam"\n')
    config = load_config(toml)
    assert sam_checkpoint_path(config) == MINI_SAM.resolve()
    assert sam_checkpoint_path(load_config(toml, overrides=["stage2.sam_checkpoint=w/x.pth"], check_paths=False)) == (
        toml.parent / "w" / "x.pth"
    )
    with pytest.raises(ConfigError, match="stage2.sam_checkpoint: file not found: .*mini-sammy"):
        load_config(toml, overrides=["stage2.sam_checkpoint=mini-sammy"])


def test_sha256sums_update_replaces_only_the_rebuilt_folder(tmp_path):
    from llavaseg.mini_models import read_sums, update_sums

    (tmp_path / "mini-sam").mkdir()
    (tmp_path / "mini-sam" / "a.bin").write_bytes(b"new")
    (tmp_path / "SHA256SUMS").write_text("0" * 64 + "  mini-llava/model.safetensors\n" + "1" * 64 + "  mini-sam/old.bin\n")
    sums = update_sums(tmp_path, ["mini-sam"])
    assert sums == read_sums(tmp_path / "SHA256SUMS")
    assert sums == {"mini-llava/model.safetensors": "0" * 64, "mini-sam/a.bin": hashlib.sha256(b"new").hexdigest()}
