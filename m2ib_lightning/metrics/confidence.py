"""Confidence drop and confidence increase: the M2IB paper's faithfulness metrics (Wang et al., 2023), for
image maps and for text maps.

A pair's score ``s`` is the cosine similarity between one modality's embedding and
the other modality's clean embedding. Keeping only what a map marks as relevant
gives a perturbed score ``s'``:

- image: the normalised pixels multiplied by the whole map (``keep_image``);
- text: tokens whose map value is at or below the median of the caption's words are
  replaced by a chosen id (``keep_text``); BOS/EOS (and CLS/SEP) are kept, so that the
  tower pools where it did.

Then, per sample, ``drop = max(0, s - s') * 100`` (absolute, as the official M2IB script
computes it: points of cosine similarity) and ``increase = 100 * [s' > s]``; the metrics
average them over samples (the confidence increase is the percentage of samples whose score
rose). A faithful map has a low drop and a high increase. ``relative=True`` gives Chattopadhay
et al.'s (2018) Average Drop instead, ``max(0, s - s') / s * 100`` (NaN where ``s <= 0``,
where it is not defined).

The official evaluation script differs in two places that this module does not copy: it
multiplied the image by the first row of the map only, and it scored text maps with BOS
and EOS removed (which moves the pooled position of CLIP's text tower).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .mean import MeanOverSamples


def _check_scores(clean: Tensor, perturbed: Tensor) -> None:
    if clean.shape != perturbed.shape or clean.dim() != 1:
        raise ValueError(f"clean and perturbed scores must both be (B,), got {tuple(clean.shape)} and {tuple(perturbed.shape)}")


def confidence_drop(clean: Tensor, perturbed: Tensor, relative: bool = False) -> Tensor:
    """(B,) ``max(0, s - s') * 100`` per sample (absolute), or ``max(0, s - s') / s * 100`` (relative; NaN where s <= 0)."""
    _check_scores(clean, perturbed)
    drop = (clean - perturbed).clamp_min(0) * 100
    if not relative:
        return drop
    return torch.where(clean > 0, drop / clean.clamp_min(torch.finfo(clean.dtype).tiny), float("nan"))


def confidence_increase(clean: Tensor, perturbed: Tensor) -> Tensor:
    """(B,) ``100`` where ``s' > s``, else ``0``: averaged, the percentage of samples whose score rose."""
    _check_scores(clean, perturbed)
    return (perturbed > clean).float() * 100


class ConfidenceDrop(MeanOverSamples):
    """Mean of ``max(0, s - s') * 100`` over samples, or of the relative drop (lower is better)."""

    higher_is_better = False
    label = "conf. drop"

    def __init__(self, relative: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.relative = relative

    def _per_sample(self, clean: Tensor, perturbed: Tensor) -> Tensor:
        return confidence_drop(clean, perturbed, self.relative)


class ConfidenceIncrease(MeanOverSamples):
    """Percentage of samples with ``s' > s`` (higher is better)."""

    higher_is_better = True
    label = "conf. increase"

    def _per_sample(self, clean: Tensor, perturbed: Tensor) -> Tensor:
        return confidence_increase(clean, perturbed)


def keep_image(pixel_values: Tensor, maps: Tensor) -> Tensor:
    """(B, C, H, W) normalised pixels times the whole (B, H, W) map in [0, 1]."""
    if maps.shape != pixel_values.shape[:1] + pixel_values.shape[2:]:
        raise ValueError(f"maps must be (B, H, W) = {tuple(pixel_values.shape[:1] + pixel_values.shape[2:])}, got {tuple(maps.shape)}")
    return pixel_values * maps[:, None].to(pixel_values.dtype)


def keep_text(input_ids: Tensor, maps: Tensor, words: Tensor, replacement_id: int) -> Tensor:
    """(B, L) ids with each caption's words at or below their median map value replaced by ``replacement_id``.

    ``words`` (B, L) marks the tokens that can be replaced: real tokens other than
    BOS/EOS/CLS/SEP. The median is the lower median of a caption's word values, so a
    caption of one word loses it, and a constant map loses every word.
    """
    if maps.shape != input_ids.shape or words.shape != input_ids.shape:
        raise ValueError(f"maps and words must have the shape of input_ids {tuple(input_ids.shape)}")
    out = input_ids.clone()
    for b in range(input_ids.shape[0]):
        values = maps[b][words[b]]
        if values.numel() == 0:
            continue
        low = words[b] & (maps[b] <= values.median())
        out[b][low] = replacement_id
    return out
