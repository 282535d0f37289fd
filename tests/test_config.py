"""pipeline.toml -> frozen dataclasses: profiles, overrides, every error at once."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest

from shared.config import ConfigError, PipelineConfig, load_config, parse_override, profile_names

REPO = Path(__file__).resolve().parents[1]
PIPELINE_TOML = REPO / "pipeline.toml"


# The embedded demo runs the committed mini models on a larger demo; the code's defaults keep the random tiny models
# that mechanical tests build on. Every other key is the same in both.
MINI_WORLD_KEYS = {
    "data": {"demo_train_images": 400, "demo_val_images": 64},
    "stage1": {"model": "mini-llava", "max_new_tokens": 96, "max_embed_tokens": 96, "kv_cache_tokens": 32768,
               "engine_in_process": True},
    "stage2": {"sam_variant": "mini", "sam_checkpoint": "mini-sam", "lr": 1e-3, "grad_clip_norm": 1.0,
               "iterations": 600, "checkpoint_every": 200},
}  # fmt: skip


def test_embedded_default_is_the_mini_world_over_the_dataclass_defaults():
    """The file's top-level sections are the embedded demo: the code's defaults with the mini world's keys."""
    config = load_config(PIPELINE_TOML)
    defaults = PipelineConfig()
    for section in ("paths", "data", "stage1", "stage2", "ray"):
        expected = dataclasses.replace(getattr(defaults, section), **MINI_WORLD_KEYS.get(section, {}))
        assert getattr(config, section) == expected, section
    assert (defaults.stage1.model, defaults.stage2.sam_variant) == ("tiny-llava", "tiny")
    assert config.data_root == REPO / "work" / "demo_data"


@pytest.mark.parametrize("profile", profile_names(PIPELINE_TOML))
def test_every_profile_validates(profile):
    config = load_config(PIPELINE_TOML, profile=profile, check_paths=False)
    assert config.profile == profile
    assert config.stage2.sam_variant == "vit_h"
    assert config.stage2.global_batch == 160 and config.stage2.iterations == 12000
    assert config.stage2.lr == 1e-4 and config.stage2.weight_decay == 1e-4
    assert (config.stage2.bce_weight, config.stage2.dice_weight) == (1.0, 0.5)
    assert config.stage2.precision == "bf16"
    assert "reasonseg/train" in config.data.train and "refcocog/train" in config.data.train


