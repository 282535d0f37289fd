"""Stage-2 model: adapted SAM (tiny, CPU) against segment-anything's own modules, freezing, checkpoints, registry,
preprocessing, and a small overfit run."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from stage2_segment.loss import mask_loss
from stage2_segment.modeling import (
    SamCheckpointError,
    SamVariant,
    adapted_sam_registry,
    build_adapted_sam,
    build_sam_parts,
    get_variant,
    sha256_of,
)
from stage2_segment.preprocess import PIXEL_MEAN, PIXEL_STD, preprocess_image, preprocess_mask

LLM_DIM = 128
TINY_SIZE = 256

# Published parameter counts of the official SAM models (image encoder, whole model).
OFFICIAL_COUNTS = {
    "vit_h": (637_026_048, 641_090_608),
    "vit_l": (308_278_272, 312_342_832),
    "vit_b": (89_670_912, 93_735_472),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is as fast, and stays fast when other processes share the CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Add noise to every tensor, so that zero-initialised SAM parts (relative positions, ...) are exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)


def _inputs(batch: int = 2, tokens: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, TINY_SIZE, TINY_SIZE, generator=generator)
    text = torch.randn(batch, tokens, LLM_DIM, generator=generator).half()
    text_mask = torch.ones(batch, tokens, dtype=torch.bool)
    text_mask[0, tokens - 2 :] = False
    return images, text, text_mask


def _official_tiny_checkpoint(path: Path, seed: int = 7, spec: SamVariant | None = None) -> Sam:
    """A checkpoint in the official layout: segment-anything's ``Sam`` state dict, saved with torch.save."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = Sam(*build_sam_parts(spec or get_variant("tiny")))
    _perturb(sam, seed)
    torch.save(sam.state_dict(), path)
    return sam


@pytest.mark.parametrize("adapter_blocks", [[2], None], ids=["single-scale", "multi-scale"])
def test_untrained_adapted_encoder_equals_sam_encoder(adapter_blocks):
    model = build_adapted_sam("tiny", LLM_DIM, adapter_blocks=adapter_blocks, seed=1)
    _perturb(model.image_encoder, seed=2)
    assert model.adapter_blocks == (adapter_blocks or [1, 3])
    images, text, text_mask = _inputs()
    with torch.no_grad():
        adapted = model.encode_image(images, model.project_text(text), text_mask)
        reference = model.image_encoder(images)
    assert adapted.shape == (2, 64, 16, 16)
    assert (adapted - reference).abs().max().item() <= 1e-6

    with torch.no_grad():
        for adapter in model.adapters.values():
            adapter.attn_gate.fill_(0.5)
            adapter.ffn_gate.fill_(0.5)
        opened = model.encode_image(images, model.project_text(text), text_mask)
    assert (opened - reference).abs().max().item() > 1e-3


def test_adapter_receives_gradient_from_the_first_step():
    model = build_adapted_sam("tiny", LLM_DIM, seed=0)
    images, text, text_mask = _inputs()
    target = torch.zeros(2, 1, 64, 64)
    target[:, :, 16:40, 20:50] = 1
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)

    mask_loss(model(images, text, text_mask), target).total.backward()
    for index, adapter in model.adapters.items():
        assert adapter.attn_gate.grad.abs().sum().item() > 0, index
        assert adapter.ffn_gate.grad.abs().sum().item() > 0, index
        assert adapter.query.weight.grad.abs().sum().item() == 0, index  # gated off until the gates move
    assert model.projector.fc1.weight.grad.abs().sum().item() > 0  # the decoder's prompts reach the projector

    optimizer.step()
    optimizer.zero_grad()
    mask_loss(model(images, text, text_mask), target).total.backward()
    for index, adapter in model.adapters.items():
        for name in ("query", "key", "value", "attn_out"):
            assert getattr(adapter, name).weight.grad.abs().sum().item() > 0, (index, name)
        assert adapter.ffn.lin1.weight.grad.abs().sum().item() > 0, index


