"""What a fit returns: per-tower capacity and curves, and a batch's maps."""


from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor




@dataclass
class TowerFit:
    """What one tower's fit leaves: per-token capacity of the last forward pass and the loss curves."""

    capacity: Tensor  # (B, T): nats per token, summed over channels, zero at padding
    fit: Tensor  # (B,): mean cosine similarity of the last forward pass
    capacity_curve: Tensor  # (steps, B): capacity term per step
    fit_curve: Tensor  # (steps, B): fit term per step

    @staticmethod
    def concat(parts: list["TowerFit"], tokens: int) -> "TowerFit":
        """Fits of sample groups as one batch, capacities zero-padded to ``tokens`` positions."""
        return TowerFit(
            capacity=torch.cat([F.pad(p.capacity, (0, tokens - p.capacity.shape[1])) for p in parts]),
            fit=torch.cat([p.fit for p in parts]),
            capacity_curve=torch.cat([p.capacity_curve for p in parts], dim=1),
            fit_curve=torch.cat([p.fit_curve for p in parts], dim=1),
        )


@dataclass
class AttributionResult:
    """Maps of a batch of image-text pairs.

    ``image_maps`` (B, H, W) and ``text_maps`` (B, L) are min-max normalised to
    [0, 1] (text maps are zero beyond each sample's length); ``image_capacity``
    (B, prefix tokens + rows * cols: CLS first where the model has one, none for
    SigLIP) and ``text_capacity`` (B, L) are the raw per-token capacities in nats.
    """

    image_maps: Tensor
    text_maps: Tensor
    image_capacity: Tensor
    text_capacity: Tensor
    patch_grid: tuple[int, int]
    image_fit: Tensor
    text_fit: Tensor
    curves: dict[str, Tensor] = field(default_factory=dict)

    @property
    def image_patch_capacity(self) -> Tensor:
        """Raw capacity on the patch grid (B, rows, cols), prefix tokens (CLS) dropped."""
        rows, cols = self.patch_grid
        return self.image_capacity[:, -rows * cols :].reshape(-1, rows, cols)
