"""Gradient saliency (Simonyan et al., 2014)."""

from __future__ import annotations

from ..engine import minmax
from .base import AttributionMethod, Maps, _leaf, register_method


@register_method
class GradientSaliency(AttributionMethod):
    """|d score / d pixel| summed over channels (Simonyan et al., 2014; Captum ``Saliency``)."""

    name = "saliency"

    def _maps(self, pixel_values, input_ids, attention_mask, seeds) -> Maps:
        from captum.attr import Saliency

        score = self.image_score(input_ids, attention_mask)
        return Maps(minmax(Saliency(score).attribute(_leaf(pixel_values), abs=True).sum(1)))
