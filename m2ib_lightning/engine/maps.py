"""Capacities to maps: per-row min-max, and token capacities onto the patch grid at the image's size."""


from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor




def minmax(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-row min-max to [0, 1] over the last dims; masked-out entries become 0.

    A constant row (where the reference would divide by zero) maps to zeros.
    """
    flat = values.flatten(1)
    keep = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.flatten(1)
    low = flat.masked_fill(~keep, math.inf).amin(1, keepdim=True)
    high = flat.masked_fill(~keep, -math.inf).amax(1, keepdim=True)
    span = high - low
    scaled = torch.where(span > 0, (flat - low) / torch.where(span > 0, span, 1), 0)
    return scaled.masked_fill(~keep, 0).view_as(values)


def image_maps_from_capacity(token_capacity: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Drop the prefix tokens, reshape to the patch grid, upsample bilinearly to ``size``, min-max."""
    rows, cols = grid
    patches = token_capacity[:, -rows * cols :].reshape(-1, 1, rows, cols)
    upsampled = F.interpolate(patches, size=size, mode="bilinear", align_corners=False)
    return minmax(upsampled[:, 0])


# ------------------------------------------------------------------------- noise
