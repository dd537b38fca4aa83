"""Checking what the front door is given, and screening a batch sample by sample (why the adapter would
refuse each one)."""


from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..backbones import VisionLanguageBackbone
from .config import Seeds



def _as_seeds(seed: Seeds, batch: int) -> Tensor:
    if isinstance(seed, bool):
        raise TypeError("seed must be an int or a 1-D integer tensor, got bool")
    if isinstance(seed, int):
        return torch.full((batch,), seed, dtype=torch.long)
    seeds = torch.as_tensor(seed)
    if seeds.is_floating_point() or seeds.dtype == torch.bool or seeds.dim() != 1:
        raise TypeError(f"seed must be an int or a 1-D integer tensor, got {seeds.dtype} of shape {tuple(seeds.shape)}")
    if seeds.numel() != batch:
        raise ValueError(f"seed has {seeds.numel()} entries for a batch of {batch} samples")
    return seeds.long().cpu()


def _check_inputs(pixel_values: Any, input_ids: Any, attention_mask: Any) -> tuple[Tensor, Tensor, Tensor]:
    if not isinstance(pixel_values, Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must have shape (B, C, H, W), got {tuple(pixel_values.shape)}")
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be a float tensor, got {pixel_values.dtype}")
    if not torch.isfinite(pixel_values).all():
        raise ValueError("pixel_values holds NaN or infinite values")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, L), got {tuple(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: every text needs at least one token")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.dim() == 1:
        attention_mask = attention_mask.unsqueeze(0)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}"
        )
    if attention_mask.is_floating_point() and not torch.isfinite(attention_mask).all():
        raise ValueError("attention_mask holds NaN or infinite values")
    if ((attention_mask != 0) & (attention_mask != 1)).any():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    empty = (attention_mask.sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask rows {empty} are all padding: every text needs at least one real token")
    if pixel_values.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"batch size mismatch: pixel_values has {pixel_values.shape[0]} images, input_ids {input_ids.shape[0]} texts"
        )
    return pixel_values, input_ids, attention_mask.long()


def screen(backbone: VisionLanguageBackbone, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> list[str | None]:
    """Per sample, why the backbone would refuse it (the engine's input checks and the adapter's ``validate_inputs``), or None."""
    parameter = next(backbone.module.parameters())
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    reasons: list[str | None] = []
    for b in range(pixel_values.shape[0]):
        length = int(mask[b].nonzero().max()) + 1 if bool(mask[b].any()) else input_ids.shape[1]
        try:
            pixels, ids, sample_mask = _check_inputs(pixel_values[b : b + 1], input_ids[b : b + 1, :length], mask[b : b + 1, :length])
            backbone.validate_inputs(pixels.to(parameter.device, parameter.dtype), ids.to(parameter.device), sample_mask.to(parameter.device))
            reasons.append(None)
        except (ValueError, TypeError) as err:
            reasons.append(str(err))
    return reasons