def test_frozen_parts_stay_frozen_and_trained_parts_move():
    model = build_adapted_sam("tiny", LLM_DIM, seed=0)
    frozen_before = {
        name: tensor.clone()
        for name, tensor in model.state_dict().items()
        if name.startswith(("image_encoder.", "prompt_encoder."))
    }
    trained_before = {name: tensor.clone() for name, tensor in model.trainable_state_dict().items()}
    assert set(trained_before) == {name for name, p in model.named_parameters() if p.requires_grad}
    assert not set(frozen_before) & set(trained_before)

    images, text, text_mask = _inputs()
    target = torch.zeros(2, 1, 64, 64)
    target[:, :, 8:30, 8:30] = 1
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        mask_loss(model(images, text, text_mask), target).total.backward()
        optimizer.step()

    parameters = dict(model.named_parameters())
    for name, before in frozen_before.items():
        assert torch.equal(model.state_dict()[name], before), name
        if name in parameters:
            assert parameters[name].grad is None, name
    after = model.trainable_state_dict()
    for prefix in ("projector.", "mask_decoder.", "adapters.1.", "adapters.3."):
        names = [name for name in after if name.startswith(prefix)]
        moved = max((after[name] - trained_before[name]).abs().max().item() for name in names)
        assert moved > 5e-4, prefix  # Adam moves by ~lr per step; weight decay alone would move by ~1e-7
    assert model.adapters["1"].attn_gate.abs().max().item() > 0


def test_trainable_state_dict_round_trip_and_strictness():
    trained = build_adapted_sam("tiny", LLM_DIM, seed=0)
    _perturb(trained.adapters, seed=3)
    _perturb(trained.mask_decoder, seed=4)
    state = trained.trainable_state_dict()
    assert all(key.startswith(("projector.", "adapters.", "mask_decoder.")) for key in state)

    fresh = build_adapted_sam("tiny", LLM_DIM, seed=5)
    fresh.image_encoder.load_state_dict(trained.image_encoder.state_dict())
    fresh.prompt_encoder.load_state_dict(trained.prompt_encoder.state_dict())
    fresh.load_trainable_state_dict(state)
    images, text, text_mask = _inputs()
    with torch.no_grad():
        assert torch.equal(fresh(images, text, text_mask), trained(images, text, text_mask))

    missing = dict(state)
    del missing["adapters.3.query.weight"]
    with pytest.raises(KeyError, match=r"missing adapters\.3\.query\.weight"):
        fresh.load_trainable_state_dict(missing)
    single_scale = build_adapted_sam("tiny", LLM_DIM, adapter_blocks=[3], seed=0)
    with pytest.raises(KeyError, match=r"unexpected adapters\.1\."):
        single_scale.load_trainable_state_dict(state)
    other_width = build_adapted_sam("tiny", 96, seed=0)
    with pytest.raises(KeyError, match=r"wrong shape projector\."):
        other_width.load_trainable_state_dict(state)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = build_adapted_sam("tiny", LLM_DIM, seed=0)
    with torch.no_grad():
        for adapter in model.adapters.values():
            adapter.attn_gate.fill_(0.3)
            adapter.ffn_gate.fill_(0.3)
    images, text, text_mask = _inputs()
    target = torch.zeros(2, 1, 64, 64)
    target[:, :, 10:30, 5:45] = 1
    gradients = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        mask_loss(model(images, text, text_mask), target).total.backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() and "adapters.1.query.weight" in gradients[0]
    for name, gradient in gradients[0].items():
        assert torch.allclose(gradient, gradients[1][name], atol=1e-6, rtol=1e-4), name


def test_padding_does_not_change_a_row():
    model = build_adapted_sam("tiny", LLM_DIM, seed=0)
    with torch.no_grad():
        for adapter in model.adapters.values():
            adapter.attn_gate.fill_(1.0)
            adapter.ffn_gate.fill_(1.0)
    images, text, _ = _inputs(batch=1, tokens=4)
    padded_text = torch.cat([text, torch.randn(1, 6, LLM_DIM).half()], dim=1)
    padded_mask = torch.zeros(1, 10, dtype=torch.bool)
    padded_mask[0, :4] = True
    with torch.no_grad():
        short = model(images, text, torch.ones(1, 4, dtype=torch.bool))
        long = model(images, padded_text, padded_mask)
        empty = model(images, text, torch.zeros(1, 4, dtype=torch.bool))
    assert short.shape == (1, 1, 64, 64)
    assert (short - long).abs().max().item() < 1e-5
    assert torch.isfinite(empty).all()


def test_postprocess_masks_crops_padding_and_restores_size():
    model = build_adapted_sam("tiny", LLM_DIM, seed=0)
    low_res = torch.full((1, 1, 64, 64), -5.0)
    low_res[..., :32, :16] = 5.0  # the valid region of a 128x256 (h x w) resized input is rows 0..31 of 64
    masks = model.postprocess_masks(low_res, input_size=(128, 256), original_size=(300, 600))
    assert masks.shape == (1, 1, 300, 600)
    positive = masks[0, 0] > 0
    assert positive[:, :140].all() and not positive[:, 160:].any()
    assert model.upscale_to_input(low_res).shape == (1, 1, TINY_SIZE, TINY_SIZE)


