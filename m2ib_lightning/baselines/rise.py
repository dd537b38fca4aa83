"""RISE (Petsiuk et al., 2018): the score under random masks, weighted."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..engine import minmax
from .base import AttributionMethod, Maps, register_method


@register_method
class RISE(AttributionMethod):
    """RISE (Petsiuk et al., 2018): the score-weighted mean of ``masks`` random masks (cells of a ``cells`` x ``cells``
    grid kept with probability ``keep``, upsampled bilinearly with a random shift), drawn from each sample's seed and
    scored ``chunk`` at a time. The map is sum_i s_i M_i / (N p)."""

    name = "rise"

    def __init__(self, backbone: Any, masks: int = 500, cells: int = 7, keep: float = 0.5, chunk: int = 100):
        super().__init__(backbone)
        self.masks, self.cells, self.keep, self.chunk = masks, cells, keep, chunk

    def random_masks(self, seed: int, height: int, width: int, device: torch.device) -> Tensor:
        gen = torch.Generator().manual_seed(int(seed))
        grid = (torch.rand(self.masks, 1, self.cells, self.cells, generator=gen) < self.keep).float()
        cell_h, cell_w = -(-height // self.cells), -(-width // self.cells)
        big = F.interpolate(grid, size=((self.cells + 1) * cell_h, (self.cells + 1) * cell_w), mode="bilinear", align_corners=False)
        dy = torch.randint(0, cell_h, (self.masks,), generator=gen)
        dx = torch.randint(0, cell_w, (self.masks,), generator=gen)
        return torch.stack([big[i, 0, dy[i]: dy[i] + height, dx[i]: dx[i] + width] for i in range(self.masks)]).to(device)

    def _maps(self, pixel_values, input_ids, attention_mask, seeds) -> Maps:
        height, width = pixel_values.shape[-2:]
        out = []
        for b in range(pixel_values.shape[0]):
            score = self.image_score(input_ids[b: b + 1], attention_mask[b: b + 1])
            masks = self.random_masks(int(seeds[b]), height, width, pixel_values.device)
            total = torch.zeros(height, width, device=pixel_values.device)
            with torch.no_grad(), self.scorer.only(b):
                for start in range(0, self.masks, self.chunk):
                    chunk = masks[start: start + self.chunk]
                    scores = self.scorer.confidence(score(pixel_values[b: b + 1] * chunk[:, None].to(pixel_values.dtype)))
                    total += (scores[:, None, None].float() * chunk).sum(0)
            out.append(total / (self.masks * self.keep))
        return Maps(minmax(torch.stack(out)))
