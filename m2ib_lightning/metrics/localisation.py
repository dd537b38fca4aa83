"""Localisation of saliency maps against ground-truth masks, as torchmetrics metrics and functions.

- Pointing game: is the map's peak inside the mask (Zhang et al., 2016)? Ties
  at the peak count as a hit only in the share that lies inside the mask.
- Energy: the share of the map's total mass that falls inside the mask
  (the "energy-based pointing game" of Score-CAM).
- Top-k IoU: intersection over union of the map's top-ranked pixels and the mask,
  ``|top ∩ mask| / |top ∪ mask|``; the top region holds ``fraction`` of the image, or
  by default as many pixels as the mask (so a perfect map scores 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .mean import MeanOverSamples


def _check(maps: Tensor, masks: Tensor) -> None:
    if maps.shape != masks.shape or maps.dim() != 3:
        raise ValueError(f"maps and masks must both be (B, H, W), got {tuple(maps.shape)} and {tuple(masks.shape)}")
    if not (masks.flatten(1).any(1)).all():
        raise ValueError("masks holds an empty mask: there is nothing to point at")


def pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """(B,) hit score of each map: the share of its peak pixels that lie inside the mask."""
    _check(maps, masks)
    flat, inside = maps.flatten(1), masks.flatten(1).bool()
    peak = flat == flat.amax(1, keepdim=True)
    return (peak & inside).sum(1) / peak.sum(1)


def mask_energy(maps: Tensor, masks: Tensor) -> Tensor:
    """(B,) share of each (non-negative) map's mass inside the mask; a zero map scores 0."""
    _check(maps, masks)
    if (maps < 0).any():
        raise ValueError("maps must be non-negative for the energy share")
    flat, inside = maps.flatten(1).double(), masks.flatten(1).bool()
    total = flat.sum(1)
    return torch.where(total > 0, (flat * inside).sum(1) / total.clamp_min(1e-300), 0).float()


def top_k_iou(maps: Tensor, masks: Tensor, fraction: float | None = None) -> Tensor:
    """(B,) IoU of each map's top-ranked pixels (``fraction`` of the image, default the mask's area) with its mask."""
    _check(maps, masks)
    flat, inside = maps.flatten(1), masks.flatten(1).bool()
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = inside.sum(1) if fraction is None else torch.full_like(inside.sum(1), max(1, round(fraction * flat.shape[1])))
    rank = flat.argsort(dim=1, descending=True, stable=True).argsort(dim=1, stable=True)
    top = rank < k[:, None]
    return (top & inside).sum(1) / (top | inside).sum(1)


class PointingGame(MeanOverSamples):
    """Mean pointing-game hit rate over all samples seen (summed across processes)."""

    higher_is_better = True

    def _per_sample(self, maps: Tensor, masks: Tensor) -> Tensor:
        return pointing_game(maps, masks)


class MaskEnergy(MeanOverSamples):
    """Mean share of map energy inside the mask over all samples seen (summed across processes)."""

    higher_is_better = True

    def _per_sample(self, maps: Tensor, masks: Tensor) -> Tensor:
        return mask_energy(maps, masks)


class TopKIoU(MeanOverSamples):
    """Mean IoU of the map's top region with the mask over all samples seen (summed across processes)."""

    higher_is_better = True

    def __init__(self, fraction: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fraction = fraction

    def _per_sample(self, maps: Tensor, masks: Tensor) -> Tensor:
        return top_k_iou(maps, masks, self.fraction)
