"""Chefer et al. (2021): gradient-weighted attention relevance, for bi-modal transformers."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..backbones.base import resolve_layer
from .attention import Relevance, _AttentionMethod, residual_normalised
from .base import register_method


@register_method
class CheferRelevance(_AttentionMethod):
    """Gradient-weighted attention relevance (Chefer, Gur & Wolf, ICCV 2021), with A-bar = E_heads[(dS/dA * A)^+]
    per attention from ``start_layer`` on, from R = I. Self-attention of group s: R_sx <- R_sx + A-bar R_sx for
    every group x. Cross-attention from s to q (their bi-modal rules, eqs. 10-11): R_sq <- R_sq + norm(R_ss)^T A-bar
    norm(R_qq), R_ss <- R_ss + A-bar R_qs, and for any third group x (BLIP VQA's answer reaching the image through
    the question) R_sx <- R_sx + norm(R_ss)^T A-bar R_qx. Dual encoders: the row of the pooled token is the map;
    answers: the rows predicting the answer. ``start_layer=0`` takes every block (on answers: every entry of the
    adapter's attention graph); the official CLIP explainer of Chefer et al. uses the last block only
    (``start_layer=-1``)."""

    name = "chefer"
    needs_gradients = True

    def __init__(self, backbone: Any, start_layer: int = 0):
        super().__init__(backbone)
        self.start_layer = start_layer

    def first_block(self, modality: str, count: int) -> int:
        where = "the attention graph" if self.answers else f"the {modality} tower"
        return resolve_layer(self.start_layer, count, "start_layer", where)

    def _step(self, relevance: Tensor, attention: Tensor, grad: Tensor | None) -> Tensor:
        return relevance + gradient_weighted(attention, grad) @ relevance

    def _cross(self, relevance: Relevance, queries: str, keys: str, attention: Tensor, grad: Tensor | None) -> None:
        a_bar = gradient_weighted(attention, grad)
        spread = residual_normalised(relevance[queries, queries]).T @ a_bar
        additions = {}
        for (rows, columns), values in relevance.items():
            if rows != keys:
                continue
            if columns == keys:
                additions[columns] = spread @ residual_normalised(values)
            elif columns == queries:
                additions[columns] = a_bar @ values
            else:
                additions[columns] = spread @ values
        for columns, added in additions.items():
            relevance[queries, columns] = relevance.get((queries, columns), 0) + added


def gradient_weighted(attention: Tensor, grad: Tensor) -> Tensor:
    """A-bar: the head mean of the positive part of gradient x attention (heads at dim -3)."""
    return (grad * attention).clamp_min(0).mean(-3)
