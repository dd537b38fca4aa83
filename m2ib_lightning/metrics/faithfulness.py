"""Faithfulness of image maps: deletion and insertion curves (Petsiuk et al., RISE, 2018).

Deletion replaces the pixels a map ranks highest, a growing share at a time,
by ``fill`` (0 after CLIP normalisation: the dataset's mean colour) and
follows the model's score; a faithful map makes it fall fast (low area under
the curve). Insertion starts from the filled image and puts the top pixels
back; a faithful map makes the score rise fast (high area).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .mean import MeanOverSamples


def perturbation_curve(
    score: Callable[[Tensor], Tensor], pixel_values: Tensor, maps: Tensor, *, mode: str, steps: int = 10, fill: float = 0.0
) -> Tensor:
    """(B, steps + 1) scores with 0, 1/steps, ..., all of the top-ranked pixels deleted or inserted."""
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    b, c, h, w = pixel_values.shape
    if maps.shape != (b, h, w):
        raise ValueError(f"maps must be (B, H, W) = {(b, h, w)}, got {tuple(maps.shape)}")
    rank = maps.flatten(1).argsort(dim=1, descending=True, stable=True).argsort(dim=1, stable=True)  # 0 = most salient
    fractions = torch.arange(steps + 1, device=maps.device) / steps
    top = rank[:, None, :] < (fractions * h * w).round().long()[None, :, None]  # (B, steps+1, H*W)
    top = top.view(b, steps + 1, 1, h, w)
    images = pixel_values[:, None].expand(b, steps + 1, c, h, w)
    filled = torch.full_like(images, fill)
    perturbed = torch.where(top, filled, images) if mode == "deletion" else torch.where(top, images, filled)
    with torch.no_grad():
        return score(perturbed.reshape(b * (steps + 1), c, h, w)).view(b, steps + 1)


def curve_auc(curves: Tensor) -> Tensor:
    """(B,) trapezoidal area under curves sampled evenly on [0, 1]."""
    steps = curves.shape[1] - 1
    return (curves[:, 1:] + curves[:, :-1]).sum(1) / (2 * steps)


class CurveAUC(MeanOverSamples):
    """Mean area under deletion or insertion curves over all samples seen (summed across processes)."""

    def _per_sample(self, curves: Tensor) -> Tensor:
        return curve_auc(curves)
