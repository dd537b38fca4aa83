"""Attention rollout (Abnar and Zuidema, 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import _AttentionMethod
from .base import register_method


@register_method
class AttentionRollout(_AttentionMethod):
    """Attention rollout (Abnar & Zuidema, 2020): per block the head-mean attention with the residual added,
    0.5 A + 0.5 I, rows renormalised, multiplied through the tower."""

    name = "rollout"

    def _step(self, relevance: Tensor, attention: Tensor, grad: Tensor | None) -> Tensor:
        mixed = 0.5 * attention.mean(1) + 0.5 * torch.eye(attention.shape[-1], dtype=attention.dtype, device=attention.device)
        return (mixed / mixed.sum(-1, keepdim=True)) @ relevance
