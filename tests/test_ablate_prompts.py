"""``llavaseg ablate --prompt-versions``: one row per stage-1 prompt version, beside the paper's Table 3 rows."""

from __future__ import annotations

from pathlib import Path

from llavaseg.ablate import ablation_markdown, plan_variants
from llavaseg.cli import parse_args
from shared.config import load_config

PIPELINE_TOML = Path(__file__).resolve().parents[1] / "pipeline.toml"


def test_prompt_version_rows_follow_the_baseline_steps() -> None:
    config = load_config(PIPELINE_TOML)
    variants = plan_variants(config, ["v1", "v2", "v1"])
    rows = [(v.label, v.overrides) for v in variants if v.table == "p"]
    assert rows == [
        ("prompt_version v1 (baseline)", ["stage1.cot_steps=3", "stage1.prompt_version=v1"]),
        ("prompt_version v2", ["stage1.cot_steps=3", "stage1.prompt_version=v2"]),
    ]
    steps = [(v.label, v.overrides) for v in variants if v.table == "a"]
    assert steps == [("step 1", ["stage1.cot_steps=1"]), ("steps 1+2", ["stage1.cot_steps=2"]),
                     ("steps 1+2+3", ["stage1.cot_steps=3"])]
    table = ablation_markdown(variants, ["reasonseg/val"], [])
    assert "## Prompt wording (stage1.prompt_version)" in table
    assert "| prompt_version v2 | – | – |  |  |" in table


def test_without_versions_there_is_no_prompt_table() -> None:
    variants = plan_variants(load_config(PIPELINE_TOML))
    assert [v for v in variants if v.table == "p"] == []
    assert "Prompt wording" not in ablation_markdown(variants, ["reasonseg/val"], [])
    assert parse_args(["ablate", "--prompt-versions", "v1", "v2"]).prompt_versions == ["v1", "v2"]