def test_paper_13b_profile_names_missing_weights_and_data(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(PIPELINE_TOML, profile="paper-13b")
    text = str(err.value)
    assert "stage2.sam_checkpoint: file not found" in text and "sam_vit_h_4b8939.pth" in text
    assert "paths.data_root: folder not found" in text
    assert load_config(PIPELINE_TOML, profile="paper-13b", check_paths=False).stage1.model == "llava-hf/llava-1.5-13b-hf"


def test_all_errors_reported_at_once(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        """
[stage1]
modle = "x"
max_new_tokens = "many"
cot_steps = 4
[stage2]
lr = true
sam_variant = "vit_h"
sam_checkpoint = "nowhere/sam.pth"
[extra]
a = 1
"""
    )
    with pytest.raises(ConfigError) as err:
        load_config(bad, profile="nope")
    problems = err.value.problems
    joined = "\n".join(problems)
    assert "stage1.modle: unknown key (did you mean 'model'?)" in joined
    assert "stage1.max_new_tokens: expected int, got str ('many')" in joined
    assert "stage1.cot_steps: 4 is not one of 1, 2, 3" in joined
    assert "stage2.lr: expected float, got bool (True)" in joined
    assert "stage2.sam_checkpoint: file not found" in joined and "nowhere/sam.pth" in joined
    assert "extra: unknown section" in joined
    assert "profiles.nope: no such profile" in joined
    assert len(problems) == 7, problems


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.toml")


def test_missing_local_model_path(tmp_path):
    with pytest.raises(ConfigError, match=r"stage1.model: local model path not found: .*/models/llava-x"):
        load_config(PIPELINE_TOML, overrides=["stage1.model=./models/llava-x"])


def test_overrides_are_typed_and_checked():
    config = load_config(PIPELINE_TOML, overrides=["stage2.lr=3e-4", "stage1.cot_steps=2", 'data.train=["refcoco/train"]',
                                                   "stage1.model=llava-hf/llava-1.5-7b-hf", "stage2.adapter_blocks=[1]"])
    assert config.stage2.lr == 3e-4
    assert config.stage1.cot_steps == 2
    assert config.data.train == ["refcoco/train"]
    assert config.stage1.model == "llava-hf/llava-1.5-7b-hf"
    assert config.stage2.adapter_blocks == [1]
    assert parse_override("stage1.prompt_version=v2") == (["stage1", "prompt_version"], "v2")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(PIPELINE_TOML, overrides=["stage2.lr"])
    with pytest.raises(ConfigError, match="stage2.iterations: expected int, got float"):
        load_config(PIPELINE_TOML, overrides=["stage2.iterations=1.5"])
    with pytest.raises(ConfigError, match=r"data.train: 'refcoco' is not '<dataset>/<split>'"):
        load_config(PIPELINE_TOML, overrides=['data.train=["refcoco"]'])


def test_config_is_frozen_and_written_resolved(tmp_path):
    config = load_config(PIPELINE_TOML, overrides=["stage2.lr=2e-4"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.stage2.lr = 1.0  # type: ignore[misc]
    path = config.write_resolved(tmp_path)
    resolved = json.loads(path.read_text())
    assert resolved["stage2"]["lr"] == 2e-4
    assert resolved["stage1"]["model"] == "mini-llava"


def test_pipeline_toml_parses_as_plain_toml():
    raw = tomllib.loads(PIPELINE_TOML.read_text())
    assert set(raw) == {"paths", "data", "stage1", "stage2", "ray", "profiles"}


def test_optimizer_keys_default_to_torch_and_the_paper_profiles_take_lisas():
    demo = load_config(PIPELINE_TOML)
    assert demo.stage2.adam_betas == PipelineConfig().stage2.adam_betas == [0.9, 0.999]  # torch's AdamW
    assert (PipelineConfig().stage2.grad_clip_norm, demo.stage2.grad_clip_norm) == (0.0, 1.0)  # the demo clips
    for profile in ("paper-13b", "paper-7b"):
        paper = load_config(PIPELINE_TOML, profile=profile, check_paths=False)
        assert (paper.stage2.adam_betas, paper.stage2.grad_clip_norm) == ([0.9, 0.95], 1.0), profile


def test_values_that_cannot_work_are_all_named_at_load():
    overrides = [
        "stage2.lr=nan", "stage2.adapter_blocks=[1, 99]", "stage2.keep_checkpoints=-1", "ray.cpus_per_worker=0",
        "stage1.gpu_memory_utilization=1.5", "data.sample_rates={semantic = -1.0, reasoning = 1.0}",
        "paths.work_dir=gs://bucket/work", "paths.data_root=s3://bucket/data", "stage2.adam_betas=[0.9]",
        "stage2.grad_clip_norm=-1.0", "stage2.bce_weight=inf",
    ]  # fmt: skip
    with pytest.raises(ConfigError) as err:
        load_config(PIPELINE_TOML, overrides=overrides)
    assert err.value.problems == [
        "stage2.lr: must be a finite number > 0, got nan",
        "stage2.bce_weight: must be a finite number >= 0, got inf",
        "stage2.grad_clip_norm: must be a finite number >= 0, got -1.0",
        "stage2.adam_betas: must be two numbers in [0, 1) (beta1, beta2), got [0.9]",
        "stage2.keep_checkpoints: must be >= 0 (0 keeps them all), got -1",
        "stage2.adapter_blocks: [99] outside the mini encoder's blocks 0..3",
        "ray.cpus_per_worker: must be >= 1, got 0",
        "stage1.gpu_memory_utilization: must be in (0, 1], got 1.5",
        "data.sample_rates.semantic: must be a finite number >= 0, got -1.0",
        "paths.data_root: 's3://bucket/data' is a s3:// URI; it takes local (or mounted) folders",
        "paths.work_dir: 'gs://bucket/work' is a gs:// URI; it takes s3:// URIs or local (or mounted) folders",
    ]
    with pytest.raises(ConfigError) as err:
        load_config(PIPELINE_TOML, overrides=["paths.work_dir=s3://", "ray.storage_path=ftp://host/x"])
    assert err.value.problems == [
        "paths.work_dir: 's3://' names no bucket",
        "ray.storage_path: 'ftp://host/x' is a ftp:// URI; it takes s3:// or gs:// URIs or local (or mounted) folders",
    ]
    assert load_config(PIPELINE_TOML, overrides=["paths.work_dir=s3://bucket/work", "stage1.use_ray=true"]).stage1.use_ray
    s3 = load_config(PIPELINE_TOML, overrides=["paths.work_dir=s3://bucket/work", "paths.mirror_dir=m"])
    assert s3.work_store.url(s3.work_dir / "a/b.json") == "s3://bucket/work/a/b.json"
    assert s3.work_dir == PIPELINE_TOML.parent.resolve() / "m"
    for bad in ("stage2.lr=-1e-4", "stage2.lr=inf", "stage2.lr=0.0"):
        with pytest.raises(ConfigError, match=r"stage2.lr: must be a finite number > 0"):
            load_config(PIPELINE_TOML, overrides=[bad])
    with pytest.raises(ConfigError, match=r"stage2.adapter_blocks: \[12\] outside the vit_b encoder's blocks 0..11"):
        load_config(PIPELINE_TOML, overrides=['stage2.sam_variant="vit_b"', "stage2.adapter_blocks=[11, 12]"],
                    check_paths=False)  # fmt: skip
    assert load_config(PIPELINE_TOML, overrides=["stage1.gpu_memory_utilization=1.0", "stage2.keep_checkpoints=0"])


def test_encoder_depths_known_to_the_config_match_the_sam_registry():
    from shared.config_values import SAM_ENCODER_DEPTHS
    from stage2_segment.modeling.build import SAM_VARIANTS

    assert SAM_ENCODER_DEPTHS == {name: variant.encoder_depth for name, variant in SAM_VARIANTS.items()}


def test_engine_restart_settings_are_checked_at_load():
    with pytest.raises(ConfigError) as err:
        load_config(PIPELINE_TOML, overrides=["stage1.engine_restarts=-1", "stage1.engine_stall_timeout_s=nan"])
    assert err.value.problems == [
        "stage1.engine_restarts: must be >= 0, got -1",
        "stage1.engine_stall_timeout_s: must be a finite number >= 0 (0 = off), got nan",
    ]
    config = load_config(PIPELINE_TOML, overrides=["stage1.engine_restarts=0", "stage1.engine_stall_timeout_s=0"])
    assert (config.stage1.engine_restarts, config.stage1.engine_stall_timeout_s) == (0, 0.0)
