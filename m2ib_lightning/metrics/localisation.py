"""Localisation of saliency maps against ground-truth masks, as torchmetrics metrics and functions.

- Pointing game: is the map's peak inside the mask (Zhang et al., 2016)? Ties
  at the peak count as a hit only in the share that lies inside the mask.
- Energy: the share of the map's total mass that falls inside the mask
  (the "energy-based pointing game" of Score-CAM).
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
