"""What the attention methods share: each block's attention probabilities (and gradients), read through the
adapter's ``attention`` capability (dual encoders: each tower's blocks) or ``answer_attention`` capability (a VLM
whose language model reads image tokens, prompt and answer as one sequence: its layers)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from ..backbones.base import tower_inputs
from ..backbones.capabilities import require
from ..engine import image_maps_from_capacity, minmax
from .base import AttributionMethod, Maps, _block_input, _hooked, _replace_hidden
from .scoring import AnswerScorer


class _AttentionMethod(AttributionMethod):
    """Methods that read each block's attention probabilities (eager attention, through the adapter's
    ``attention_modules`` and ``eager_attention``). Relevance flows from the position each tower pools (CLS, EOS;
    the mean over tokens for an attention-pooling head) to its tokens."""

    has_text_map = True
    needs_gradients = False

    def __init__(self, backbone: Any, **settings: Any):
        super().__init__(backbone, **settings)
        self.answers = isinstance(self.scorer, AnswerScorer)
        require(self.backbone, "answer_attention" if self.answers else "attention", f"the {self.name} method")

    def _maps(self, pixel_values, input_ids, attention_mask, seeds) -> Maps:
        if self.answers:
            return self._answer_maps(pixel_values, input_ids, attention_mask)
        image = self._relevance("image", pixel_values, input_ids, attention_mask)
        text = self._relevance("text", pixel_values, input_ids, attention_mask)
        return Maps(self.token_map(image, pixel_values), minmax(text, attention_mask.bool()))

    def _relevance(self, modality, pixel_values, input_ids, attention_mask) -> Tensor:
        """(B, T) relevance of each token of one tower for its pooled embedding."""
        inputs = tower_inputs(modality, pixel_values, input_ids, attention_mask)
        score = (self.image_score(input_ids, attention_mask) if modality == "image"
                 else self.text_score(pixel_values, attention_mask))
        argument = pixel_values if modality == "image" else input_ids
        relevance = self._fold(self.backbone.attention_modules(modality), self.backbone.blocks(modality)[0],
                               lambda: score(argument), self.first_block(modality))
        state = self.backbone.prefix(modality, inputs, 0)
        if state.pool_index is None:  # attention-pooling head: every token feeds the embedding
            return relevance.mean(1)
        return relevance[torch.arange(relevance.shape[0], device=relevance.device), state.pool_index]

    def _answer_maps(self, pixel_values, input_ids, attention_mask) -> Maps:
        """Relevance over the language model's sequence for log p(answer): the rows of the positions that predict
        the answer's tokens, summed, read at the image tokens (the image map, through the grid of cells they stand
        for) and at the prompt's tokens (the text map). The vision tower's own attention does not enter."""
        batch = self.scorer.answer_batch(pixel_values, input_ids, attention_mask)
        modules = self.backbone.sequence_attention_modules()
        relevance = self._fold(modules, modules[0], lambda: self.backbone.answer_log_likelihood(batch),
                               self.first_block("text"))
        rows = batch.score_positions[batch.score_index]  # (B, A) the positions whose logits score answer tokens
        picked = relevance.gather(1, rows[..., None].expand(-1, -1, relevance.shape[-1]))
        per_position = (picked * batch.score_mask[..., None]).sum(1)  # (B, S)
        cells, grid = self.backbone.image_token_cells(batch)
        image = image_maps_from_capacity(per_position.gather(1, cells), grid, tuple(pixel_values.shape[-2:]))
        text = self.scorer.text_columns(per_position, pixel_values, input_ids, attention_mask)
        return Maps(image, minmax(text, attention_mask.bool()))

    def _fold(self, modules: list[torch.nn.Module], first_module: torch.nn.Module, run, first: int) -> Tensor:
        """(B, T, T) relevance of every token for every token: ``run()`` (the scores) with ``modules``' attention
        probabilities kept (eager attention), folded by :meth:`_step` from R = I over the blocks from ``first`` on.
        With gradients, ``first_module``'s input is made a leaf, since a frozen model builds no graph of its own."""
        probs: list[Tensor] = []

        def keep(module, args, output):
            probs.append(output[1])

        def into_graph(module, args, kwargs):
            hidden = _block_input(args, kwargs)
            return None if hidden.requires_grad else _replace_hidden(args, kwargs, hidden.detach().requires_grad_())

        with contextlib.ExitStack() as stack:
            stack.enter_context(self.backbone.eager_attention())
            if self.needs_gradients:
                stack.enter_context(_hooked(first_module, pre=into_graph))
            for module in modules:
                stack.enter_context(_hooked(module, post=keep))
            with torch.set_grad_enabled(self.needs_gradients):
                scores = run()
        if len(probs) != len(modules) or any(p is None for p in probs):
            raise RuntimeError(f"{self.name}: the model returned no attention probabilities (transformers 5 is needed)")
        grads = torch.autograd.grad(scores.sum(), probs) if self.needs_gradients else [None] * len(probs)
        tokens = probs[0].shape[-1]
        relevance = torch.eye(tokens, dtype=probs[0].dtype, device=probs[0].device).expand(probs[0].shape[0], tokens, tokens)
        for attention, grad in list(zip(probs, grads))[first:]:
            relevance = self._step(relevance, attention.detach(), None if grad is None else grad.detach())
        return relevance

    def first_block(self, modality: str) -> int:
        """The first block whose attention enters the relevance (every block, unless a method says otherwise)."""
        return 0

    def _step(self, relevance: Tensor, attention: Tensor, grad: Tensor | None) -> Tensor:
        raise NotImplementedError
