"""Probing by activation patching between clean and minimally corrupted inputs (NOTICE-style)."""

from .adapters import ProbingAdapter, Site, as_probing_adapter, register_probing_adapter
from .aggregate import HEAD_RANKINGS, answer_position, effect_by_role, head_scores, important_heads, mean_effect, universal_heads
from .pairs import VQAPair, gaussian_noise, read_vqa_pairs, same_length_replacement, symmetric_token_replacement, vqa_minimal_pair
from .patching import ActivationPatching, Cell, PatchingResult

__all__ = [
    "ActivationPatching",
    "Cell",
    "PatchingResult",
    "ProbingAdapter",
    "Site",
    "VQAPair",
    "as_probing_adapter",
    "effect_by_role",
    "gaussian_noise",
    "important_heads",
    "head_scores",
    "answer_position",
    "HEAD_RANKINGS",
    "mean_effect",
    "read_vqa_pairs",
    "register_probing_adapter",
    "same_length_replacement",
    "symmetric_token_replacement",
    "universal_heads",
    "vqa_minimal_pair",
]
