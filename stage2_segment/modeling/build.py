"""Builders and the variant registry for the adapted SAM (official ``vit_h``/``vit_l``/``vit_b`` sizes, ``tiny``, and
``mini``, the small SAM pretrained on the demo world by ``stage2_segment.mini_sam``).

``build_adapted_sam("vit_h", llm_dim=5120, sam_checkpoint=Path("sam_vit_h_4b8939.pth"))`` builds the paper's model:
adapters after ViT-H's four global-attention blocks, SAM's weights from an official checkpoint (keys
``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``). SAM's parts are built on the meta device and take the
checkpoint's tensors directly, so a mismatching checkpoint fails before any large allocation. Without a checkpoint every
part is initialised randomly and deterministically from ``seed`` (how the ``tiny`` variant is used in tests and demos).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pickle
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from stage2_segment.modeling.adapted_sam import AdaptedSam
from stage2_segment.modeling.adapter import LanguageAwareAdapter
from stage2_segment.modeling.projector import TextProjector

logger = logging.getLogger(__name__)

SAM_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
NON_WEIGHT_KEYS = ("pixel_mean", "pixel_std")  # Sam's normalisation buffers; preprocessing owns normalisation here


class SamCheckpointError(ValueError):
    """A SAM checkpoint that cannot be used for the requested variant."""


@dataclasses.dataclass(frozen=True)
class SamVariant:
    """Sizes of one SAM variant plus its adapter defaults."""

    name: str
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    adapter_num_heads: int = 8
    adapter_mlp_ratio: float = 1.0


SAM_VARIANTS: dict[str, SamVariant] = {
    "vit_h": SamVariant("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamVariant("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamVariant("vit_b", 768, 12, 12, (2, 5, 8, 11)),
    "tiny": SamVariant(
        "tiny", 64, 4, 2, (1, 3), image_size=256, window_size=4, prompt_embed_dim=64, decoder_depth=1,
        decoder_mlp_dim=256, decoder_num_heads=2, iou_head_hidden_dim=64, adapter_num_heads=2,
    ),
    # Pretrained promptably on the demo world (stage2_segment/mini_sam.py); weights in weights/mini-sam/.
    "mini": SamVariant(
        "mini", 96, 4, 3, (1, 3), image_size=160, patch_size=8, window_size=5, prompt_embed_dim=64, decoder_depth=2,
        decoder_mlp_dim=256, decoder_num_heads=4, iou_head_hidden_dim=64, adapter_num_heads=4,
    ),
}


def get_variant(variant: str) -> SamVariant:
    if variant not in SAM_VARIANTS:
        raise ValueError(f"unknown SAM variant {variant!r}; known: {', '.join(SAM_VARIANTS)}")
    return SAM_VARIANTS[variant]


def build_sam_parts(spec: SamVariant) -> tuple[ImageEncoderViT, PromptEncoder, MaskDecoder]:
    """SAM's three modules with segment-anything's own constructors, exactly as ``segment_anything.build_sam`` does."""
    embedding_size = spec.image_size // spec.patch_size
    image_encoder = ImageEncoderViT(
        depth=spec.encoder_depth,
        embed_dim=spec.encoder_embed_dim,
        img_size=spec.image_size,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=spec.encoder_num_heads,
        patch_size=spec.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=spec.encoder_global_attn_indexes,
        window_size=spec.window_size,
        out_chans=spec.prompt_embed_dim,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=spec.prompt_embed_dim,
        image_embedding_size=(embedding_size, embedding_size),
        input_image_size=(spec.image_size, spec.image_size),
        mask_in_chans=spec.mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=spec.decoder_depth,
            embedding_dim=spec.prompt_embed_dim,
            mlp_dim=spec.decoder_mlp_dim,
            num_heads=spec.decoder_num_heads,
        ),
        transformer_dim=spec.prompt_embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=spec.iou_head_hidden_dim,
    )
    return image_encoder, prompt_encoder, mask_decoder


def build_adapted_sam(
    variant: str,
    llm_dim: int,
    adapter_blocks: list[int] | tuple[int, ...] | None = None,
    sam_checkpoint: Path | str | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    projector_hidden_dim: int | None = None,
) -> AdaptedSam:
    """Build an adapted SAM.

    Args:
        variant: ``vit_h`` | ``vit_l`` | ``vit_b`` | ``tiny`` | ``mini``.
        llm_dim: width of the stage-1 embeddings.
        adapter_blocks: encoder block indices that get an adapter; None or empty = the variant's global-attention
            blocks (multi-scale); one index = single-scale.
        sam_checkpoint: local official SAM checkpoint (``torch.load`` with ``weights_only=True``, or ``.safetensors``);
            None = random init from ``seed``.
        seed: seeds every random initialisation (projector, adapters, and SAM itself without a checkpoint); the
            caller's RNG state is left untouched.
        device: where to build; ``"meta"`` builds shapes only (no checkpoint allowed).
        projector_hidden_dim: projector hidden width; None = ``llm_dim``.
    """
    spec = get_variant(variant)
    blocks = tuple(int(index) for index in adapter_blocks) if adapter_blocks else spec.encoder_global_attn_indexes
    bad = [index for index in blocks if not 0 <= index < spec.encoder_depth]
    if bad or len(set(blocks)) != len(blocks):
        raise ValueError(
            f"adapter_blocks {list(blocks)} invalid for {variant}: need distinct indices in 0..{spec.encoder_depth - 1}"
        )
    device = torch.device(device)
    state = None
    if sam_checkpoint is not None:
        if device.type == "meta":
            raise ValueError("a SAM checkpoint cannot be loaded onto the meta device")
        state = load_sam_state_dict(Path(sam_checkpoint))

    rng_devices = []
    if device.type == "cuda":
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        # Projector and adapters first, so that they start the same with and without a SAM checkpoint.
        with device:
            projector = TextProjector(llm_dim, spec.prompt_embed_dim, projector_hidden_dim)
            adapters = {
                index: LanguageAwareAdapter(
                    spec.encoder_embed_dim, spec.prompt_embed_dim, spec.adapter_num_heads, spec.adapter_mlp_ratio
                )
                for index in blocks
            }
        with torch.device("meta") if state is not None else device:
            image_encoder, prompt_encoder, mask_decoder = build_sam_parts(spec)
            if state is None and image_encoder.pos_embed is not None:
                # SAM's constructor leaves the position embedding at zero; a random SAM gets a small random one.
                nn.init.trunc_normal_(image_encoder.pos_embed, std=0.02)
    if state is not None:
        _assign_sam_state(spec, Path(sam_checkpoint), state, image_encoder, prompt_encoder, mask_decoder)
    model = AdaptedSam(image_encoder, prompt_encoder, mask_decoder, projector, adapters)
    model.build_args = {
        "variant": variant,
        "llm_dim": llm_dim,
        "adapter_blocks": model.adapter_blocks,
        "projector_hidden_dim": projector.fc1.out_features,
        "sam_checkpoint": str(sam_checkpoint) if sam_checkpoint is not None else None,
        "seed": seed,
    }
    if state is not None:
        model.to(device)
    return model


def _assign_sam_state(
    spec: SamVariant,
    path: Path,
    state: dict[str, torch.Tensor],
    image_encoder: ImageEncoderViT,
    prompt_encoder: PromptEncoder,
    mask_decoder: MaskDecoder,
) -> None:
    """Check the checkpoint against the (meta) modules' keys and shapes, then make its tensors their weights."""
    parts = {"image_encoder.": image_encoder, "prompt_encoder.": prompt_encoder, "mask_decoder.": mask_decoder}
    expected = {prefix + key: tensor for prefix, part in parts.items() for key, tensor in part.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(key for key in set(state) - set(expected))
    mis_shaped = sorted(
        f"{key} (file {tuple(state[key].shape)}, {spec.name} {tuple(expected[key].shape)})"
        for key in set(expected) & set(state)
        if tuple(state[key].shape) != tuple(expected[key].shape)
    )
    if missing or unexpected or mis_shaped:
        problems = [
            f"{len(keys)} {what} [{_preview(keys)}]"
            for what, keys in (("wrong shapes", mis_shaped), ("missing keys", missing), ("unexpected keys", unexpected))
            if keys
        ]
        raise SamCheckpointError(f"{path} is not a SAM {spec.name} checkpoint: {'; '.join(problems)}")
    for prefix, part in parts.items():
        part_state = {key[len(prefix) :]: state[key].float() for key in state if key.startswith(prefix)}
        part.load_state_dict(part_state, strict=True, assign=True)
        leftover = [name for name, tensor in part.state_dict().items() if tensor.is_meta]
        if leftover:
            raise SamCheckpointError(f"{path}: {spec.name} tensors not set by the checkpoint: {_preview(leftover)}")


def load_sam_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read an official SAM checkpoint from a local file: a flat ``{key: tensor}`` mapping.

    ``.pth`` files go through ``torch.load(..., weights_only=True)``, which refuses arbitrary pickled objects;
    ``.safetensors`` files are read with safetensors.
    """
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from safetensors import SafetensorError

        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as error:
            raise SamCheckpointError(f"{path}: not a readable safetensors file ({error})") from error
    else:
        try:
            with path.open("rb") as handle:
                state = torch.load(handle, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SamCheckpointError(
                f"{path}: refused to load: the file holds pickled objects other than tensors "
                f"(torch.load weights_only=True: {first_line})"
            ) from error
        except (RuntimeError, EOFError, OSError) as error:
            raise SamCheckpointError(f"{path}: not a readable torch checkpoint ({error})") from error
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise SamCheckpointError(f"{path}: expected a flat mapping of parameter names to tensors")
    for key in NON_WEIGHT_KEYS:
        state.pop(key, None)
    foreign = [key for key in state if not key.startswith(SAM_PREFIXES)]
    if foreign:
        raise SamCheckpointError(
            f"{path}: keys outside image_encoder/prompt_encoder/mask_decoder: {_preview(sorted(foreign))}"
        )
    return state


def sha256_of(path: Path | str, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (provenance of the frozen SAM weights)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _preview(items: list[str], limit: int = 4) -> str:
    if not items:
        return ""
    more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


build_adapted_sam_vit_h = partial(build_adapted_sam, "vit_h")
build_adapted_sam_vit_l = partial(build_adapted_sam, "vit_l")
build_adapted_sam_vit_b = partial(build_adapted_sam, "vit_b")
build_adapted_sam_tiny = partial(build_adapted_sam, "tiny")
build_adapted_sam_mini = partial(build_adapted_sam, "mini")

adapted_sam_registry = {
    "vit_h": build_adapted_sam_vit_h,
    "vit_l": build_adapted_sam_vit_l,
    "vit_b": build_adapted_sam_vit_b,
    "tiny": build_adapted_sam_tiny,
    "mini": build_adapted_sam_mini,
}
