"""One optimizer step: AdamW betas from the config, gradient clipping at ``stage2.grad_clip_norm``, and a non-finite
loss stopping the step before the weights change."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from shared.config import Stage2Config
from stage2_segment.modeling import build_adapted_sam
from stage2_segment.optim import NonFiniteLossError, build_optimizer, optimizer_step

LLM_DIM = 32


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(size: int = 256) -> dict:
    generator = torch.Generator().manual_seed(0)
    targets = torch.zeros(2, size, size, dtype=torch.uint8)
    targets[0, 40:120, 60:200] = 1
    targets[1, 100:180, 10:90] = 1
    return {
        "images": torch.randn(2, 3, size, size, generator=generator),
        "text_embeds": torch.randn(2, 5, LLM_DIM, generator=generator).half(),
        "text_mask": torch.tensor([[True] * 5, [True] * 3 + [False] * 2]),
        "targets": targets,
        "sample_ids": ["a", "b"],
    }


def _global_norm(model) -> float:
    grads = [p.grad for p in model.trainable_parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def test_adamw_takes_its_betas_from_the_config():
    model = build_adapted_sam("tiny", LLM_DIM, seed=0)
    stage2 = Stage2Config(lr=2e-4, weight_decay=1e-4, adam_betas=[0.9, 0.95])
    optimizer = build_optimizer(model.trainable_parameters(), stage2)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (2e-4, (0.9, 0.95), 1e-4)


def test_gradients_are_clipped_to_the_configured_norm():
    unclipped_model = build_adapted_sam("tiny", LLM_DIM, seed=0)
    stage2 = Stage2Config(lr=1e-3, grad_clip_norm=0.0)
    unclipped = optimizer_step(unclipped_model, build_optimizer(unclipped_model.trainable_parameters(), stage2),
                               [_batch()], stage2, torch.device("cpu"))  # fmt: skip
    assert unclipped["grad_norm"] == pytest.approx(_global_norm(unclipped_model), rel=1e-6)  # 0 = off

    clip = unclipped["grad_norm"] / 4
    model = build_adapted_sam("tiny", LLM_DIM, seed=0)
    clipped_stage2 = dataclasses.replace(stage2, grad_clip_norm=clip)
    clipped = optimizer_step(model, build_optimizer(model.trainable_parameters(), clipped_stage2), [_batch()],
                             clipped_stage2, torch.device("cpu"))  # fmt: skip
    assert clipped["grad_norm"] == pytest.approx(unclipped["grad_norm"], rel=1e-6)  # reported before clipping
    assert clipped["loss"] == pytest.approx(unclipped["loss"], rel=1e-6)
    assert _global_norm(model) == pytest.approx(clip, rel=1e-4)  # what the optimizer stepped with


def test_a_non_finite_loss_stops_the_step_before_the_weights_change():
    model = build_adapted_sam("tiny", LLM_DIM, seed=0)
    before = {key: value.clone() for key, value in model.trainable_state_dict().items()}
    stage2 = Stage2Config(bce_weight=math.nan)  # what load_config refuses, built directly
    with pytest.raises(NonFiniteLossError, match=r"non-finite training values \(loss nan, bce") as err:
        optimizer_step(model, build_optimizer(model.trainable_parameters(), stage2), [_batch()], stage2,
                       torch.device("cpu"))  # fmt: skip
    assert math.isnan(err.value.values["loss"])
    after = model.trainable_state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
