"""bench/gpu_projection.py: the FLOP arithmetic against hand counts, and the projection's orderings (no weights)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "gpu_projection.py"
_spec = importlib.util.spec_from_file_location("gpu_projection", _PATH)
gpu_projection = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("gpu_projection", gpu_projection)  # dataclasses look their module up
_spec.loader.exec_module(gpu_projection)


@pytest.fixture(scope="module")
def shapes():
    from stage1_reason.llava_shapes import llava_config

    return {name: gpu_projection.shape_from_config(llava_config(name)) for name in ("llava-1.5-7b", "llava-1.5-13b")}


@pytest.fixture(scope="module")
def projections():
    return {name: gpu_projection.project(name) for name in ("llava-1.5-7b", "llava-1.5-13b")}


def test_shapes_come_from_the_configs(shapes):
    s7, s13 = shapes["llava-1.5-7b"], shapes["llava-1.5-13b"]
    assert (s7.hidden, s7.layers, s7.intermediate, s7.heads, s7.kv_dim, s7.vocab) == (4096, 32, 11008, 32, 4096, 32064)
    assert (s13.hidden, s13.layers, s13.intermediate, s13.heads) == (5120, 40, 13824, 40)
    assert (s7.vision_hidden, s7.vision_tokens, s7.image_tokens, s7.vision_layers_run) == (1024, 577, 576, 23)


def test_one_decoder_layer_by_hand(shapes):
    # 7B, 10 new tokens after 5 cached: q, k, v, o (4 x 4096^2) + gate, up, down (3 x 4096 x 11008) multiply-adds per
    # token, x 2 FLOPs, x 10 tokens; attention: 10 x 5 + (1 + ... + 10) = 105 query-key pairs x 4 x 4096
    matmul = 2 * 10 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert matmul == 4_047_503_360
    assert gpu_projection.text_layer_flops(shapes["llava-1.5-7b"], 10, 5) == 4_047_503_360 + 1_720_320
    # the whole text model: 32 layers + the LM head on the last token (2 x 4096 x 32064)
    assert gpu_projection.text_flops(shapes["llava-1.5-7b"], 10, 5) == 32 * (4_047_503_360 + 1_720_320) + 262_668_288


def test_image_by_hand(shapes):
    s = shapes["llava-1.5-7b"]
    layer = 2 * 577 * (4 * 1024**2 + 2 * 1024 * 4096) + 4 * 1024 * 577**2
    expected = 2 * 576 * 3 * 14 * 14 * 1024 + 23 * layer + 2 * 576 * (1024 * 4096 + 4096 * 4096)
    assert gpu_projection.image_flops(s) == expected
    assert 0.38e12 < expected < 0.40e12  # ~2 x 0.3 B params x 577 tokens


def test_token_flow(projections):
    tokens = projections["llava-1.5-7b"]["tokens"]
    assert tokens["turn1_prompt"] > 576
    assert tokens["turn2_cached"] % 16 == 0
    assert tokens["turn1_prompt"] < tokens["turn2_cached"] <= tokens["turn1_prompt"] + 128
    assert tokens["turn2_new"] == tokens["turn2_prompt"] - tokens["turn2_cached"]
    # v2's second turn quotes the step-1 answer again, so it holds it twice
    assert tokens["turn2_prompt"] > tokens["turn1_prompt"] + 2 * 128
    assert tokens["embed_prompt"] == tokens["turn2_prompt"] + 64


def test_13b_costs_more_than_7b(projections):
    p7, p13 = projections["llava-1.5-7b"], projections["llava-1.5-13b"]
    assert p13["params"]["total"] > p7["params"]["total"]
    assert p13["total_flops"] > p7["total_flops"]
    assert p13["weight_bytes_per_step"] > p7["weight_bytes_per_step"]
    assert p13["kv_bytes_per_token"] > p7["kv_bytes_per_token"]
    assert p13["batch"] < p7["batch"]
    assert p13["prefill_s"] > p7["prefill_s"] and p13["decode_s"] > p7["decode_s"]
    assert p13["samples_per_s"] < p7["samples_per_s"]
    # FLOPs per sample ~ 2 x params x tokens: 7B ~ 2 x 6.6e9 x ~2,100 tokens
    assert 25e12 < p7["total_flops"] < 35e12


def test_batching_and_overlap_bounds(projections):
    for p in projections.values():
        assert p["samples_per_s"] < p["samples_per_s_overlap"]
        assert p["sequential_samples_per_s"] < p["samples_per_s"]
        assert 1 < p["batched_over_sequential"] < p["batch"]


def test_assumptions_move_the_numbers():
    base = gpu_projection.project("llava-1.5-7b")
    longer = gpu_projection.project("llava-1.5-7b", gpu_projection.Assumptions(step1_tokens=256))
    faster = gpu_projection.project("llava-1.5-7b", gpu_projection.Assumptions(prefill_utilisation=1.0))
    assert longer["total_flops"] > base["total_flops"] and longer["samples_per_s"] < base["samples_per_s"]
    assert faster["prefill_s"] == pytest.approx(base["prefill_s"] / 2)


def test_markdown_table(projections):
    table = gpu_projection.markdown(list(projections.values()), gpu_projection.Assumptions(), gpu_projection.Hardware())
    lines = table.splitlines()
    assert "LLaVA-1.5-7B" in lines[0] and "LLaVA-1.5-13B" in lines[0]
    assert all(line.count("|") == 4 for line in lines)
    assert any("TFLOP per CoT sample" in line for line in lines)
