"""Probing by activation patching between clean and minimally corrupted inputs (NOTICE-style)."""

from .patching import ActivationPatching, Cell, PatchingResult, important_heads, mean_effect, same_length_replacement

__all__ = ["ActivationPatching", "Cell", "PatchingResult", "important_heads", "mean_effect", "same_length_replacement"]