def test_registry_builds_official_sizes_on_meta():
    for variant, (encoder_count, sam_count) in OFFICIAL_COUNTS.items():
        model = adapted_sam_registry[variant](llm_dim=5120, device="meta")
        spec = get_variant(variant)
        encoder = sum(p.numel() for p in model.image_encoder.parameters())
        sam = encoder + sum(p.numel() for p in [*model.prompt_encoder.parameters(), *model.mask_decoder.parameters()])
        assert (encoder, sam) == (encoder_count, sam_count), variant
        assert model.adapter_blocks == list(spec.encoder_global_attn_indexes)
        assert model.image_size == 1024 and model.projector.out_dim == 256
        assert all(adapter.dim == spec.encoder_embed_dim for adapter in model.adapters.values())
    tiny = adapted_sam_registry["tiny"](llm_dim=LLM_DIM)
    tiny_count = sum(p.numel() for p in tiny.parameters())
    assert 100_000 < tiny_count < 2_000_000 and tiny.image_size == TINY_SIZE
    with pytest.raises(ValueError, match="unknown SAM variant 'vit_x'"):
        build_adapted_sam("vit_x", LLM_DIM)
    with pytest.raises(ValueError, match="adapter_blocks"):
        build_adapted_sam("tiny", LLM_DIM, adapter_blocks=[4])


def test_random_init_is_deterministic_from_seed():
    first, second, other = (build_adapted_sam("tiny", LLM_DIM, seed=seed) for seed in (3, 3, 4))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not torch.equal(first.projector.fc1.weight, other.projector.fc1.weight)


