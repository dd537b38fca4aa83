"""What the attention methods share: each block's attention probabilities (and gradients), read through the
adapter's ``attention`` capability."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from ..backbones.base import tower_inputs
from ..backbones.capabilities import require
from ..engine import minmax
from .base import AttributionMethod, Maps, _block_input, _hooked, _replace_hidden


class _AttentionMethod(AttributionMethod):
    """Methods that read each block's attention probabilities (eager attention, through the adapter's
    ``attention_modules`` and ``eager_attention``). Relevance flows from the position each tower pools (CLS, EOS;
    the mean over tokens for an attention-pooling head) to its tokens."""

    has_text_map = True
    needs_gradients = False

    def __init__(self, backbone: Any, **settings: Any):
        super().__init__(backbone, **settings)
        require(self.backbone, "attention", f"the {self.name} method")

    def _maps(self, pixel_values, input_ids, attention_mask, seeds) -> Maps:
        image = self._relevance("image", pixel_values, input_ids, attention_mask)
        text = self._relevance("text", pixel_values, input_ids, attention_mask)
        return Maps(self.token_map(image, pixel_values), minmax(text, attention_mask.bool()))

    def _relevance(self, modality, pixel_values, input_ids, attention_mask) -> Tensor:
        """(B, T) relevance of each token of one tower for its pooled embedding."""
        probs: list[Tensor] = []

        def keep(module, args, output):
            probs.append(output[1])

        inputs = tower_inputs(modality, pixel_values, input_ids, attention_mask)
        score = (self.image_score(input_ids, attention_mask) if modality == "image"
                 else self.text_score(pixel_values, attention_mask))
        argument = pixel_values if modality == "image" else input_ids
        def into_graph(module, args, kwargs):  # a frozen model (requires_grad off) builds no graph of its own
            hidden = _block_input(args, kwargs)
            return None if hidden.requires_grad else _replace_hidden(args, kwargs, hidden.detach().requires_grad_())

        with contextlib.ExitStack() as stack:
            stack.enter_context(self.backbone.eager_attention())
            if self.needs_gradients:
                stack.enter_context(_hooked(self.backbone.blocks(modality)[0], pre=into_graph))
            for module in self.backbone.attention_modules(modality):
                stack.enter_context(_hooked(module, post=keep))
            with torch.set_grad_enabled(self.needs_gradients):
                scores = score(argument)
        if any(p is None for p in probs):
            raise RuntimeError(f"{self.name}: the model returned no attention probabilities (transformers 5 is needed)")
        grads = torch.autograd.grad(scores.sum(), probs) if self.needs_gradients else [None] * len(probs)
        tokens = probs[0].shape[-1]
        relevance = torch.eye(tokens, dtype=probs[0].dtype, device=probs[0].device).expand(probs[0].shape[0], tokens, tokens)
        first = self.first_block(modality)
        for attention, grad in list(zip(probs, grads))[first:]:
            relevance = self._step(relevance, attention.detach(), None if grad is None else grad.detach())
        state = self.backbone.prefix(modality, inputs, 0)
        if state.pool_index is None:  # attention-pooling head: every token feeds the embedding
            return relevance.mean(1)
        return relevance[torch.arange(relevance.shape[0], device=relevance.device), state.pool_index]

    def first_block(self, modality: str) -> int:
        """The first block whose attention enters the relevance (every block, unless a method says otherwise)."""
        return 0

    def _step(self, relevance: Tensor, attention: Tensor, grad: Tensor | None) -> Tensor:
        raise NotImplementedError
