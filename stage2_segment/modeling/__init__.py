"""Stage-2 model: SAM with multi-scale language-aware adapters, prompted by projected MLLM token embeddings."""

from stage2_segment.modeling.adapted_sam import AdaptedSam
from stage2_segment.modeling.adapter import LanguageAwareAdapter
from stage2_segment.modeling.build import (
    SAM_VARIANTS,
    SamCheckpointError,
    SamVariant,
    adapted_sam_registry,
    build_adapted_sam,
    build_sam_parts,
    get_variant,
    load_sam_state_dict,
    sha256_of,
)
from stage2_segment.modeling.projector import TextProjector

__all__ = [
    "SAM_VARIANTS",
    "AdaptedSam",
    "LanguageAwareAdapter",
    "SamCheckpointError",
    "SamVariant",
    "TextProjector",
    "adapted_sam_registry",
    "build_adapted_sam",
    "build_sam_parts",
    "get_variant",
    "load_sam_state_dict",
    "sha256_of",
]
