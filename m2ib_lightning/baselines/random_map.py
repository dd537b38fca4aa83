"""Random maps: the floor every method must beat."""

from __future__ import annotations

import torch
from torch import Tensor

from ..engine import minmax
from .base import AttributionMethod, Maps, register_method


@register_method
class RandomMap(AttributionMethod):
    """Uniform noise from each sample's seed, for both maps: the floor every method must beat."""

    name = "random"
    has_text_map = True

    def _maps(self, pixel_values, input_ids, attention_mask, seeds) -> Maps:
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds.tolist()]
        image = random_image_maps(gens, tuple(pixel_values.shape[-2:])).to(pixel_values.device)
        text = torch.stack([torch.rand(input_ids.shape[1], generator=g) for g in gens]).to(pixel_values.device)
        return Maps(image, minmax(text, attention_mask.bool()))


def random_image_maps(generators: list[torch.Generator], size: tuple[int, int]) -> Tensor:
    """(B, H, W) uniform noise, one map from each sample's generator: the random baseline of every table."""
    return torch.stack([torch.rand(size, generator=g) for g in generators])
