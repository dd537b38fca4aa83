"""Chefer et al. (2021): gradient-weighted attention relevance, for bi-modal transformers."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..backbones.base import resolve_layer

from .attention import _AttentionMethod
from .base import register_method


@register_method
class CheferRelevance(_AttentionMethod):
    """Gradient-weighted attention relevance (Chefer, Gur & Wolf, ICCV 2021) for dual encoders: per block from
    ``start_layer`` on, R <- R + E_heads[(dS/dA * A)^+] R, from R = I; the row of the pooled token is the map.
    ``start_layer=0`` takes every block; the official CLIP explainer of Chefer et al. uses the last block only
    (``start_layer=-1``)."""

    name = "chefer"
    needs_gradients = True

    def __init__(self, backbone: Any, start_layer: int = 0):
        super().__init__(backbone)
        self.start_layer = start_layer

    def first_block(self, modality: str) -> int:
        return resolve_layer(self.start_layer, self.backbone.num_layers(modality), "start_layer", f"the {modality} tower")

    def _step(self, relevance: Tensor, attention: Tensor, grad: Tensor | None) -> Tensor:
        weighted = (grad * attention).clamp_min(0).mean(1)
        return relevance + weighted @ relevance
