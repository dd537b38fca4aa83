"""Attention rollout (Abnar and Zuidema, 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import Relevance, _AttentionMethod
from .base import register_method


@register_method
class AttentionRollout(_AttentionMethod):
    """Attention rollout (Abnar & Zuidema, 2020): per self-attention the head-mean attention with the residual
    added, 0.5 A + 0.5 I, rows renormalised, multiplied through. A cross-attention (BLIP VQA's question reading the
    image, its answer reading the question) is rolled out the same way: each query's row is half its residual
    stream, half the head-mean attention times the keys' rows, so every row stays a distribution over all tokens."""

    name = "rollout"

    def _step(self, relevance: Tensor, attention: Tensor, grad: Tensor | None) -> Tensor:
        eye = torch.eye(attention.shape[-1], dtype=attention.dtype, device=attention.device)
        mixed = 0.5 * attention.mean(-3) + 0.5 * eye
        return (mixed / mixed.sum(-1, keepdim=True)) @ relevance

    def _cross(self, relevance: Relevance, queries: str, keys: str, attention: Tensor, grad: Tensor | None) -> None:
        mean = attention.mean(-3)
        own = {columns: values for (rows, columns), values in relevance.items() if rows == queries}
        reached = {columns: values for (rows, columns), values in relevance.items() if rows == keys}
        for columns in own.keys() | reached.keys():
            through = mean @ reached[columns] if columns in reached else 0
            relevance[queries, columns] = 0.5 * own.get(columns, 0) + 0.5 * through
