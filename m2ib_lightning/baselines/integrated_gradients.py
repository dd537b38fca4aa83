"""Integrated gradients (Sundararajan et al., 2017), on pixels and on the text tower's input embeddings."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..engine import minmax
from .base import AttributionMethod, Maps, _block_input, _hooked, _leaf, _replace_hidden, register_method
from .tokens import replacement_token


@register_method
class IntegratedGradientsMethod(AttributionMethod):
    """Integrated gradients (Sundararajan et al., 2017). Image: on pixels from the zero image (the mean colour after
    normalisation; Captum ``IntegratedGradients``). Text: on the token embeddings entering the first text block, from
    the caption with its words replaced by ``replacement_id`` (BOS/EOS kept). |attribution| summed over channels."""

    name = "integrated_gradients"
    has_text_map = True

    def __init__(self, backbone: Any, steps: int = 16, replacement_id: int | None = None):
        super().__init__(backbone)
        self.steps, self.replacement_id = steps, replacement_id

    def _maps(self, pixel_values, input_ids, attention_mask, seeds) -> Maps:
        from captum.attr import IntegratedGradients

        image = IntegratedGradients(self.image_score(input_ids, attention_mask)).attribute(
            _leaf(pixel_values), baselines=torch.zeros_like(pixel_values), n_steps=self.steps, internal_batch_size=pixel_values.shape[0]
        )
        return Maps(minmax(image.abs().sum(1)), self._text(pixel_values, input_ids, attention_mask))

    def _text(self, pixel_values, input_ids, attention_mask) -> Tensor:
        score = self.text_score(pixel_values, attention_mask)
        block = self.backbone.blocks("text")[0]
        words = self.words
        replacement = replacement_token(self.backbone, self.replacement_id)
        baseline_ids = input_ids.masked_fill(words, replacement)
        captured: dict[str, Tensor] = {}

        def capture(module, args, kwargs):
            captured["hidden"] = _block_input(args, kwargs).detach()

        with _hooked(block, pre=capture), torch.no_grad():
            score(baseline_ids)
            start = captured["hidden"]
            score(input_ids)
            end = captured["hidden"]
        alphas = (torch.arange(self.steps, dtype=end.dtype, device=end.device) + 0.5) / self.steps  # midpoint rule
        path = (start[:, None] + alphas[None, :, None, None] * (end - start)[:, None]).flatten(0, 1).requires_grad_()

        def interpolate(module, args, kwargs):
            return _replace_hidden(args, kwargs, path)

        with _hooked(block, pre=interpolate):
            scores = score(input_ids.repeat_interleave(self.steps, dim=0))
        (grads,) = torch.autograd.grad(scores.sum(), [path])
        attribution = ((end - start) * grads.view(*end.shape[:1], self.steps, *end.shape[1:]).mean(1)).sum(-1).abs()
        return minmax(self.scorer.text_columns(attribution, pixel_values, input_ids, attention_mask), attention_mask.bool())