def test_loads_an_official_layout_checkpoint(tmp_path):
    path = tmp_path / "sam_tiny.pth"
    sam = _official_tiny_checkpoint(path)
    model = build_adapted_sam("tiny", LLM_DIM, sam_checkpoint=path, seed=0)
    assert model.build_args == {
        "variant": "tiny", "llm_dim": LLM_DIM, "adapter_blocks": [1, 3], "projector_hidden_dim": LLM_DIM,
        "sam_checkpoint": str(path), "seed": 0,
    }
    loaded = model.state_dict()
    for key, tensor in sam.state_dict().items():
        assert torch.equal(loaded[key], tensor), key
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    assert all(p.requires_grad for p in model.mask_decoder.parameters())
    without_checkpoint = build_adapted_sam("tiny", LLM_DIM, seed=0)
    assert torch.equal(model.adapters["1"].query.weight, without_checkpoint.adapters["1"].query.weight)
    images, _, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(model.image_encoder(images), sam.image_encoder(images))
    assert sha256_of(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_refuses_a_checkpoint_of_another_variant(tmp_path):
    path = tmp_path / "sam_wider.pth"
    wider = dataclasses.replace(get_variant("tiny"), encoder_embed_dim=96)
    _official_tiny_checkpoint(path, spec=wider)
    with pytest.raises(SamCheckpointError) as caught:
        build_adapted_sam("tiny", LLM_DIM, sam_checkpoint=path)
    message = str(caught.value)
    assert "sam_wider.pth" in message and "SAM tiny checkpoint" in message
    assert "wrong shapes [" in message and "missing keys" not in message
    assert "image_encoder.blocks.0.attn.qkv.weight (file (288, 96), tiny (192, 64))" in message

    tiny_path = tmp_path / "sam_tiny.pth"
    _official_tiny_checkpoint(tiny_path)
    with pytest.raises(SamCheckpointError, match=r"sam_tiny\.pth is not a SAM vit_b checkpoint: .* missing keys"):
        build_adapted_sam("vit_b", LLM_DIM, sam_checkpoint=tiny_path)


class _Payload:
    """An arbitrary object; a weights-only load must refuse to unpickle it."""

    def __reduce__(self):
        return (print, ("payload ran",))


def test_refuses_pickled_objects_and_missing_files(tmp_path, capsys):
    path = tmp_path / "payload.pth"
    torch.save({"image_encoder.pos_embed": _Payload()}, path)
    with pytest.raises(SamCheckpointError, match=r"payload\.pth: refused to load.*weights_only"):
        build_adapted_sam("tiny", LLM_DIM, sam_checkpoint=path)
    assert "payload ran" not in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        build_adapted_sam("tiny", LLM_DIM, sam_checkpoint=tmp_path / "absent.pth")


def test_preprocess_image_and_mask_follow_sam():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (100, 50, 3), dtype=np.uint8)
    pixels, (height, width) = preprocess_image(image, TINY_SIZE)
    assert pixels.shape == (3, TINY_SIZE, TINY_SIZE) and (height, width) == (256, 128)
    resized = torch.from_numpy(ResizeLongestSide(TINY_SIZE).apply_image(image)).permute(2, 0, 1).float()
    expected = (resized - torch.tensor(PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(PIXEL_STD).view(3, 1, 1)
    assert torch.allclose(pixels[:, :, :128], expected, atol=1e-6)
    assert pixels[:, :, 128:].abs().max().item() == 0

    mask = np.zeros((100, 50), dtype=np.uint8)
    mask[10:60, 5:25] = 1
    mask[0:4, :] = 255
    target = preprocess_mask(mask, TINY_SIZE)
    assert target.shape == (TINY_SIZE, TINY_SIZE) and target.dtype == torch.uint8
    assert set(target.unique().tolist()) == {0, 1, 255}
    assert (target[:, 128:] == 255).all()
    assert target[30:150, 15:60].eq(1).all() and target[200:, :128].eq(0).all()
    scaled_area = int(mask.astype(bool).sum() - (mask == 255).sum()) * (256 / 100) * (128 / 50)
    assert abs(int(target.eq(1).sum()) - scaled_area) / scaled_area < 0.05


def _overfit_samples() -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Two images, each with a red square and a blue disc; query 0 asks for the square, query 1 for the disc."""
    rng = np.random.default_rng(0)
    samples = []
    for image_index, (height, width) in enumerate([(180, 240), (240, 200)]):
        image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
        rows, cols = np.mgrid[:height, :width]
        square_x = width * (0.3 if image_index == 0 else 0.7)
        square = (abs(rows - height * 0.3) < height * 0.15) & (abs(cols - square_x) < width * 0.15)
        disc_x = width * (0.65 if image_index == 0 else 0.3)
        disc = (rows - height * 0.7) ** 2 + (cols - disc_x) ** 2 < (min(height, width) * 0.18) ** 2
        image[square] = (220, 40, 40)
        image[disc] = (40, 60, 230)
        samples.append((image, square.astype(np.uint8), 0))
        samples.append((image, disc.astype(np.uint8), 1))
    return samples


def test_overfits_four_samples():
    """The tiny model learns 4 image/query/mask samples (two queries per image, so the text must matter).

    Seen on 2 shared CPU cores, one thread: mean IoU > 0.9 after 50 steps (50-70 for seeds 0-11), ~4 s; bound 200 steps.
    """
    samples = _overfit_samples()
    queries = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 6, LLM_DIM)).astype(np.float16))
    prepared = [preprocess_image(image, TINY_SIZE) for image, _, _ in samples]
    images = torch.stack([pixels for pixels, _ in prepared])
    targets = torch.stack([preprocess_mask(mask, TINY_SIZE) for _, mask, _ in samples])[:, None]
    text = torch.stack([queries[query] for _, _, query in samples])
    text_mask = torch.ones(4, 6, dtype=torch.bool)
    text_mask[0, 4:] = False
    text_mask[3, 5:] = False

    model = build_adapted_sam("tiny", LLM_DIM, seed=0)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, weight_decay=1e-4)

    def ious() -> list[float]:
        with torch.no_grad():
            low_res = model(images, text, text_mask)
        scores = []
        for row, (_, mask, _) in enumerate(samples):
            prediction = model.postprocess_masks(low_res[row : row + 1], prepared[row][1], mask.shape)[0, 0] > 0
            truth = torch.from_numpy(mask).bool()
            scores.append(((prediction & truth).sum() / ((prediction | truth).sum() + 1e-5)).item())
        return scores

    scores = ious()
    assert np.mean(scores) < 0.5
    started = time.perf_counter()
    for step in range(1, 201):
        optimizer.zero_grad()
        mask_loss(model.upscale_to_input(model(images, text, text_mask)), targets).total.backward()
        optimizer.step()
        if step % 10 == 0:
            scores = ious()
            if np.mean(scores) > 0.9:
                break
    logging.getLogger(__name__).info(
        "overfit: mean IoU %.3f after %d steps, %.1f s", np.mean(scores), step, time.perf_counter() - started
    )
    assert np.mean(scores) > 0.9, (step, scores)
    # The same image, the other query: the learned masks differ (square vs disc barely overlap).
    with torch.no_grad():
        swapped = model(images[[0]], text[[1]], text_mask[[1]])
        kept = model(images[[0]], text[[0]], text_mask[[0]])
    overlap = ((swapped > 0) & (kept > 0)).sum() / ((swapped > 0) | (kept > 0)).sum()
    assert overlap.item() < 0.2
