"""SAM with language-aware adapters at several encoder depths, prompted by projected MLLM token embeddings.

The model composes segment-anything's own modules, unchanged: ``ImageEncoderViT`` (frozen), ``PromptEncoder``
(frozen; supplies the no-mask dense embedding and the dense positional encoding) and ``MaskDecoder`` (trained), plus a
``TextProjector`` and one ``LanguageAwareAdapter`` per chosen encoder block (both trained).

Forward: text embeddings BxNxD_llm -> projector -> prompt tokens BxNxP. The encoder runs exactly like
``ImageEncoderViT.forward`` (patch embedding, + absolute position embedding, blocks, neck) with adapter ``k`` applied
to the output of block ``k``; the prompt tokens of each row (padding dropped) are that row's sparse prompt embeddings
for the decoder, single-mask output. With all adapter gates at zero the image embedding equals ``image_encoder(x)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder
from torch import nn
from torch.utils.checkpoint import checkpoint

from stage2_segment.modeling.adapter import LanguageAwareAdapter
from stage2_segment.modeling.projector import TextProjector

TRAINABLE_PREFIXES = ("projector.", "adapters.", "mask_decoder.")


class AdaptedSam(nn.Module):
    """SAM + projector + language-aware adapters.

    Args:
        image_encoder: segment-anything ``ImageEncoderViT``; frozen here.
        prompt_encoder: segment-anything ``PromptEncoder``; frozen here.
        mask_decoder: segment-anything ``MaskDecoder``; trained.
        projector: maps MLLM embeddings to prompt tokens of width ``prompt_encoder.embed_dim``.
        adapters: encoder block index -> adapter applied to that block's output (one index = single-scale).
    """

    def __init__(
        self,
        image_encoder: ImageEncoderViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        projector: TextProjector,
        adapters: Mapping[int, LanguageAwareAdapter],
    ) -> None:
        super().__init__()
        depth = len(image_encoder.blocks)
        for index in adapters:
            if not 0 <= int(index) < depth:
                raise ValueError(f"adapter block index {index} outside the encoder's blocks 0..{depth - 1}")
        if projector.out_dim != prompt_encoder.embed_dim:
            raise ValueError(
                f"projector out_dim {projector.out_dim} != the prompt encoder's embed_dim {prompt_encoder.embed_dim}"
            )
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.projector = projector
        self.adapters = nn.ModuleDict({str(int(index)): adapters[index] for index in sorted(adapters, key=int)})
        self.image_encoder.requires_grad_(False)
        self.prompt_encoder.requires_grad_(False)
        # Recompute the activations of blocks after the first adapter in backward instead of storing them.
        self.gradient_checkpointing = False
        # How the builder made this model (variant, llm_dim, adapter_blocks, ...), for checkpoints; {} if built by hand.
        self.build_args: dict[str, object] = {}

    @property
    def image_size(self) -> int:
        """Side S of the square, padded encoder input."""
        return self.image_encoder.img_size

    @property
    def adapter_blocks(self) -> list[int]:
        return [int(index) for index in self.adapters]

    def project_text(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """BxNxD_llm -> BxNxP prompt tokens."""
        return self.projector(text_embeds)

    def encode_image(self, images: torch.Tensor, prompts: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Adapted encoder. images Bx3xSxS (normalised, padded), prompts BxNxP, text_mask BxN -> BxPxS/16xS/16.

        Blocks up to the first adapter run without autograd when the encoder is frozen (nothing upstream needs
        gradients), which saves their activations.
        """
        encoder = self.image_encoder
        frozen = not any(parameter.requires_grad for parameter in encoder.parameters())
        first_adapter = min(self.adapter_blocks, default=len(encoder.blocks))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            features = encoder.patch_embed(images)
            if encoder.pos_embed is not None:
                features = features + encoder.pos_embed
        for index, block in enumerate(encoder.blocks):
            if frozen and index <= first_adapter:
                with torch.no_grad():
                    features = block(features)
            elif self.gradient_checkpointing and torch.is_grad_enabled():
                features = checkpoint(block, features, use_reentrant=False)
            else:
                features = block(features)
            adapter = self.adapters[str(index)] if str(index) in self.adapters else None
            if adapter is not None:
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    features = checkpoint(adapter, features, prompts, text_mask, use_reentrant=False)
                else:
                    features = adapter(features, prompts, text_mask)
        return encoder.neck(features.permute(0, 3, 1, 2))

    def decode_masks(
        self, image_embeddings: torch.Tensor, prompts: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """Mask decoder, one row at a time with that row's real tokens only (SAM's decoder has no padding mask, and it
        repeats the image embedding per prompt set, so rows are decoded separately; the result does not depend on
        how much padding a batch carries).

        Args:
            image_embeddings: BxPxhxw (h = w = S/16).
            prompts: BxNxP prompt tokens.
            text_mask: BxN bool, True where a token is real.
        Returns:
            Bx1x4hx4w low-resolution mask logits.
        """
        image_pe = self.prompt_encoder.get_dense_pe()
        height, width = image_embeddings.shape[-2:]
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, height, width)
        low_res = []
        for row in range(image_embeddings.shape[0]):
            sparse = prompts[row][text_mask[row].bool()].unsqueeze(0)
            row_logits, _ = self.mask_decoder(
                image_embeddings=image_embeddings[row : row + 1],
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            low_res.append(row_logits)
        return torch.cat(low_res, dim=0)

    def forward(self, images: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """images Bx3xSxS (preprocessed), text_embeds BxNxD_llm, text_mask BxN bool (True = real token)
        -> Bx1x(S/4)x(S/4) low-resolution mask logits."""
        if images.shape[0] != text_embeds.shape[0] or text_mask.shape != text_embeds.shape[:2]:
            raise ValueError(
                f"batch mismatch: images {tuple(images.shape)}, text_embeds {tuple(text_embeds.shape)}, "
                f"text_mask {tuple(text_mask.shape)}"
            )
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images must be Bx3x{self.image_size}x{self.image_size}, got {tuple(images.shape)}")
        text_mask = text_mask.bool()
        prompts = self.project_text(text_embeds)
        image_embeddings = self.encode_image(images, prompts, text_mask)
        return self.decode_masks(image_embeddings, prompts, text_mask)

    def upscale_to_input(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        """Bx1xhxw -> Bx1xSxS, bilinear (SAM's first post-processing step; compare with a padded SxS target)."""
        return F.interpolate(
            low_res_logits, (self.image_size, self.image_size), mode="bilinear", align_corners=False
        )

    def postprocess_masks(
        self, low_res_logits: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """Like ``Sam.postprocess_masks``: upsample Bx1xhxw logits to SxS, crop the valid ``input_size`` (resized
        h, w) region, upsample to ``original_size`` (H, W) -> Bx1xHxW logits."""
        masks = self.upscale_to_input(low_res_logits)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trained parts (projector, adapters, mask decoder), keyed as in ``state_dict()``."""
        return {key: value for key, value in self.state_dict().items() if key.startswith(TRAINABLE_PREFIXES)}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Inverse of ``trainable_state_dict``; strict: any missing, unexpected or mis-shaped key is an error."""
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mis_shaped = sorted(
            f"{key} (checkpoint {tuple(state[key].shape)}, model {tuple(expected[key].shape)})"
            for key in set(expected) & set(state)
            if tuple(state[key].shape) != tuple(expected[key].shape)
        )
        if missing or unexpected or mis_shaped:
            raise KeyError(
                "trainable state does not match this model (adapters at blocks "
                f"{self.adapter_blocks}): missing {_preview(missing)}; unexpected {_preview(unexpected)}; "
                f"wrong shape {_preview(mis_shaped)}"
            )
        self.load_state_dict(dict(state), strict=False)

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return (parameter for parameter in self.parameters() if parameter.requires_grad)


def _preview(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
